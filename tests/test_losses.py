"""Loss math against direct reference implementations."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from kd.losses import (
    FusedLMHead,
    HiddenProjection,
    LossWeights,
    align_vocab,
    attention_mse,
    hidden_cosine,
    hidden_mse,
    hybrid_loss,
    kd_divergence,
    lm_cross_entropy,
    target_mask,
)


@pytest.fixture(autouse=True)
def _float64():
    """References run in float64; kd keeps float64 inputs (it only upcasts bf16/fp16)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ---- straightforward references: loops over tokens, no chunking, no tricks ----------
def ref_divergence(s, t, mask, T, objective, beta=0.5):
    total, n = 0.0, 0
    B, L, _ = s.shape
    for b in range(B):
        for i in range(L):
            if not mask[b, i]:
                continue
            ps = torch.softmax(s[b, i] / T, -1)
            pt = torch.softmax(t[b, i] / T, -1)
            if objective == "forward_kl":
                d = (pt * (pt.log() - ps.log())).sum()
            elif objective == "reverse_kl":
                d = (ps * (ps.log() - pt.log())).sum()
            else:
                m = beta * pt + (1 - beta) * ps
                d = (
                    beta * (pt * (pt.log() - m.log())).sum()
                    + (1 - beta) * (ps * (ps.log() - m.log())).sum()
                )
            total = total + d
            n += 1
    return T * T * total / n


def rand_case(B=2, L=3, V=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, L, V, generator=g) * 2
    t = torch.randn(B, L, V, generator=g) * 2
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 2] = False
    mask[0, 0] = False
    return s, t, mask


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.5])
def test_divergence_matches_reference_value_and_grad(objective, T):
    s, t, mask = rand_case()
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    got = kd_divergence(s1, t, mask, temperature=T, objective=objective, jsd_beta=0.3)
    ref = ref_divergence(s2, t, mask, T, objective, beta=0.3)
    assert torch.allclose(got.double(), ref, atol=1e-5, rtol=1e-5)
    got.backward()
    ref.backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6, rtol=1e-4)
    # masked positions receive no gradient
    assert torch.all(s1.grad[0, 0] == 0) and torch.all(s1.grad[1, 2] == 0)


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_equals_plain(objective):
    s, t, mask = rand_case(B=3, L=7, V=11, seed=1)
    outs = []
    for chunk in (None, 1, 4, 1000):
        x = s.clone().requires_grad_(True)
        v = kd_divergence(x, t, mask, temperature=2.0, objective=objective, loss_chunk_tokens=chunk)
        v.backward()
        outs.append((v.detach(), x.grad))
    for v, g in outs[1:]:
        assert torch.allclose(v, outs[0][0], atol=1e-6)
        assert torch.allclose(g, outs[0][1], atol=1e-7)


def test_identical_logits_give_zero():
    s, _, mask = rand_case()
    for obj in ("forward_kl", "reverse_kl", "jsd"):
        assert kd_divergence(s, s, mask, objective=obj).abs().item() < 1e-6


def test_t_squared_factor_and_token_average():
    s, t, mask = rand_case()
    d1 = kd_divergence(s, t, mask, temperature=3.0)
    # manual: T^2 * mean over masked tokens of per-token KL
    ps = F.log_softmax(s / 3.0, -1)
    pt = F.log_softmax(t / 3.0, -1)
    per_tok = (pt.exp() * (pt - ps)).sum(-1)
    assert torch.allclose(d1.double(), 9.0 * per_tok[mask].mean(), atol=1e-6)
    # not "batchmean": duplicating the sequence length must not change the value
    s2, t2, m2 = torch.cat([s, s], 1), torch.cat([t, t], 1), torch.cat([mask, mask], 1)
    assert torch.allclose(kd_divergence(s2, t2, m2, temperature=3.0), d1, atol=1e-6)


def test_mask_accepts_int_and_ignores_masked_values():
    s, t, mask = rand_case()
    a = kd_divergence(s, t, mask.long())
    s_noise = s.clone()
    s_noise[~mask] = 1e4  # garbage at masked positions must not matter
    b = kd_divergence(s_noise, t, mask)
    assert torch.allclose(a, b)


