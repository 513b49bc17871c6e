"""DistillConfig: the original payloads are accepted, bad ones rejected by field."""

import json
import math

import pytest
from pydantic import ValidationError

from kd.config import DistillConfig, load_config, parse_overrides

# The two example payloads of the original service's README, unchanged.
ORIGINAL_MINIMAL = {
    "teacher_model": "HuggingFaceTB/SmolLM2-360M",
    "student_model": "HuggingFaceTB/SmolLM2-135M",
    "dataset": "wikitext",
    "subset": "wikitext-2-raw-v1",
    "split": "train",
    "text_column": "text",
    "max_steps": 200,
    "per_device_batch_size": 4,
    "lr": 5e-5,
}
ORIGINAL_FULL = {
    "teacher_model": "HuggingFaceTB/SmolLM2-360M",
    "student_model": "HuggingFaceTB/SmolLM2-135M",
    "dataset": "wikitext",
    "subset": "wikitext-2-raw-v1",
    "split": "train",
    "text_column": "text",
    "max_steps": 1000,
    "per_device_batch_size": 8,
    "lr": 2e-4,
    "weight_decay": 0.01,
    "warmup_steps": 50,
    "grad_accum_steps": 4,
    "logging_steps": 10,
    "save_every": 200,
    "temperature": 2.0,
    "alpha_kl": 0.5,
    "beta_ce": 0.5,
    "gamma_mse": 0.1,
    "delta_cos": 0.1,
    "epsilon_attn": 0.0,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "use_qat": False,
    "post_training_quant": True,
    "export_onnx": True,
}


@pytest.mark.parametrize("payload", [ORIGINAL_MINIMAL, ORIGINAL_FULL])
def test_original_payloads_accepted_unchanged(payload):
    cfg = DistillConfig.model_validate(payload)
    for k, v in payload.items():
        assert getattr(cfg, k) == v
    # round trip through JSON (HTTP body -> storage -> workers)
    again = DistillConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg


def test_defaults_are_the_embedded_job():
    cfg = DistillConfig()
    assert cfg.teacher_model == "embedded:smollm2-135m"
    assert cfg.derives_student and cfg.dataset == "embedded"


def _errors(payload):
    with pytest.raises(ValidationError) as ei:
        DistillConfig.model_validate(payload)
    return ei.value.errors()


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", 0),
        ("temperature", -1.0),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("alpha_kl", -0.1),
        ("max_steps", 0),
        ("max_steps", 10**12),
        ("per_device_batch_size", 10**6),
        ("lr", math.nan),
        ("lora_dropout", 1.0),
        ("objective", "kl"),
        ("seed", -1),
    ],
)
def test_bad_values_rejected_naming_the_field(field, value):
    errs = _errors({field: value})
    assert [e["loc"] for e in errs] == [(field,)]


def test_every_problem_listed_at_once():
    errs = _errors({"temperature": -1, "max_steps": 0, "lr": "fast", "colour": "red"})
    assert {e["loc"][0] for e in errs} == {"temperature", "max_steps", "lr", "colour"}


def test_unknown_fields_and_trust_remote_code_rejected():
    errs = _errors({"trust_remote_code": True})
    assert errs[0]["loc"] == ("trust_remote_code",) and errs[0]["type"] == "extra_forbidden"


def test_cross_field_rules_listed_together():
    errs = _errors(
        {
            "alpha_kl": 0,
            "beta_ce": 0,
            "gamma_mse": 0,
            "delta_cos": 0,
            "epsilon_attn": 0,
            "lm_ce": 0,
            "warmup_steps": 10,
            "max_steps": 10,
            "use_qat": True,
        }
    )
    msg = errs[0]["msg"]
    for field in ("alpha_kl", "warmup_steps", "use_qat"):
        assert field in msg


def test_use_qat_is_rejected_with_a_fix():
    msg = _errors({"use_qat": True})[0]["msg"]
    assert "use_qat" in msg and "post_training_quant" in msg


def test_bf16_on_cpu_rejected():
    assert "precision" in _errors({"precision": "bf16"})[0]["msg"]
    assert DistillConfig(precision="bf16", use_gpu=True).precision == "bf16"


def test_derived_student_spec_is_normalised():
    cfg = DistillConfig(student_model="teacher:layers=15,select=uniform")
    assert cfg.student_model == "teacher" and cfg.student_layers == 15
    assert cfg.layer_selection == "uniform"
    assert DistillConfig(student_model=None).derives_student
    assert "student_model" in _errors({"student_model": "teacher:layers=abc"})[0]["msg"]


def test_load_config_with_overrides(tmp_path):
    p = tmp_path / "job.json"
    p.write_text(json.dumps(ORIGINAL_MINIMAL))
    cfg = load_config(str(p), ["max_steps=7", "objective=jsd", "lora_r=null"])
    assert cfg.max_steps == 7 and cfg.objective == "jsd" and cfg.lora_r is None
    assert parse_overrides(["dataset=./x.txt"]) == {"dataset": "./x.txt"}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["oops"])


def test_kd_does_not_import_ray():
    import subprocess
    import sys

    code = (
        "import sys, kd, kd.config, kd.spec, kd.config_checks, kd.losses, kd.models, kd.data, "
        "kd.train, kd.evaluate, kd.exports, kd.report, kd.pipeline, kd.cli, kd.student, "
        "kd.state, kd.optim, kd.run, kd.step\n"
        "assert 'ray' not in sys.modules, 'kd imported ray'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_preset_fills_defaults_that_explicit_fields_override(monkeypatch):
    from kd.config import PRESETS

    q = DistillConfig(preset="quality")
    assert PRESETS["quality"] and all(getattr(q, k) == v for k, v in PRESETS["quality"].items())
    # what the API stores is what every worker re-validates: the same config
    assert DistillConfig.model_validate(json.loads(q.model_dump_json())) == q
    mine = DistillConfig(preset="quality", max_steps=7, warmup_steps=0)
    assert (mine.preset, mine.max_steps, mine.warmup_steps) == ("quality", 7, 0)
    assert load_config("", ["preset=quality", "lr=5e-4"]).lr == 5e-4  # python -m kd k=v
    # a preset's student size steps aside when the request sizes its student itself
    monkeypatch.setitem(PRESETS, "quality", {"student_layers": 30, "student_ffn": 512})
    sized = DistillConfig(preset="quality")
    assert (sized.student_layers, sized.student_ffn) == (30, 512)
    own = DistillConfig(preset="quality", student_params="60M")
    assert (own.student_layers, own.student_ffn, own.student_params) == (None, None, 60_000_000)
    other = DistillConfig(preset="quality", student_model="HuggingFaceTB/SmolLM2-135M")
    assert other.student_layers is None
    with pytest.raises(ValidationError) as e:
        DistillConfig(preset="fastest")
    assert e.value.errors()[0]["loc"] == ("preset",)
    # a preset of the wrong type is a 422 naming the field, not a TypeError (found by the
    # API fuzz test: {"preset": {}} was a 500)
    for wrong in ({}, [], 3):
        with pytest.raises(ValidationError) as e:
            DistillConfig(preset=wrong)
        assert e.value.errors()[0]["loc"] == ("preset",)
