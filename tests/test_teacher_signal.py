"""The stored teacher signal (kd/teacher_signal.py) against the live teacher and against
direct references: exact mode (fp16 final hidden state + the teacher's LM head) and
top-k mode (k ids + one tail bucket)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from kd import losses, models, teacher_signal
from kd.config import DistillConfig
from kd.data import pack
from kd.losses import FusedLMHead, HiddenProjection, LossWeights
from kd.teacher_signal import TeacherSignal, TopKSignal, compute_signal, topk_vocab_terms
from kd.train import setup, train
from tests.conftest import WORDS, tiny_cfg


# ---------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------
def test_the_cache_and_the_streamed_corpus_are_not_combined_yet():
    with pytest.raises(ValueError, match="teacher_signal: the cache is read beside"):
        DistillConfig(teacher_signal="cache", data_pipeline="ray_data")
    # auto falls back to the live teacher there (train_job.teacher_cache.prepare)
    assert DistillConfig(teacher_signal="auto", data_pipeline="ray_data").teacher_signal == "auto"


def test_config_defaults_and_refusals():
    cfg = DistillConfig()
    assert (cfg.teacher_signal, cfg.teacher_cache_mode, cfg.teacher_topk) == ("live", "exact", 64)
    with pytest.raises(ValidationError) as e:
        DistillConfig(teacher_signal="cache", epsilon_attn=0.5)
    assert "epsilon_attn: the attention term needs a live teacher" in str(e.value)
    with pytest.raises(ValidationError) as e:
        DistillConfig(teacher_signal="auto", teacher_cache_mode="topk", gamma_mse=1.0)
    assert "teacher_cache_mode: topk stores no hidden states" in str(e.value)
    with pytest.raises(ValidationError) as e:
        DistillConfig(teacher_signal="cache", lmbda=0.5)
    assert "teacher_signal: the cache covers the corpus's packed blocks" in str(e.value)
    with pytest.raises(ValidationError) as e:
        DistillConfig(teacher_signal="cache", alpha_kl=0.0, lm_ce=1.0)
    assert "teacher_signal: lm_ce alone runs no teacher" in str(e.value)
    with pytest.raises(ValidationError):
        DistillConfig(teacher_signal="sometimes")
    # the live teacher keeps every combination it had
    DistillConfig(epsilon_attn=0.5, lmbda=0.5)


# ---------------------------------------------------------------------------------
# Exact mode: the live teacher's loss and gradients within the 16-bit rounding
# ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tiny_teacher, tiny_student):
    teacher, tok = models.load_model_and_tokenizer(str(tiny_teacher))
    student, _ = models.load_model_and_tokenizer(str(tiny_student))
    teacher.eval().requires_grad_(False)
    docs = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(40)) for i in range(6)]
    blocks = pack(docs, tok, 48)
    blocks.attention_mask[-1, -5:] = 0  # a padded tail: masks must be honoured
    return models.DistillForward(teacher), student, blocks


# beta_ce is left out: CE on the teacher's argmax is discontinuous, and this random tiny
# teacher has near-ties over 49k ids that any rounding flips (measured below).
WEIGHTS = LossWeights(alpha_kl=1.0, gamma_mse=0.5, delta_cos=0.2, lm_ce=1.0)


def _loss_and_grads(student, t_out, ids, mask, weights):
    """(loss, parts, the student's flattened gradient) of one hybrid loss."""
    torch.manual_seed(0)
    fwd = models.DistillForward(student, HiddenProjection(32, 64))
    fwd.zero_grad(set_to_none=True)
    s_logits, s_hidden, _ = fwd(ids, mask, fused_lm_head=True)
    t_logits, t_hidden, _ = t_out
    loss, parts = teacher_signal.hybrid_loss(
        s_logits, t_logits, mask, weights, input_ids=ids, student_hidden=s_hidden,
        teacher_hidden=t_hidden,
    )  # fmt: skip
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in fwd.parameters() if p.grad is not None])
    return float(loss.detach()), {k: float(v) for k, v in parts.items()}, grads