def test_jsd_limits_match_gkd_properties():
    s, t, mask = rand_case()
    # symmetric at beta=0.5
    a = kd_divergence(s, t, mask, objective="jsd", jsd_beta=0.5)
    b = kd_divergence(t, s, mask, objective="jsd", jsd_beta=0.5)
    assert torch.allclose(a, b, atol=1e-6)
    # bounded by T^2 * log 2
    assert a.item() <= 4.0 * math.log(2) + 1e-6


@pytest.mark.parametrize(("beta", "kl"), [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_beta_endpoints_are_the_kls(beta, kl):
    """jsd_beta 0 and 1 (valid config values) train forward and reverse KL, as TRL GKD
    maps them; the JSD itself is identically 0 there and would train nothing."""
    s, t, mask = rand_case()
    x, y = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got = kd_divergence(x, t, mask, temperature=2.0, objective="jsd", jsd_beta=beta)
    ref = ref_divergence(y, t, mask, 2.0, kl)
    torch.testing.assert_close(got, ref)
    got.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, y.grad)
    assert got.item() > 0 and x.grad.abs().sum() > 0
    # the fused head takes the same path
    h_s, w_s, h_t, w_t, m = _head_case()
    w = LossWeights(objective="jsd", jsd_beta=beta)
    fused, _ = hybrid_loss(FusedLMHead(h_s, w_s), FusedLMHead(h_t, w_t), m, w)
    plain, _ = hybrid_loss(h_s @ w_s.T, h_t @ w_t.T, m, dataclasses.replace(w, objective=kl))
    torch.testing.assert_close(fused, plain)


def test_hybrid_ce_on_teacher_argmax_with_causal_shift():
    s, t, _ = rand_case(B=2, L=4, V=6)
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    w = LossWeights(alpha_kl=0.0, beta_ce=1.0)
    x = s.clone().requires_grad_(True)
    total, parts = hybrid_loss(x, t, attn, w)
    # position t counts only if tokens t and t+1 are real
    tm = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(target_mask(attn), tm)
    ref = F.cross_entropy(s[tm], t[tm].argmax(-1))
    assert torch.allclose(total.double(), ref, atol=1e-6)
    assert set(parts) == {"ce", "loss"}
    y = s.clone().requires_grad_(True)
    F.cross_entropy(y[tm], t[tm].argmax(-1)).backward()
    total.backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-7)


def test_hybrid_combines_weighted_terms_and_grads():
    torch.manual_seed(0)
    B, L, V, Hs, Ht = 2, 5, 7, 4, 6
    s, t = torch.randn(B, L, V), torch.randn(B, L, V)
    hs, ht = torch.randn(B, L, Hs), torch.randn(B, L, Ht)
    attn = torch.ones(B, L, dtype=torch.long)
    attn[1, 3:] = 0
    proj = HiddenProjection(Hs, Ht).double()
    w = LossWeights(alpha_kl=0.7, beta_ce=0.3, gamma_mse=0.2, delta_cos=0.5, temperature=2.0)
    total, parts = hybrid_loss(s, t, attn, w, student_hidden=hs, teacher_hidden=ht, projection=proj)
    tm = target_mask(attn)
    real = attn.bool()
    ph = proj(hs)
    expect = (
        0.7 * ref_divergence(s, t, tm, 2.0, "forward_kl")
        + 0.3 * F.cross_entropy(s[tm], t[tm].argmax(-1))
        + 0.2 * ((ph - ht) ** 2).mean(-1)[real].mean()
        + 0.5 * (1 - F.cosine_similarity(ph, ht, dim=-1))[real].mean()
    )
    assert torch.allclose(total.double(), expect, atol=1e-5)
    assert set(parts) == {"kd", "ce", "mse", "cos", "loss"}
    total.backward()
    assert proj.proj.weight.grad is not None and proj.proj.weight.grad.abs().sum() > 0


def test_projection_needed_when_widths_differ():
    s = torch.randn(1, 3, 5)
    with pytest.raises(ValueError, match="hidden size"):
        hybrid_loss(
            s,
            s,
            torch.ones(1, 3),
            LossWeights(delta_cos=1.0),
            student_hidden=torch.randn(1, 3, 4),
            teacher_hidden=torch.randn(1, 3, 6),
        )


