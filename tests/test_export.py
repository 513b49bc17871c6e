"""The bundle: layout, every export loads in a fresh process and matches, report sanity;
export_formats and save_dtype (config, writers, the precision saved) and the size table."""

import json
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from kd import cli
from kd.config import EXPORT_FORMATS, DistillConfig, load_config

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
        gen_eval_prompts=4,  # the report's generation section; the defaults cost ~16 s
        max_new_tokens=8,
        # every kind of writer: ONNX graphs, a GGUF file, a GenAI model folder
        export_formats=["onnx-fp32", "int8-dynamic", "gguf-q8_0", "ort-genai-int4"],
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
        "gguf/student-q8_0.gguf",
        "ort-genai-int4/model.onnx",
        "ort-genai-int4/genai_config.json",
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


@pytest.mark.slow
def test_gguf_and_genai_exports_are_checked_listed_and_reported(bundle):
    """A job with export_formats=[..., gguf-q8_0, ort-genai-int4]: each artifact is read
    back with its own runtime inside the job, and has manifest entries with sha256 and a
    row in report.json, report.md and the HTML page."""
    from kd.exports import sha256_file
    from serve_app.report_page import render

    rep = json.loads((bundle / "report.json").read_text())
    listed = {
        f["path"]: f["sha256"] for f in json.loads((bundle / "manifest.json").read_text())["files"]
    }
    gguf = bundle / "gguf" / "student-q8_0.gguf"
    assert listed["gguf/student-q8_0.gguf"] == sha256_file(gguf)
    assert {"ort-genai-int4/model.onnx", "ort-genai-int4/model.onnx.data"} <= set(listed)
    # The tiny 0.2-init student has large weights and far from flat logits: Q8_0 stays
    # close; weight-only INT4 costs more. A broken file (wrong layout, tokenizer ids)
    # gives ~1/V agreement and a perplexity near the vocabulary size.
    for name, max_ppl_ratio in (("gguf-q8_0", 1.05), ("ort-genai-int4", 3.0)):
        e = rep["exports"][name]
        assert e["top1_agreement"] >= 0.5, (name, e)
        assert 0.8 < e["ppl_ratio"] < max_ppl_ratio, (name, e)
        assert e["bytes"] > 0 and e["size_ratio_fp32"] < 1, (name, e)
        assert e["export_s"] > 0 and e["check_s"] > 0
    assert rep["exports"]["gguf-q8_0"]["sha256"] == listed["gguf/student-q8_0.gguf"]
    assert rep["exports"]["ort-genai-int4"]["gen_tokens_per_s_b1"] > 0
    files = {f["artifact"]: f for f in rep["size"]["files"]}
    assert files["gguf/student-q8_0.gguf"]["bytes"] == gguf.stat().st_size
    assert "ort-genai-int4/" in files and "student/" in files
    md = (bundle / "report.md").read_text()
    assert "| gguf-q8_0 |" in md and "| ort-genai-int4 |" in md and "| MB at fp32 |" in md
    page = render({"job_id": "j", "state": "succeeded", "created_at": 0.0}, rep, None)
    assert "<td>gguf-q8_0</td>" in page and "<td>ort-genai-int4</td>" in page


# ---- export_formats and save_dtype --------------------------------------------------
def test_export_formats_rejects_unknown_names_listing_the_valid_ones():
    with pytest.raises(ValidationError) as ei:
        DistillConfig(export_formats=["gguf-q8_0", "gguf-q4_k"])
    (err,) = ei.value.errors()
    assert err["loc"] == ("export_formats",)
    assert "gguf-q4_k" in err["msg"] and all(f in err["msg"] for f in EXPORT_FORMATS)


def test_export_formats_are_put_in_writing_order_with_the_student_first():
    cfg = DistillConfig(export_formats=["ort-genai-int4", "int8-dynamic", "onnx-fp32"])
    assert cfg.export_formats == ["safetensors", "onnx-fp32", "int8-dynamic", "ort-genai-int4"]
    assert DistillConfig().export_formats == ["safetensors", "gguf-q8_0", "ort-genai-int4"]
    # the command line's comma-separated form
    line = load_config(None, ["export_formats=ort-genai-int4, gguf-f16"])
    assert line.export_formats == ["safetensors", "gguf-f16", "ort-genai-int4"]


def test_deprecated_booleans_still_choose_the_onnx_formats(caplog):
    off = DistillConfig(export_onnx=False, post_training_quant=False)
    assert off.export_formats == ["safetensors"]
    assert "deprecated" in caplog.text
    old = DistillConfig(export_onnx=True, post_training_quant=True)
    assert old.export_formats == ["safetensors", "onnx-fp32", "int8-dynamic"]
    assert DistillConfig.model_validate_json(old.model_dump_json()) == old  # workers re-validate
    with pytest.raises(ValidationError, match="export_formats: .* contradicts the deprecated"):
        DistillConfig(export_onnx=False, export_formats=["gguf-q8_0"])


def test_every_config_format_has_a_writer_and_a_runtime():
    from kd import exports

    assert set(exports.WRITERS) == set(EXPORT_FORMATS)
    assert set(exports.RUNTIMES) == set(EXPORT_FORMATS) - {"safetensors"}


