"""The training loop on tiny models: loss falls, resume is exact, artifacts are right."""

import json

import pytest
import torch
from safetensors.torch import load_file

from kd import cli
from kd.state import load_state_dict, state_dict
from kd.train import on_log, setup, train
from tests.conftest import tiny_cfg


@pytest.mark.slow
def test_end_to_end_cli_run(tmp_path, tiny_teacher, corpus, capsys):
    out = tmp_path / "run"
    cfg_path = tmp_path / "job.json"
    cfg_path.write_text(tiny_cfg(tiny_teacher, corpus).model_dump_json())
    assert cli.main(["--config", str(cfg_path), "--out", str(out), "max_steps=16"]) == 0
    printed = capsys.readouterr().out
    assert "held-out perplexity: teacher" in printed and "student before" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [h["loss"] for h in metrics["history"]]
    assert len(losses) == 8 and losses[-1] < 0.9 * losses[0]
    assert metrics["student_ppl_after"] < metrics["student_ppl_before"]
    for key in ("kd", "ce", "cos", "lr", "tokens_per_s", "grad_norm"):
        assert key in metrics["history"][-1]
    # artifact layout
    student = out / "student"
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "distill_config.json",
    ):
        assert (student / name).is_file(), name
    resolved = json.loads((student / "distill_config.json").read_text())
    assert resolved["max_steps"] == 16 and resolved["student_model"] == "teacher"
    assert len(resolved["kept_layers"]) == 2
    assert (out / "checkpoint" / "state.safetensors").is_file()
    # the saved student loads as a plain HF model and has 2 layers
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(student)
    assert m.config.num_hidden_layers == 2
    assert not any(k.startswith("lm.") for k in load_file(student / "model.safetensors"))


def test_resume_is_exact(tiny_teacher, corpus):
    cfg = tiny_cfg(tiny_teacher, corpus, max_steps=6, warmup_steps=1)
    straight = setup(cfg)
    train(straight)
    first = setup(cfg)
    first.cfg = cfg.model_copy(update={"max_steps": 3})
    train(first)
    state = state_dict(first)
    resumed = setup(cfg, kept_layers=state["kept_layers"])
    load_state_dict(resumed, state)
    assert resumed.step == 3
    train(resumed)
    a = straight.student.state_dict()
    b = resumed.student.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_all_terms_lora_and_a_narrower_external_student(tiny_teacher, tiny_student, corpus):
    cfg = tiny_cfg(
        tiny_teacher,
        corpus,
        student_model=str(tiny_student),
        max_steps=4,
        gamma_mse=0.5,
        delta_cos=0.5,
        epsilon_attn=1.0,
        beta_ce=0.2,
        lora_r=4,
        objective="jsd",
    )
    run = setup(cfg)
    assert run.teacher.config._attn_implementation == "eager"
    logged = []
    train(run, on_log(logged.append))
    assert {"kd", "ce", "mse", "cos", "attn"} <= set(logged[-1])
    proj = run.student_fwd.projection  # student width 32 -> teacher 64
    assert proj is not None and proj.proj.weight.shape == (64, 32)


def test_grad_accumulation_matches_a_bigger_batch(tiny_teacher, corpus):
    big = setup(
        tiny_cfg(
            tiny_teacher,
            corpus,
            per_device_batch_size=4,
            max_steps=1,
            warmup_steps=0,
            delta_cos=0.0,
        )
    )
    small = setup(
        tiny_cfg(
            tiny_teacher,
            corpus,
            per_device_batch_size=2,
            grad_accum_steps=2,
            max_steps=1,
            warmup_steps=0,
            delta_cos=0.0,
        )
    )
    # feed both the same 4 blocks
    small.sampler.bs = 2
    idx = big.sampler._perm[:4]
    small.sampler._perm = torch.cat([idx, small.sampler._perm[4:]])
    train(big)
    train(small)
    a, b = big.student.state_dict(), small.student.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_fused_lm_head_trains_like_materialized_logits(tiny_teacher, corpus):
    """Steps with the heads inside the loss match steps with full logits: same losses,
    same updates (Adam amplifies rounding on near-zero gradients, so updates are
    compared on average; exact gradients are tested in test_losses)."""
    before = setup(tiny_cfg(tiny_teacher, corpus, max_steps=1, warmup_steps=0))
    before = before.student.state_dict()
    runs, logs = [], []
    for fused in (True, False):
        cfg = tiny_cfg(
            tiny_teacher,
            corpus,
            max_steps=2,
            warmup_steps=0,
            beta_ce=0.2,
            loss_chunk_tokens=7,
            logging_steps=1,
            fused_lm_head=fused,
        )
        run = setup(cfg)
        assert run.cfg.fused_lm_head is fused
        log: list[dict] = []
        train(run, on_log(log.append))
        runs.append(run)
        logs.append(log)
    for x, y in zip(*logs, strict=True):
        for k in ("loss", "kd", "ce", "lm", "cos"):
            assert x[k] == pytest.approx(y[k], rel=1e-4), k
    a, b = runs[0].student.state_dict(), runs[1].student.state_dict()
    diff = sum(float((a[k] - b[k]).abs().sum()) for k in a)
    moved = sum(float((a[k] - before[k]).abs().sum()) for k in a)
    assert moved > 0 and diff < 0.01 * moved


def test_no_teacher_baseline_trains_on_data_ce_without_teacher_forward(tiny_teacher, corpus):
    cfg = tiny_cfg(
        tiny_teacher,
        corpus,
        max_steps=4,
        logging_steps=1,
        alpha_kl=0.0,
        beta_ce=0.0,
        delta_cos=0.0,
        lm_ce=1.0,
    )
    assert not cfg.needs_teacher
    run = setup(cfg)
    calls = []
    real = run.teacher_fwd.forward
    run.teacher_fwd.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    log: list[dict] = []
    train(run, on_log(log.append))
    assert calls == []
    assert {"lm", "loss"} <= set(log[0]) and "kd" not in log[0]
    assert log[-1]["lm"] < log[0]["lm"]


@pytest.mark.slow  # two whole `python -m kd` runs, exports and report included
def test_cli_resume_keeps_the_history_from_before_the_resume(tmp_path, tiny_job, monkeypatch):
    """`python -m kd --resume`: metrics.json and the curves start at step 1, not at the
    step the run resumed from (the history travels in the checkpoint)."""
    from kd import pipeline

    drawn: list[list[int]] = []
    write_all = pipeline.curves.write_all

    def spy(out, history, *args, **kw):  # records what the curves are drawn from
        drawn.append([int(h["step"]) for h in history])
        return write_all(out, history, *args, **kw)

    monkeypatch.setattr(pipeline.curves, "write_all", spy)
    out, cfg = tmp_path / "run", tmp_path / "job.json"
    cfg.write_text(json.dumps(tiny_job(max_steps=2, student_layers=1)))  # saves at step 2
    assert cli.main(["--config", str(cfg), "--out", str(out)]) == 0
    assert cli.main(["--config", str(cfg), "--out", str(out), "--resume", "max_steps=4"]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [int(h["step"]) for h in history] == [1, 2, 3, 4]
    assert drawn[-1] == [1, 2, 3, 4] and (out / "curves.png").is_file()