def test_hidden_terms_reference():
    hs, ht = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert torch.allclose(hidden_mse(hs, ht, m).double(), F.mse_loss(hs[m], ht[m]))
    ref = (1 - F.cosine_similarity(hs[m], ht[m], dim=-1)).mean()
    assert torch.allclose(hidden_cosine(hs, ht, m).double(), ref)
    assert hidden_cosine(hs, hs, m).abs() < 1e-6


def _causal_probs(B, H, L, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, L, L, generator=g)
    x = x.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf"))
    return x.softmax(-1)


def test_attention_mse_different_head_counts():
    B, L = 2, 4
    a_s, a_t = _causal_probs(B, 2, L, 0), _causal_probs(B, 3, L, 1)
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    got = attention_mse(a_s, a_t, m)
    ms, mt = a_s.mean(1), a_t.mean(1)  # head-averaged [B, L, L]
    vals = []
    for b in range(B):
        keys = m[b]
        for q in range(L):
            if m[b, q]:
                vals.append(((ms[b, q, keys] - mt[b, q, keys]) ** 2).mean())
    assert torch.allclose(got.double(), torch.stack(vals).mean(), atol=1e-7)
    # same head count: per-head comparison, zero for identical maps
    assert attention_mse(a_t, a_t, m) == 0


def test_hybrid_attention_term_active_only_when_weighted():
    s = torch.randn(1, 4, 5)
    a = _causal_probs(1, 2, 4, 0)
    _, parts = hybrid_loss(
        s,
        s,
        torch.ones(1, 4),
        LossWeights(epsilon_attn=1.0),
        student_attn=a,
        teacher_attn=_causal_probs(1, 3, 4, 1),
    )
    assert "attn" in parts and parts["attn"] > 0
    with pytest.raises(ValueError, match="epsilon_attn"):
        hybrid_loss(s, s, torch.ones(1, 4), LossWeights(epsilon_attn=1.0))


def test_align_vocab_uses_shared_prefix():
    s, t = torch.randn(1, 2, 10), torch.randn(1, 2, 12)
    a, b = align_vocab(s, t)
    assert a.shape[-1] == b.shape[-1] == 10 and torch.equal(b, t[..., :10])


def test_lm_cross_entropy_reference():
    logits = torch.randn(2, 4, 6)
    ids = torch.randint(0, 6, (2, 4))
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    ref = F.cross_entropy(
        torch.cat([logits[0, :3], logits[1, :1]]), torch.cat([ids[0, 1:], ids[1, 1:2]])
    )
    assert torch.allclose(lm_cross_entropy(logits, ids, attn).double(), ref)


def test_fp32_inputs_are_supported_and_upcast():
    s, t, mask = rand_case()
    a = kd_divergence(s.float(), t.float(), mask)
    assert a.dtype == torch.float32
    assert torch.allclose(a.double(), ref_divergence(s, t, mask, 2.0, "forward_kl"), atol=1e-5)


# ---------------------------------------------------------------------------------
# Fused LM head: logits computed chunk by chunk inside the loss
# ---------------------------------------------------------------------------------
def _head_case(B=2, L=5, Hs=4, Ht=6, Vs=9, Vt=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, L, Hs, generator=g, requires_grad=True)
    w_s = torch.randn(Vs, Hs, generator=g, requires_grad=True)
    h_t = torch.randn(B, L, Ht, generator=g)
    w_t = torch.randn(Vt, Ht, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 3:] = 0
    return h_s, w_s, h_t, w_t, mask


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("vocabs", [(9, 11), (11, 9)])
def test_fused_head_equals_materialized_logits(objective, chunk, vocabs):
    """Same value and same gradients (hidden and head weight) as logits = h Wᵀ + vocab_terms,
    with different vocab sizes (shared prefix) and a chunk size that does not divide n."""
    h_s, w_s, h_t, w_t, mask = _head_case()
    w = LossWeights(
        alpha_kl=1.0, beta_ce=0.3, temperature=2.0, objective=objective, loss_chunk_tokens=chunk
    )
    fused, parts = hybrid_loss(FusedLMHead(h_s, w_s), FusedLMHead(h_t, w_t), mask, w)
    g_fused = torch.autograd.grad(fused, (h_s, w_s))
    plain, parts_plain = hybrid_loss(h_s @ w_s.T, h_t @ w_t.T, mask, w)
    g_plain = torch.autograd.grad(plain, (h_s, w_s))
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(parts["kd"], parts_plain["kd"])
    torch.testing.assert_close(parts["ce"], parts_plain["ce"])
    for a, b in zip(g_fused, g_plain, strict=True):
        torch.testing.assert_close(a, b)
    # rows of the student head beyond the teacher's vocabulary get no gradient
    assert torch.all(g_fused[1][w_t.shape[0] :] == 0)
    assert g_fused[1][: min(vocabs)].abs().sum() > 0