def _with_dtype(src, dst, dtype):
    """A copy of the model folder `src` whose config.json says `dtype`."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = dtype
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_teacher_precision_from_config_and_from_the_embedded_gguf(tiny_teacher, tmp_path):
    from kd.exports.precision import teacher_precision

    assert teacher_precision(str(tiny_teacher))[0] == "fp32"
    assert teacher_precision(str(_with_dtype(tiny_teacher, tmp_path / "b", "bfloat16")))[0] == (
        "bf16"
    )
    assert teacher_precision(str(_with_dtype(tiny_teacher, tmp_path / "h", "float16")))[0] == (
        "fp16"
    )
    dtype, why = teacher_precision("embedded:smollm2-135m")  # a Q4_1 GGUF
    assert dtype == "fp16" and "quantized" in why


@pytest.mark.parametrize(
    "teacher_dtype,save_dtype,want",
    [("bfloat16", "auto", torch.bfloat16), ("float16", "auto", torch.float16),
     ("bfloat16", "fp32", torch.float32), ("float32", "fp16", torch.float16)],
)  # fmt: skip
def test_student_is_saved_in_the_teachers_precision_unless_save_dtype_says(
    tiny_teacher, tiny_student, tokenizer, tmp_path, teacher_dtype, save_dtype, want
):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from kd import exports

    teacher = _with_dtype(tiny_teacher, tmp_path / "t", teacher_dtype)
    cfg = DistillConfig(teacher_model=str(teacher), save_dtype=save_dtype)
    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    folder = exports.export(model, ["safetensors"], tmp_path / "o", tokenizer=tokenizer, cfg=cfg)[
        "safetensors"
    ]
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__) == {want}
    saved = json.loads((folder / "distill_config.json").read_text())
    assert saved["saved_dtype"] == {v: k for k, v in exports.precision.DTYPES.items()}[want]
    back, _ = exports.load_student(folder)
    w, w0 = back.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight
    assert back.dtype == torch.float32 and torch.allclose(w, w0.to(want).float())


def test_fp16_refuses_weights_it_cannot_hold(tiny_student):
    from transformers import AutoModelForCausalLM

    from kd.exports import ExportError
    from kd.exports.precision import cast_for_saving

    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight[0] = 1e5
    with pytest.raises(ExportError, match="save_dtype: fp16 cannot hold model.norm.weight"):
        cast_for_saving(model, "fp16")
    assert cast_for_saving(model, "bf16").model.norm.weight.dtype == torch.bfloat16


def test_size_table_compares_like_with_like(tiny_teacher, tiny_student, tokenizer, tmp_path):
    """Parameters, then both models' bytes at one precision (the saved student's), then
    every file: the teacher's source beside the student folder and each export."""
    from transformers import AutoModelForCausalLM

    from kd import exports, report

    teacher = _with_dtype(tiny_teacher, tmp_path / "t", "bfloat16")
    cfg = DistillConfig(teacher_model=str(teacher))
    t = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    s = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    folder = exports.export(s, ["safetensors"], tmp_path / "o", tokenizer=tokenizer, cfg=cfg)[
        "safetensors"
    ]
    sz = report.size_summary(t, s, str(teacher), folder)
    n_t, n_s = sum(p.numel() for p in t.parameters()), sum(p.numel() for p in s.parameters())
    assert sz["precision"] == "bf16"
    assert (sz["teacher_bytes_at_precision"], sz["student_bytes_at_precision"]) == (
        2 * n_t,
        2 * n_s,
    )
    files = {f["artifact"]: f for f in sz["files"]}
    assert files["teacher source"]["bytes"] == report.folder_bytes(teacher)
    assert files["student/"]["bytes"] == report.folder_bytes(folder)
    assert files["student/"]["size_ratio_fp32"] == report.folder_bytes(folder) / (4 * n_s)
    assert (folder / "model.safetensors").stat().st_size < 2 * n_s + 100_000  # bf16 weights
    md = "\n".join(report.size_lines(sz))
    assert f"| parameters | {n_t:,} | {n_s:,} |" in md
    assert f"| MB at bf16 | {report.fmt(2 * n_t / 1e6)} | {report.fmt(2 * n_s / 1e6)} |" in md
    assert "| student/ | safetensors, bf16 |" in md


def test_gguf_formats_fail_before_training_for_a_non_llama_student():
    """The GGUF writer handles Llama only: a job asking a Qwen2 student for gguf-* stops
    before training (evaluate_before calls check_formats), not after it."""
    from transformers import LlamaConfig, Qwen2Config

    from kd import exports

    cfg = DistillConfig(export_formats=["gguf-q8_0"])
    with pytest.raises(exports.ExportError, match=r"export_formats: \['gguf-q8_0'\].*qwen2"):
        exports.check_formats(cfg, Qwen2Config())
    exports.check_formats(DistillConfig(export_formats=["ort-genai-int4"]), Qwen2Config())
    exports.check_formats(cfg, LlamaConfig())
