"""On-policy distillation: generation, the continuation-only loss mask, the loop hook."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from kd import rollout
from kd.config import DistillConfig
from kd.losses import LossWeights, hybrid_loss, target_mask
from kd.models import DistillForward
from kd.prompts import embedded_records, left_pad
from kd.rollout import GenSettings, generate, on_policy_at, right_padded
from kd.state import load_state_dict, state_dict
from kd.train import on_log, setup, train
from tests.conftest import tiny_cfg


@pytest.fixture(scope="module")
def lms(tiny_teacher, tiny_student):
    t = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    s = AutoModelForCausalLM.from_pretrained(tiny_student)
    return t, s


PROMPTS = [[5, 17, 99, 4, 301], [8, 8], [1000, 2000, 3000, 7]]


def test_right_padded_layout_and_masks():
    new = torch.tensor([[11, 12, 2], [21, 0, 0], [31, 32, 33]])
    b = right_padded(PROMPTS, new, torch.tensor([3, 1, 3]), pad_id=0)
    assert b["input_ids"].shape == (3, 8)  # longest: 5 + 3
    assert b["input_ids"][1].tolist() == [8, 8, 21, 0, 0, 0, 0, 0]
    assert b["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert b["loss_mask"][0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert b["loss_mask"][2].tolist() == [0, 0, 0, 0, 1, 1, 1, 0]
    # the loss's shift: position t counts when token t+1 is a continuation token
    assert target_mask(b["attention_mask"], b["loss_mask"])[1].tolist() == [0, 1] + [0] * 6


def test_left_pad_puts_every_prompt_last_token_in_the_last_column():
    ids, mask = left_pad(PROMPTS, pad_id=0)
    assert ids[:, -1].tolist() == [301, 8, 7]
    assert mask.sum(1).tolist() == [5, 2, 4]


def test_own_loop_greedy_equals_hf_generate_and_unbatched_decoding(lms):
    _, s = lms
    s.train()
    g = GenSettings(max_new_tokens=6, greedy=True)
    ours = generate(s, PROMPTS, g, eos_id=-1, pad_id=0, use_hf_generate=False)
    hf = generate(s, PROMPTS, g, eos_id=-1, pad_id=0, use_hf_generate=True)
    assert torch.equal(ours["input_ids"], hf["input_ids"])
    for i, p in enumerate(PROMPTS):  # left padding changes nothing: same as one at a time
        one = generate(s, [p], g, eos_id=-1, pad_id=0)
        n = len(p) + 6
        assert torch.equal(one["input_ids"][0], ours["input_ids"][i, :n])
    assert s.training  # train mode restored
    assert all(p.grad is None for p in s.parameters())


def test_stops_per_sequence_at_eos_and_pads_to_the_longest(lms):
    _, s = lms
    g = GenSettings(max_new_tokens=8, greedy=True)
    free = generate(s, PROMPTS, g, eos_id=-1, pad_id=0)
    eos = int(free["input_ids"][1, len(PROMPTS[1])])  # row 1's first generated token
    b = generate(s, PROMPTS, g, eos_id=eos, pad_id=0)
    lengths = b["gen_lengths"].tolist()
    assert lengths[1] == 1  # stopped at once, EOS included
    for i, p in enumerate(PROMPTS):
        cont = b["input_ids"][i][b["loss_mask"][i].bool()].tolist()
        assert len(cont) == lengths[i] and (eos not in cont[:-1])
        assert b["attention_mask"][i].sum() == len(p) + lengths[i]
        assert b["loss_mask"][i, : len(p)].sum() == 0
    assert b["input_ids"].shape[1] == max(len(p) + n for p, n in zip(PROMPTS, lengths, strict=True))


@pytest.mark.parametrize("hf", [True, False])
def test_sampling_is_seeded_by_generator(lms, hf):
    _, s = lms
    g = GenSettings(max_new_tokens=8, temperature=1.5, top_p=0.9)

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return generate(s, PROMPTS, g, eos_id=-1, pad_id=0, generator=gen, use_hf_generate=hf)[
            "input_ids"
        ]

    assert torch.equal(draw(rollout.rollout_seed(0, 3, 0)), draw(rollout.rollout_seed(0, 3, 0)))
    assert not torch.equal(draw(rollout.rollout_seed(0, 3, 0)), draw(rollout.rollout_seed(0, 3, 1)))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    picks = {int(rollout.pick_next(logits, GenSettings(top_p=0.7), gen)) for _ in range(200)}
    assert picks == {0, 1}


@pytest.mark.parametrize("lmbda", [0.0, 0.25, 0.5, 1.0])
def test_on_policy_share_is_exact(lmbda):
    assert sum(on_policy_at(lmbda, k) for k in range(40)) == round(40 * lmbda)


# ---- the loss counts only continuation tokens: against a plain loop ---------------
def _reference(s_lm, t_lm, batch, objective, temperature, beta):
    """Row by row, without padding: direct log-softmax divergences on real logits."""
    total, n = 0.0, 0
    for ids, attn, lm in zip(
        batch["input_ids"], batch["attention_mask"], batch["loss_mask"], strict=True
    ):
        real = ids[attn.bool()][None]
        s = s_lm(input_ids=real).logits[0].double() / temperature
        t = t_lm(input_ids=real).logits[0].double() / temperature
        for j in range(1, real.shape[1]):
            if not lm[j]:
                continue  # prompt (and, beyond the row, padding / post-EOS) never counts
            sp, tp = F.log_softmax(s[j - 1], -1), F.log_softmax(t[j - 1], -1)
            if objective == "forward_kl":
                d = (tp.exp() * (tp - sp)).sum()
            elif objective == "reverse_kl":
                d = (sp.exp() * (sp - tp)).sum()
            else:
                m = torch.logaddexp(
                    tp + torch.log(torch.tensor(beta)), sp + torch.log(torch.tensor(1 - beta))
                )
                d = beta * (tp.exp() * (tp - m)).sum() + (1 - beta) * (sp.exp() * (sp - m)).sum()
            total, n = total + d, n + 1
    return temperature**2 * total / n


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("fused", [False, True])
def test_loss_mask_matches_a_plain_reference_loop(lms, objective, fused):
    t_lm, s_lm = lms
    s_lm.eval()
    g = GenSettings(max_new_tokens=6, greedy=True)
    free = generate(s_lm, PROMPTS, g, eos_id=-1, pad_id=0)
    eos = int(free["input_ids"][1, len(PROMPTS[1]) + 1])  # row 1 stops after 2 tokens
    batch = generate(s_lm, PROMPTS, g, eos_id=eos, pad_id=0)
    assert batch["gen_lengths"].min() < batch["gen_lengths"].max()  # post-EOS padding exists
    w = LossWeights(alpha_kl=1.0, lm_ce=0.0, temperature=2.0, objective=objective, jsd_beta=0.3)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    s_out, _, _ = DistillForward(s_lm)(ids, attn, fused_lm_head=fused)
    t_out, _, _ = DistillForward(t_lm)(ids, attn, fused_lm_head=fused)
    loss, _ = hybrid_loss(s_out, t_out, attn, w, loss_mask=batch["loss_mask"])
    ref = _reference(s_lm, t_lm, batch, objective, 2.0, 0.3)
    torch.testing.assert_close(loss.double(), ref.to(torch.float64), rtol=1e-4, atol=1e-5)


def test_lm_ce_counts_only_continuation_tokens_too():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    ids = torch.randint(0, 11, (2, 6))
    attn = torch.ones(2, 6, dtype=torch.long)
    attn[1, 4:] = 0
    lm = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 0, 0]])
    w = LossWeights(alpha_kl=0.0, lm_ce=1.0)
    loss, _ = hybrid_loss(logits, None, attn, w, input_ids=ids, loss_mask=lm)
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2)]  # (row, position t) whose token t+1 counts
    ref = sum(-F.log_softmax(logits[b, t], -1)[ids[b, t + 1]] for b, t in pairs) / len(pairs)
    torch.testing.assert_close(loss, ref)


# ---- config, prompt set --------------------------------------------------------
def test_embedded_prompt_set_split_is_fixed_and_disjoint_by_topic():
    train, held = embedded_records("train"), embedded_records("heldout")
    assert len(held) == 40 and len(train) + len(held) == 392
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    topic = lambda p: p.split(" about ")[-1] if " about " in p else p  # noqa: E731
    assert "the water cycle" not in {topic(r["prompt"]).rstrip(".") for r in held}


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="prompt_tokens: prompt_tokens \\+ max_new_tokens"):
        DistillConfig(lmbda=0.5, max_seq_len=64)
    with pytest.raises(ValueError, match="lmbda: "):
        DistillConfig(lmbda=1.0, alpha_kl=0.0, lm_ce=1.0)
    with pytest.raises(ValueError, match="lmbda"):
        DistillConfig(lmbda=1.5)
    assert not DistillConfig(max_seq_len=32).generates  # defaults need no generation room


# ---- the loop -------------------------------------------------------------------
def _on_policy_cfg(teacher, corpus, **kw):
    base = dict(
        lmbda=1.0,
        prompt_tokens=8,
        max_new_tokens=12,
        beta_ce=0.0,
        delta_cos=0.0,
        objective="reverse_kl",
        max_steps=4,
        warmup_steps=1,
        logging_steps=1,
    )
    return tiny_cfg(teacher, corpus, **(base | kw))


def test_on_policy_run_trains_and_reports_rollout_time(tiny_teacher, corpus):
    cfg = _on_policy_cfg(tiny_teacher, corpus)
    run = setup(cfg)
    before = {k: v.clone() for k, v in run.student.state_dict().items()}
    history = []
    train(run, on_log(history.append))
    assert len(history) == 4
    for m in history:
        assert m["on_policy"] == 1.0 and m["rollout_s"] > 0 and m["train_s"] > 0
        assert "lm" not in m  # lm_ce is skipped on the student's own samples
        assert torch.isfinite(torch.tensor(m["loss"]))
    after = run.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def _recording(monkeypatch):
    seen = []
    orig = rollout.BatchSource.next_batch

    def rec(self, step, micro=0):
        b = orig(self, step, micro)
        seen.append((step, b["input_ids"].clone(), b["on_policy"]))
        return b

    monkeypatch.setattr(rollout.BatchSource, "next_batch", rec)
    return seen


@pytest.mark.parametrize("extra", [{}, {"lmbda": 0.5, "seq_kd": True}])
def test_resumed_on_policy_run_regenerates_the_same_samples(
    tiny_teacher, corpus, monkeypatch, extra
):
    cfg = _on_policy_cfg(tiny_teacher, corpus, **extra)
    seen = _recording(monkeypatch)
    straight, h_straight = setup(cfg), []
    train(straight, on_log(h_straight.append))
    samples_straight = list(seen)
    seen.clear()
    first = setup(cfg)
    first.cfg = cfg.model_copy(update={"max_steps": 2})
    h_resumed = []
    train(first, on_log(h_resumed.append))
    state = state_dict(first)
    resumed = setup(cfg, kept_layers=state["kept_layers"])
    load_state_dict(resumed, state)
    train(resumed, on_log(h_resumed.append))
    assert [s for s, _, _ in seen] == [0, 1, 2, 3]
    for (sa, a, pa), (sb, b, pb) in zip(samples_straight, seen, strict=True):
        assert sa == sb and pa == pb and torch.equal(a, b)
    for ma, mb in zip(h_straight, h_resumed, strict=True):
        assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5, abs=1e-6)
    if extra:
        assert [p for _, _, p in seen] == [False, True, False, True]


def test_instruction_data_prompt_column_with_chat_template(tiny_teacher, tmp_path, monkeypatch):
    import json

    rows = [
        {"question": f"Say {w} twice.", "answer": f"{w} {w}."}
        for w in "red green blue cat dog sun moon tree bird fish".split()
    ] * 10
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = _on_policy_cfg(
        tiny_teacher,
        data,
        prompt_column="question",
        text_column="answer",
        lmbda=0.5,
        max_seq_len=64,
        eval_fraction=0.1,
    )
    seen = _recording(monkeypatch)
    run = setup(cfg)
    history = []
    train(run, on_log(history.append))
    assert [m["on_policy"] for m in history] == [0.0, 1.0, 0.0, 1.0]
    off = seen[0][1]
    assert off.shape[1] <= 64
    # off-policy batches are prompt + the data's answer: the chat template is applied
    text = run.tokenizer.decode(off[0])
    assert "<|im_start|>user" in text and "twice." in text


def test_weights_replace_keeps_other_fields():
    w = LossWeights(alpha_kl=2.0, lm_ce=1.0, objective="jsd")
    on = dataclasses.replace(w, lm_ce=0.0)
    assert on.alpha_kl == 2.0 and on.objective == "jsd" and on.lm_ce == 0.0