def test_fused_head_tied_weight_accumulates_both_paths():
    """A tied head (the embedding matrix) gets the embedding's gradient plus the loss's."""
    h_s, w_s, h_t, w_t, mask = _head_case(Vs=11)
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]])
    w = LossWeights(alpha_kl=1.0, beta_ce=0.1, loss_chunk_tokens=4)
    hidden = h_s + F.embedding(ids, w_s)  # w_s also used as the input embedding
    fused, _ = hybrid_loss(FusedLMHead(hidden, w_s), FusedLMHead(h_t, w_t), mask, w)
    (g_fused,) = torch.autograd.grad(fused, (w_s,))
    hidden = h_s + F.embedding(ids, w_s)
    plain, _ = hybrid_loss(hidden @ w_s.T, h_t @ w_t.T, mask, w)
    (g_plain,) = torch.autograd.grad(plain, (w_s,))
    torch.testing.assert_close(g_fused, g_plain)


def test_fused_head_frozen_weight_and_no_active_terms():
    h_s, w_s, h_t, w_t, mask = _head_case()
    w_s.requires_grad_(False)
    w = LossWeights(alpha_kl=1.0, beta_ce=0.0)
    fused, _ = hybrid_loss(FusedLMHead(h_s, w_s), FusedLMHead(h_t, w_t), mask, w)
    (g,) = torch.autograd.grad(fused, (h_s,))
    plain, _ = hybrid_loss(h_s @ w_s.T, h_t @ w_t.T, mask, w)
    torch.testing.assert_close(g, torch.autograd.grad(plain, (h_s,))[0])
    # nothing vocabulary-sized weighted: the total is exactly zero
    none = LossWeights(alpha_kl=0.0, beta_ce=0.0, delta_cos=0.0)
    total, _ = hybrid_loss(FusedLMHead(h_s, w_s), FusedLMHead(h_t, w_t), mask, none)
    assert float(total.detach()) == 0.0


def test_fused_head_one_side_plain_falls_back():
    h_s, w_s, h_t, w_t, mask = _head_case()
    w = LossWeights(alpha_kl=1.0, beta_ce=0.2)
    a, _ = hybrid_loss(FusedLMHead(h_s, w_s), h_t @ w_t.T, mask, w)
    b, _ = hybrid_loss(h_s @ w_s.T, h_t @ w_t.T, mask, w)
    torch.testing.assert_close(a, b)


