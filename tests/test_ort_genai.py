"""ONNX Runtime GenAI export: tiny Llama -> model builder -> og.Model -> parity.

Each build runs the builder in a subprocess (~25 s on a busy 2-core machine, mostly
imports), so each precision is one test.
"""

from __future__ import annotations

import json

import pytest
import torch

# Each test writes a file and reads it back with its own runtime (seconds to minutes).
pytestmark = pytest.mark.slow

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnx_ir")
og_export = pytest.importorskip("kd.exports.ort_genai")


@pytest.fixture(scope="module")
def small(small_llama):
    return small_llama


@pytest.fixture(scope="module")
def student(small):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(small, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def blocks():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 49152, (2, 24), generator=g)


def test_fp32_logits_and_greedy_generation_match_torch(small, student, blocks, tmp_path):
    out = og_export.build_genai(small, tmp_path / "fp32", "fp32")
    assert (out / "model.onnx").is_file() and (out / "tokenizer.json").is_file()
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["num_key_value_heads"] == 2
    row = og_export.check_genai(out, student, blocks)
    assert row["max_abs_logit_diff"] < 1e-3
    assert row["top1_agreement"] >= 0.99
    assert set(row["sha256"]) >= {"model.onnx", "model.onnx.data", "genai_config.json"}

    lm = og_export.GenAILM(out)
    g_tokens, _ = lm.generate(blocks[0, :8], 12)
    t_tokens, _ = og_export.torch_generate(student, blocks[0, :8], 12)
    assert len(g_tokens) == 12 and og_export.greedy_match(g_tokens, t_tokens) >= 0.9


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_weight_only_quantized(small, student, blocks, tmp_path, precision):
    out = og_export.build_genai(small, tmp_path / precision, precision)
    import onnx

    ops = {n.op_type for n in onnx.load(out / "model.onnx", load_external_data=False).graph.node}
    assert "MatMulNBits" in ops
    row = og_export.check_genai(out, student, blocks)
    fp32_bytes = sum(p.numel() for p in student.parameters()) * 4
    if precision == "int4":  # the tied embedding is stored once, as INT4 (GatherBlockQuantized)
        assert "GatherBlockQuantized" in ops and row["model_bytes"] < 0.3 * fp32_bytes
    else:  # GatherBlockQuantized is INT4-only: INT8 keeps an fp32 embedding beside an INT8 head
        assert "GatherBlockQuantized" not in ops
    # a random tiny model's logits are near-flat; a broken graph gives ~1/V agreement
    assert row["top1_agreement"] >= (0.3 if precision == "int4" else 0.6)
    assert abs(row["ppl_ratio"] - 1) < (0.05 if precision == "int4" else 0.02)


def test_builder_failure_is_reported(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(og_export.GenAIExportError, match="failed with exit code"):
        og_export.build_genai(tmp_path / "bad", tmp_path / "out", "fp32", timeout_s=120)
    with pytest.raises(og_export.GenAIExportError, match="not one of"):
        og_export.build_genai(tmp_path / "bad", tmp_path / "out", "int2")
