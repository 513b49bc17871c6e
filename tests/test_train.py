"""The training loop on tiny models: loss falls, resume is exact, artifacts are right."""

import json

import torch
from safetensors.torch import load_file

from kd import cli
from kd.train import load_state_dict, setup, state_dict, train
from tests.conftest import tiny_cfg


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
    assert (out / "checkpoint" / "state.pt").is_file()
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
    train(run, report=logged.append)
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