def test_lm_ce_alone_is_the_no_teacher_baseline():
    """lm_ce weights plain next-token CE on the data; no teacher output is needed."""
    h_s, w_s, _, _, mask = _head_case(Vs=11)
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]])
    w = LossWeights(alpha_kl=0.0, beta_ce=0.0, lm_ce=0.5)
    total, parts = hybrid_loss(FusedLMHead(h_s, w_s), None, mask, w, input_ids=ids)
    ref = lm_cross_entropy(h_s @ w_s.T, ids, mask)
    torch.testing.assert_close(total, 0.5 * ref)
    assert set(parts) == {"lm", "loss"}
    with pytest.raises(ValueError, match="input_ids"):
        hybrid_loss(FusedLMHead(h_s, w_s), None, mask, w)
    with pytest.raises(ValueError, match="teacher"):
        hybrid_loss(FusedLMHead(h_s, w_s), None, mask, LossWeights(alpha_kl=1.0))


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("vocabs", [(11, 11), (13, 11), (11, 13)])
def test_fused_data_ce_equals_lm_cross_entropy(chunk, vocabs):
    """lm_ce inside the fused pass: same value and gradients as lm_cross_entropy on the
    materialized logits, alongside KD and CE(argmax) in the same chunks. With V_S > V_T
    (padding rows) the data CE is the student's own full softmax, as materialized: its
    extra rows get the data-CE gradient, the KD terms use the shared prefix."""
    h_s, w_s, h_t, w_t, mask = _head_case(Vs=vocabs[0], Vt=vocabs[1])
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]])
    w = LossWeights(alpha_kl=1.0, beta_ce=0.2, lm_ce=0.7, loss_chunk_tokens=chunk)
    fused, parts = hybrid_loss(FusedLMHead(h_s, w_s), FusedLMHead(h_t, w_t), mask, w, input_ids=ids)
    g_fused = torch.autograd.grad(fused, (h_s, w_s))
    plain, parts_plain = hybrid_loss(h_s @ w_s.T, h_t @ w_t.T, mask, w, input_ids=ids)
    g_plain = torch.autograd.grad(plain, (h_s, w_s))
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(parts["lm"], lm_cross_entropy(h_s @ w_s.T, ids, mask).detach())
    torch.testing.assert_close(parts["lm"], parts_plain["lm"])
    for a, b in zip(g_fused, g_plain, strict=True):
        torch.testing.assert_close(a, b)
    if vocabs[0] > vocabs[1]:  # the padding rows are pushed down by the data CE
        assert g_fused[1][vocabs[1] :].abs().sum() > 0


def test_compare_student_ppl_is_its_own_full_softmax():
    """compare()'s perplexities come from each model's own full softmax, equal to
    perplexity(); only agreement and KL use the shared vocabulary prefix."""
    from kd.data import Packed
    from kd.evaluate import compare, perplexity

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 10, (3, 6), generator=g)
    attn = torch.ones(3, 6, dtype=torch.long)
    attn[2, 4:] = 0
    data = Packed(ids, attn)
    s_table, t_table = torch.randn(10, 14, generator=g), torch.randn(10, 10, generator=g)

    def student(i, m):  # V_S = 14: 4 padding rows beyond the teacher's 10
        return s_table[i]

    def teacher(i, m):
        return t_table[i]

    got = compare(teacher, student, data, batch_size=2)
    assert got["student_ppl"] == pytest.approx(perplexity(student, data, batch_size=2))
    assert got["teacher_ppl"] == pytest.approx(perplexity(teacher, data, batch_size=2))
    s_lp = F.log_softmax(s_table[ids][:, :-1, :10], -1)
    t_lp = F.log_softmax(t_table[ids][:, :-1], -1)
    tm = target_mask(attn)[:, :-1]
    kl = (t_lp.exp() * (t_lp - s_lp)).sum(-1)[tm].mean()
    assert got["kl_teacher_student"] == pytest.approx(float(kl), rel=1e-6)
    agree = (s_lp.argmax(-1) == t_lp.argmax(-1))[tm].double().mean()
    assert got["top1_agreement"] == pytest.approx(float(agree))


def test_fused_equals_materialized_on_a_tied_model_with_padding_rows():
    """The issue's case: a tiny tied Llama student with V_S = 48 against a V_T = 40
    teacher, every vocabulary term on. Fused and materialized heads give the same loss
    and the same gradient for every student parameter (tied embedding included)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kd.models import DistillForward

    def lm(vocab, seed):
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
            initializer_range=0.2,
        )  # fmt: skip
        return DistillForward(LlamaForCausalLM(cfg))

    student, teacher = lm(48, 1), lm(40, 0)
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    w = LossWeights(alpha_kl=1.0, beta_ce=0.2, lm_ce=1.0, loss_chunk_tokens=5)
    out = {}
    for fused in (True, False):
        s_logits, _, _ = student(ids, mask, fused_lm_head=fused)
        with torch.no_grad():
            t_logits, _, _ = teacher(ids, mask, fused_lm_head=fused)
        loss, _ = hybrid_loss(s_logits, t_logits, mask, w, input_ids=ids)
        out[fused] = (loss.detach(), torch.autograd.grad(loss, list(student.parameters())))
    torch.testing.assert_close(out[True][0], out[False][0])
    for a, b in zip(out[True][1], out[False][1], strict=True):
        torch.testing.assert_close(a, b)
