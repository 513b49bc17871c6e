"""Preflight: tokenizer and memory checks from config and tokenizer files only.

Model folders here are mostly written by hand (config.json + tokenizer.json), since
preflight reads nothing else; the parameter counts are checked against real models
built from a config (`make_tiny_llama`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kd.config import DistillConfig
from kd.memory_plan import plan_memory
from kd.model_files import read_gguf, read_model
from kd.preflight import HEADROOM, RUNTIME_BYTES, PreflightError, WorkerBudget, preflight

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3


def write_model(folder: Path, tokens: list[str], rows: int, layers: int = 2) -> Path:
    """A model folder as preflight sees it: a Llama config.json and a tokenizer.json."""
    folder.mkdir(parents=True)
    config = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": rows,
        "tie_word_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(config))
    tok = {"model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}}}
    tok["added_tokens"] = []
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    return folder


TOKENS = [f"tok{i}" for i in range(40)]
BIG = WorkerBudget(64 * GIB, None, "a test worker")


def test_tokenizer_mismatch_is_refused_with_both_sizes(tmp_path):
    teacher = write_model(tmp_path / "t", TOKENS, 40)
    other = [f"other{i}" for i in range(48)]
    student = write_model(tmp_path / "s", other, 48)
    cfg = DistillConfig(teacher_model=str(teacher), student_model=str(student))
    with pytest.raises(PreflightError) as err:
        preflight(cfg, BIG)
    msg = str(err.value)
    assert "student_model" in msg and "40 tokens" in msg and "48 tokens" in msg
    assert "teacher:layers=N" in msg  # the fix


def test_padding_rows_only_are_accepted_and_described(tmp_path):
    teacher = write_model(tmp_path / "t", TOKENS, 40)
    student = write_model(tmp_path / "s", TOKENS, 48)  # same tokens, 8 padding rows
    plan = preflight(DistillConfig(teacher_model=str(teacher), student_model=str(student)), BIG)
    tok = plan["tokenizers"]
    assert (tok["teacher_tokens"], tok["teacher_rows"]) == (40, 40)
    assert (tok["student_tokens"], tok["student_rows"]) == (40, 48)
    assert tok["shared_rows"] == 40
    assert "padding rows" in tok["verdict"] and "student 8" in tok["verdict"]


def test_a_tokenizer_extended_beyond_the_other_models_rows_is_refused(tmp_path):
    teacher = write_model(tmp_path / "t", TOKENS, 40)
    student = write_model(tmp_path / "s", TOKENS + ["<new>"], 48)  # token 40: no teacher row
    with pytest.raises(PreflightError, match="41 tokens"):
        preflight(DistillConfig(teacher_model=str(teacher), student_model=str(student)), BIG)


def _budget_that_fits(cfg: DistillConfig) -> WorkerBudget:
    m = read_model(cfg.teacher_model)
    plan = plan_memory(cfg, m.arch, m.arch.with_layers(15))
    return WorkerBudget(int((plan["peak_bytes"] + RUNTIME_BYTES) / HEADROOM) + 1, None, "w")


def test_over_budget_job_is_refused_naming_a_batch_that_fits():
    budget = _budget_that_fits(DistillConfig(per_device_batch_size=1))
    with pytest.raises(PreflightError) as err:
        preflight(DistillConfig(), budget)  # batch 4
    msg = str(err.value)
    assert msg.startswith("per_device_batch_size: the job needs about")
    assert "per_device_batch_size=1 with grad_accum_steps=4" in msg
    assert "more workers (num_workers) do not lower this" in msg
    assert err.value.plan["worker"]["needed_bytes"] > err.value.plan["worker"]["usable_bytes"]


def test_nothing_fits_says_how_much_memory_is_needed():
    with pytest.raises(PreflightError, match="nothing smaller fits.*use a worker with at least"):
        preflight(DistillConfig(student_layers=1), WorkerBudget(GIB // 4, None, "w"))


def test_lora_is_suggested_when_it_fits_and_a_batch_cut_does_not():
    budget = _budget_that_fits(DistillConfig(lora_r=16, per_device_batch_size=1))
    with pytest.raises(PreflightError) as err:
        preflight(DistillConfig(per_device_batch_size=1), budget)  # no smaller batch exists
    assert "lora_r=16 (LoRA: only adapters get gradients and AdamW state)" in str(err.value)


def test_default_preflight_is_fast_imports_no_torch_and_opens_no_weights():
    code = (
        "import sys, time\n"
        "opened = []\n"
        "sys.addaudithook(lambda e, a: opened.append(str(a[0])) if e == 'open' else None)\n"
        "from kd.config import DistillConfig\n"  # pydantic: imported by the API and CLI anyway
        "from kd.preflight import preflight\n"
        "t = time.perf_counter()\n"
        "plan = preflight(DistillConfig())\n"
        "dt = time.perf_counter() - t\n"
        "weights = [p for p in opened if p.endswith(('.safetensors', '.bin', '.pt'))]\n"
        "print(dt, 'torch' in sys.modules, weights, plan['params']['student'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    seconds, torch_loaded, weights, student = out.stdout.split(" ", 3)
    assert float(seconds) < 5.0
    assert torch_loaded == "False"
    assert weights.strip() == "[]"
    assert int(student) == 81_413_568  # 15 of SmolLM2-135M's 30 layers


def test_gguf_header_matches_the_converted_folder(smollm2_folder):
    from kd.model_files import embedded_path, read_folder

    t0 = time.perf_counter()
    gguf = read_gguf("x", embedded_path("embedded:smollm2-135m"))
    assert time.perf_counter() - t0 < 3.0
    folder = read_folder("y", smollm2_folder)
    assert gguf.arch == folder.arch
    assert gguf.vocab.same_as(folder.vocab) and gguf.vocab.size == 49152
    assert gguf.arch.params() == 134_515_008


def test_plan_counts_the_real_parameters_of_a_tiny_llama(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from kd import models
    from kd.student import derive_student
    from tests.conftest import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "m", tokenizer, layers=3, hidden=64)
    arch = read_model(str(folder)).arch
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert arch.params() == models.count_params(model)
    student = derive_student(model, [0, 2])
    assert arch.with_layers(2).params() == models.count_params(student)
    lora = models.apply_lora(student, 4, 16.0, 0.0)
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert arch.with_layers(2).lora_params(4) == trainable
    plan = plan_memory(DistillConfig(teacher_model=str(folder), lora_r=4), arch, arch)
    assert plan["params"]["trainable"] == arch.lora_params(4)


def test_untied_head_and_biases_are_counted(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        attention_bias=True,
        mlp_bias=True,
    )
    model = LlamaForCausalLM(cfg)
    (tmp_path / "m").mkdir()
    cfg.save_pretrained(tmp_path / "m")
    from kd.model_files import arch_from_hf

    arch = arch_from_hf(json.loads((tmp_path / "m" / "config.json").read_text()), "m")
    assert arch.params() == sum(p.numel() for p in model.parameters())


def test_ray_budget_is_the_tightest_nodes_share_per_worker():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 8.0, "memory": 16 * GIB}},
        {"Alive": True, "Resources": {"CPU": 2.0, "memory": 8 * GIB}},
        {"Alive": False, "Resources": {"CPU": 64.0, "memory": GIB}},
    ]
    cfg = DistillConfig(num_workers=4, cpus_per_worker=2)
    budget = WorkerBudget.from_ray_nodes(nodes, cfg)
    assert budget.host_bytes == 4 * GIB  # 16 GiB shared by 4 workers; 8 GiB by 1
    # No node fits now: an autoscaler may add one, so the memory is unknown, not refused.
    unknown = WorkerBudget.from_ray_nodes(nodes, DistillConfig(cpus_per_worker=16))
    assert unknown.host_bytes is None
    plan = preflight(DistillConfig(), unknown)
    assert plan["worker"]["note"] == "memory unknown: not compared" and plan["problems"] == []


def test_refuse_false_returns_the_plan_with_its_problems():
    plan = preflight(DistillConfig(), WorkerBudget(GIB, None, "w"), refuse=False)
    assert plan["problems"] and plan["problems"][0].startswith("per_device_batch_size:")
    json.dumps(plan)  # JSON-ready for before.json


def test_python_m_kd_refuses_a_tokenizer_mismatch_before_loading(tmp_path, capsys):
    from kd.cli import main

    teacher = write_model(tmp_path / "t", TOKENS, 40)
    student = write_model(tmp_path / "s", [f"x{i}" for i in range(48)], 48)
    argv = ["--out", str(tmp_path / "out"), f"teacher_model={teacher}", f"student_model={student}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "preflight refused the job" in err and "40 tokens" in err and "48 tokens" in err


def test_api_problems_name_the_field_without_a_cluster(tmp_path):
    from serve_app.preflight import http_problems  # not connected: memory is not compared

    teacher = write_model(tmp_path / "t", TOKENS, 40)
    student = write_model(tmp_path / "s", [f"x{i}" for i in range(48)], 48)
    cfg = DistillConfig(teacher_model=str(teacher), student_model=str(student))
    (problem,) = http_problems(cfg)
    assert problem["loc"] == ["body", "student_model"] and "48 tokens" in problem["msg"]
    # a source the server cannot read is left to the job's own preflight
    assert http_problems(DistillConfig(teacher_model=str(tmp_path / "absent"))) == []
    assert (
        http_problems(DistillConfig(teacher_model=str(teacher), student_model=str(teacher))) == []
    )


def test_the_plan_is_stored_in_before_json(tmp_path, tiny_teacher, corpus):
    from kd import pipeline
    from kd.train import setup
    from tests.conftest import tiny_cfg

    cfg = tiny_cfg(tiny_teacher, corpus)
    plan = preflight(cfg)
    run = setup(cfg, kept_layers=[0, 3])
    before = pipeline.evaluate_before(run, tmp_path, preflight=plan)
    stored = json.loads((tmp_path / pipeline.BEFORE).read_text())
    assert before["preflight"] == stored["preflight"]
    assert stored["preflight"]["params"]["student"] == plan["params"]["student"]
    assert stored["preflight"]["tokenizers"]["verdict"].startswith("derived student")
