"""The bundle: layout, every export loads in a fresh process and matches, report sanity."""

import json
import subprocess
import sys

import pytest
import torch

from kd import cli
from kd.config import DistillConfig

# Tolerances: fp32 ONNX must match PyTorch to float rounding; INT8 must keep most top-1s.
FP32_MAX_ABS_DIFF = 1e-3
INT8_MIN_TOP1 = 0.6


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("bundle")
    data = tmp_path_factory.mktemp("d") / "docs.jsonl"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    data.write_text(
        "\n".join(
            json.dumps({"text": " ".join(words[(i + j) % 10] for j in range(30 + i % 7))})
            for i in range(80)
        )
        + "\n"
    )
    cfg = DistillConfig(
        teacher_model=str(tiny_teacher),
        dataset=str(data),
        max_seq_len=32,
        per_device_batch_size=4,
        max_steps=8,
        warmup_steps=1,
        logging_steps=4,
        max_eval_blocks=4,
        student_layers=2,
        lr=3e-3,
    )
    (out / "job.json").write_text(cfg.model_dump_json())
    assert cli.main(["--config", str(out / "job.json"), "--out", str(out / "run")]) == 0
    return out / "run"


@pytest.mark.slow
def test_bundle_layout_and_manifest(bundle):
    for rel in [
        "student/model.safetensors",
        "student/config.json",
        "student/README.md",
        "student/generation_config.json",
        "student/distill_config.json",
        "student/tokenizer.json",
        "onnx/model.onnx",
        "onnx/tokenizer.json",
        "int8-dynamic/model.onnx",
        "int8-dynamic/tokenizer.json",
        "report.json",
        "report.md",
        "metrics.json",
        "manifest.json",
    ]:
        assert (bundle / rel).is_file(), rel
    from kd.exports import sha256_file

    manifest = json.loads((bundle / "manifest.json").read_text())["files"]
    listed = {f["path"]: f for f in manifest}
    assert "student/model.safetensors" in listed and "report.json" in listed
    for f in manifest:
        p = bundle / f["path"]
        assert p.stat().st_size == f["size"] and sha256_file(p) == f["sha256"], f["path"]


@pytest.mark.slow
def test_report_fields_are_sane(bundle):
    rep = json.loads((bundle / "report.json").read_text())
    q = rep["quality"]
    assert 1 < q["teacher_ppl"] < float("inf")
    for k in ("top1_agreement_before", "top1_agreement_after"):
        assert 0 <= q[k] <= 1
    assert q["kl_after"] >= 0 and rep["size"]["student_params"] < rep["size"]["teacher_params"]
    assert all(v > 0 for v in rep["speed"].values())
    assert rep["exports"]["onnx-fp32"]["max_abs_logit_diff"] < FP32_MAX_ABS_DIFF
    assert rep["exports"]["int8-dynamic"]["top1_agreement"] >= INT8_MIN_TOP1
    md = (bundle / "report.md").read_text()
    assert "| student after training |" in md and "int8-dynamic" in md
    assert "from_pretrained" in (bundle / "student" / "README.md").read_text()


LOAD_AND_RUN = r"""
import json, sys, torch
from kd.exports import OnnxLM, load_student
bundle, kind = sys.argv[1], sys.argv[2]
ids = torch.tensor(json.loads(sys.argv[3]))
mask = torch.ones_like(ids)
mask[1, -3:] = 0
if kind == "student":
    model, tok = load_student(bundle + "/student")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
else:
    lm = OnnxLM(bundle + "/" + kind)
    lm.tokenizer()
    out = lm(ids, mask)
torch.save(out, bundle + f"/{kind}.logits.pt")
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["student", "onnx", "int8-dynamic"])
def test_each_export_loads_in_a_fresh_process_and_matches(bundle, kind):
    from kd.exports import load_student

    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    subprocess.run(
        [sys.executable, "-c", LOAD_AND_RUN, str(bundle), kind, json.dumps(ids.tolist())],
        check=True,
        timeout=300,
    )
    got = torch.load(bundle / f"{kind}.logits.pt")
    model, _ = load_student(bundle / "student")
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    if kind == "int8-dynamic":
        agree = (got.argmax(-1) == want.argmax(-1))[real].float().mean()
        assert agree >= INT8_MIN_TOP1
    else:
        assert (got - want).abs()[real].max() < FP32_MAX_ABS_DIFF


@pytest.mark.slow
def test_onnx_export_of_the_default_smollm2_architecture(tmp_path, smollm2_folder):
    """A 2-layer model with SmolLM2-135M's exact config (widths, GQA, RoPE, tied head)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kd.exports.common import copy_tokenizer
    from kd.exports.onnx import OnnxLM, export_onnx

    cfg = AutoConfig.from_pretrained(smollm2_folder)
    cfg.num_hidden_layers = 2
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    export_onnx(model, tmp_path / "onnx" / "model.onnx")
    copy_tokenizer(smollm2_folder, tmp_path / "onnx")
    ids = torch.randint(0, cfg.vocab_size, (3, 20))
    mask = torch.ones_like(ids)
    mask[2, -5:] = 0
    got = OnnxLM(tmp_path / "onnx")(ids, mask)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    assert (got - want).abs()[mask.bool()].max() < FP32_MAX_ABS_DIFF