def _cached(teacher_fwd, ids, mask, dtype):
    """Exact-mode outputs from a hidden state stored in `dtype`."""
    with torch.no_grad():
        _, hidden, _ = teacher_fwd(ids, mask, fused_lm_head=True)
    stored = hidden.to(dtype).float()
    return FusedLMHead(stored, teacher_fwd.head_weight()), stored, None


def test_exact_mode_equals_live_teacher_within_fp16_rounding(pair):
    teacher_fwd, student, blocks = pair
    ids, mask = blocks.input_ids, blocks.attention_mask
    with torch.no_grad():
        live = teacher_fwd(ids, mask, fused_lm_head=True)
    ref_loss, ref_parts, ref_grads = _loss_and_grads(student, live, ids, mask, WEIGHTS)

    # the real path: compute_signal -> stored arrays -> a batch -> teacher_outputs
    stored = TeacherSignal("exact", compute_signal(teacher_fwd, ids, mask, "exact", 0, 1.0))
    assert stored.arrays["hidden"].dtype == np.float16
    batch_signal = stored.take(list(range(len(blocks))))
    out = teacher_signal.teacher_outputs(batch_signal, teacher_fwd.head_weight(), "cpu")
    assert isinstance(out[0], FusedLMHead) and out[2] is None
    loss, parts, grads = _loss_and_grads(student, out, ids, mask, WEIGHTS)

    assert parts.keys() == ref_parts.keys() == {"kd", "mse", "cos", "lm", "loss"}
    print("exact mode vs live, relative:", abs(loss - ref_loss) / ref_loss, parts, ref_parts)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    for k in ("kd", "mse", "cos"):
        assert abs(parts[k] - ref_parts[k]) <= 1e-3 * abs(ref_parts[k]) + 1e-7, k
    assert parts["lm"] == pytest.approx(ref_parts["lm"], rel=1e-6)  # no teacher in it
    grad_err = float((grads - ref_grads).norm() / ref_grads.norm())
    print("exact mode vs live, student gradient relative error:", grad_err)
    assert grad_err < 1e-3, grad_err


def test_fp16_rounds_the_hidden_state_finer_than_bf16(pair):
    """Why exact mode stores fp16: measured on the tiny teacher (numbers in the report)."""
    teacher_fwd, student, blocks = pair
    ids, mask = blocks.input_ids, blocks.attention_mask
    with torch.no_grad():
        live = teacher_fwd(ids, mask, fused_lm_head=True)
    hidden = live[1]
    assert float(hidden.abs().max()) < 100  # post-norm: far inside fp16's range (65504)
    err = {}
    for dtype in (torch.float16, torch.bfloat16):
        h_err = float((hidden.to(dtype).float() - hidden).norm() / hidden.norm())
        kd_only = LossWeights(alpha_kl=1.0)
        ref, _, _ = _loss_and_grads(student, live, ids, mask, kd_only)
        got, _, _ = _loss_and_grads(
            student, _cached(teacher_fwd, ids, mask, dtype), ids, mask, kd_only
        )
        top = hidden.to(dtype).float() @ teacher_fwd.head_weight().T
        flips = float((top.argmax(-1) != live[0].materialize().argmax(-1)).float().mean())
        err[dtype] = (h_err, abs(got - ref) / abs(ref), flips)
    print("relative error (hidden, KD loss, share of argmax flips):", err)
    assert err[torch.float16][0] < err[torch.bfloat16][0] / 4
    assert err[torch.float16][0] < 5e-4 and err[torch.float16][1] < 1e-4


# ---------------------------------------------------------------------------------
# Top-k mode against a per-token full-softmax reference
# ---------------------------------------------------------------------------------
def ref_topk_loss(s, t, mask, ids_data, k, T, objective, beta, w: LossWeights):
    """Per token: the teacher's full softmax at T, its top k + one tail bucket; the
    student's full softmax at T on the same k ids + 1 − their sum. CE terms at T = 1."""
    kd = ce = lm = 0.0
    n = 0
    B, L, _ = s.shape
    for b in range(B):
        for i in range(L - 1):
            if not (mask[b, i] and mask[b, i + 1]):
                continue
            pt = torch.softmax(t[b, i] / T, -1)
            ps = torch.softmax(s[b, i] / T, -1)
            top = sorted(range(pt.numel()), key=lambda j: -float(pt[j]))[:k]
            q = torch.stack([pt[j] for j in top] + [1 - sum(pt[j] for j in top)])
            r = torch.stack([ps[j] for j in top] + [1 - sum(ps[j] for j in top)])
            if objective == "forward_kl":
                d = (q * (q.log() - r.log())).sum()
            elif objective == "reverse_kl":
                d = (r * (r.log() - q.log())).sum()
            else:
                m = beta * q + (1 - beta) * r
                d = (
                    beta * (q * (q.log() - m.log())).sum()
                    + (1 - beta) * (r * (r.log() - m.log())).sum()
                )
            p1 = torch.softmax(s[b, i], -1)
            kd, ce, lm = kd + d, ce - p1[top[0]].log(), lm - p1[ids_data[b, i + 1]].log()
            n += 1
    kd, ce, lm = T * T * kd / n, ce / n, lm / n
    return w.alpha_kl * kd + w.beta_ce * ce + w.lm_ce * lm, kd


class _LogitsTeacher(torch.nn.Module):
    """`compute_signal`'s teacher interface over fixed logits (the real function runs)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, ids, mask, fused_lm_head=False):
        return self.logits, None, None


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("fused", [False, True])
def test_topk_loss_equals_reference(objective, fused):
    torch.set_default_dtype(torch.float64)
    try:
        g = torch.Generator().manual_seed(3)
        B, L, V, H, k, T = 2, 5, 11, 6, 4, 2.0
        ids = torch.randint(0, V, (B, L), generator=g)
        mask = torch.ones(B, L, dtype=torch.long)
        mask[1, -2:] = 0
        t_logits = torch.randn(B, L, V, generator=g) * 2
        h = torch.randn(B, L, H, generator=g, requires_grad=True)
        w_head = torch.randn(V, H, generator=g)
        w = LossWeights(
            alpha_kl=1.0, beta_ce=0.3, lm_ce=0.7, temperature=T, objective=objective,
            jsd_beta=0.3, loss_chunk_tokens=3,
        )  # fmt: skip
        arrays = compute_signal(_LogitsTeacher(t_logits), ids, mask, "topk", k, T)
        sig = {n: torch.from_numpy(a) for n, a in arrays.items()}
        top, _, _ = teacher_signal.teacher_outputs(sig, None, "cpu")
        assert isinstance(top, TopKSignal) and top.ids.shape == (B, L, k)
        student = FusedLMHead(h, w_head) if fused else h @ w_head.T
        got, parts = topk_vocab_terms(student, top, losses.target_mask(mask), w, ids)
        (g_got,) = torch.autograd.grad(got, h)
        ref, ref_kd = ref_topk_loss(h @ w_head.T, t_logits, mask, ids, k, T, objective, 0.3, w)
        (g_ref,) = torch.autograd.grad(ref, h)
        # the stored teacher log-probs are fp32: agreement to fp32 rounding
        assert float(got.detach()) == pytest.approx(float(ref), rel=1e-6)
        assert float(parts["kd"]) == pytest.approx(float(ref_kd), rel=1e-6)
        assert torch.allclose(g_got, g_ref, rtol=1e-5, atol=1e-8)
    finally:
        torch.set_default_dtype(torch.float32)


def test_topk_with_every_id_equals_the_full_vocabulary_loss():
    """k = V leaves an empty tail: the bucket loss is the live full-vocabulary loss."""
    g = torch.Generator().manual_seed(5)
    B, L, V = 2, 6, 9
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    s = torch.randn(B, L, V, generator=g, requires_grad=True)
    t = torch.randn(B, L, V, generator=g) * 3
    w = LossWeights(alpha_kl=1.0, beta_ce=0.2, lm_ce=0.5, temperature=1.5)
    arrays = compute_signal(_LogitsTeacher(t), ids, mask, "topk", V, w.temperature)
    assert np.all(arrays["tail_logp"] == -np.inf)
    top, _, _ = teacher_signal.teacher_outputs(
        {n: torch.from_numpy(a) for n, a in arrays.items()}, None, "cpu"
    )
    got, parts = teacher_signal.hybrid_loss(s, top, mask, w, input_ids=ids)
    live, live_parts = losses.hybrid_loss(s, t, mask, w, input_ids=ids)
    assert float(got.detach()) == pytest.approx(float(live), rel=1e-5)
    assert parts.keys() == live_parts.keys()
    g_got, g_live = (torch.autograd.grad(x, s)[0] for x in (got, live))
    assert torch.allclose(g_got, g_live, atol=1e-6)


def test_topk_mass_beyond_k_goes_to_the_tail():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(1, 3, 20, generator=g)
    arrays = compute_signal(_LogitsTeacher(t), None, None, "topk", 5, 1.0)
    total = np.exp(arrays["topk_logp"]).sum(-1) + np.exp(arrays["tail_logp"])
    assert np.allclose(total, 1.0, atol=1e-6)
    assert math.isclose(float(arrays["topk_ids"][0, 0, 0]), float(t[0, 0].argmax()))


# ---------------------------------------------------------------------------------
# In the loop: no teacher forward in training once the signal is stored
# ---------------------------------------------------------------------------------
def test_training_with_cached_signal_runs_no_teacher_forward(tiny_teacher, corpus):
    live = setup(tiny_cfg(tiny_teacher, corpus, max_steps=1, warmup_steps=0))
    cfg = tiny_cfg(tiny_teacher, corpus, max_steps=1, warmup_steps=0, teacher_signal="cache")
    cached = setup(cfg)
    builds = cached.teacher_forwards  # the in-process build: one forward per batch of blocks
    assert builds == -(-len(cached.train_data) // cfg.per_device_batch_size)
    assert isinstance(cached.train_data, teacher_signal.SignalPacked)
    a, b = train(live), train(cached)
    assert live.teacher_forwards == 1 and cached.teacher_forwards == builds
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)  # same batches, same student init
    # a second job handed the stored signal makes no teacher forward at all
    again = setup(cfg, signal=cached.train_data.signal)
    train(again)
    assert again.teacher_forwards == 0


def test_a_signal_for_other_blocks_is_refused(tiny_teacher, corpus):
    cfg = tiny_cfg(tiny_teacher, corpus, max_steps=1, warmup_steps=0, teacher_signal="cache")
    wrong = TeacherSignal("exact", {"hidden": np.zeros((3, 32, 64), np.float16)})
    with pytest.raises(teacher_signal.TeacherSignalError, match="rebuild it"):
        setup(cfg, signal=wrong)


def test_topk_micro_batches_add_up_to_the_whole_batch():
    """With `norm` (kd.step's global token counts) the top-k loss of two micro-batches,
    one with a padded tail, sums to the loss of one call on both: no token weighs more
    for being in a short micro-batch."""
    g = torch.Generator().manual_seed(7)
    B, L, V, k = 2, 6, 10, 3
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 2:] = 0  # the tail block: 2 real tokens
    s = torch.randn(B, L, V, generator=g)
    t = torch.randn(B, L, V, generator=g) * 2
    w = LossWeights(alpha_kl=1.0, beta_ce=0.2, lm_ce=0.5, temperature=2.0)
    arrays = compute_signal(_LogitsTeacher(t), ids, mask, "topk", k, w.temperature)
    sig = {n: torch.from_numpy(a) for n, a in arrays.items()}

    def loss(rows, norm=None):
        top, _, _ = teacher_signal.teacher_outputs(
            {n: a[rows] for n, a in sig.items()}, None, "cpu"
        )
        kw = {"input_ids": ids[rows], "norm": norm} if norm else {"input_ids": ids[rows]}
        total, _ = teacher_signal.hybrid_loss(s[rows], top, mask[rows], w, **kw)
        return float(total)

    whole = loss(slice(0, 2))
    norm = losses.TokenCounts.of(mask)
    parts = loss(slice(0, 1), norm) + loss(slice(1, 2), norm)
    assert parts == pytest.approx(whole, rel=1e-6)
    # without the global counts the tail's 1 target token would weigh as much as 5
    assert loss(slice(0, 1)) + loss(slice(1, 2)) != pytest.approx(2 * whole, rel=1e-3)
