"""GGUF export: tiny Llama students -> GGUF -> transformers' GGUF reader -> parity.

The models use a realistic init scale (0.02), so logits have the magnitude of a trained
small model's and the F16 bound of the issue (max |Δlogit| < 1e-2) is meaningful.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

# Each test writes a file and reads it back with its own runtime (seconds to minutes).
pytestmark = pytest.mark.slow

gguf = pytest.importorskip("gguf")
kg = pytest.importorskip("kd.exports.gguf")


@pytest.fixture(scope="module")
def small(small_llama):
    return small_llama


@pytest.fixture(scope="module")
def blocks():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 49152, (2, 24), generator=g)


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_permute_matches_transformers_reverse(small):
    """Our Q/K permutation is the exact inverse of the one transformers' reader undoes."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(4 * 16, 64)
    for n_head, n_kv in ((4, 4), (4, 2)):
        rows = w[: n_kv * 16] if n_kv != n_head else w
        p = kg.permute_qk(rows, n_head, n_kv)
        proc = LlamaTensorProcessor({"num_attention_heads": n_head, "num_key_value_heads": n_kv})
        back = proc._reverse_permute_weights(p.numpy(), n_head, n_kv)
        assert np.array_equal(back, rows.numpy())
        assert not torch.equal(p, rows)


def test_f16_roundtrip_parity_and_metadata(small, blocks, tmp_path, tokenizer):
    f = kg.write_gguf(small, tmp_path / "m-f16.gguf", "f16")
    row = kg.check_gguf(f, _load(small), blocks)
    assert row["max_abs_logit_diff"] < 1e-2
    assert row["top1_agreement"] >= 0.99
    assert re.fullmatch(r"[0-9a-f]{64}", row["sha256"]) and row["bytes"] == f.stat().st_size

    r = gguf.GGUFReader(f)
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight"} <= names
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.0.ffn_up.weight"] == "F16"
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("llama.attention.head_count_kv") == 2
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "smollm"
    assert len(r.fields["tokenizer.ggml.tokens"].data) == 49152
    assert len(r.fields["tokenizer.ggml.merges"].data) > 40000
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert "im_start" in field("tokenizer.chat_template")


def test_q8_0_roundtrip_perplexity_within_1pct(small, blocks, tmp_path):
    q8 = kg.check_gguf(kg.write_gguf(small, tmp_path / "m.gguf", "q8_0"), _load(small), blocks)
    assert abs(q8["ppl_ratio"] - 1) < 0.01
    assert q8["top1_agreement"] >= 0.9


def test_q4_0_roundtrip(small, blocks, tmp_path):
    f = kg.write_gguf(small, tmp_path / "m.gguf", "q4_0")
    q4 = kg.check_gguf(f, _load(small), blocks)
    # near-flat logits of a random model flip easily; a broken layout gives ~1/V agreement
    assert q4["top1_agreement"] >= 0.3
    assert abs(q4["ppl_ratio"] - 1) < 0.05
    w = torch.zeros(64, 64)
    assert kg._tensor_type("blk.0.ffn_up.weight", w, "q4_0").name == "Q4_0"
    assert kg._tensor_type("token_embd.weight", w, "q4_0").name == "Q8_0"  # = the tied head
    assert kg._tensor_type("blk.0.attn_norm.weight", w[0], "q4_0").name == "F32"


def test_width_pruned_untied_lora_merged_student(tmp_path, tokenizer, blocks):
    """Another shape (3 heads of 16 over hidden 48, explicit untied lm_head), written from
    an in-memory LoRA-merged model: nothing assumes the teacher's shape."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256,
        tie_word_embeddings=False, initializer_range=0.02, rope_theta=10000.0,
    )  # fmt: skip
    base = LlamaForCausalLM(cfg).eval()
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "k_proj"]))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    merged = peft.merge_and_unload().eval()
    f = kg.write_gguf(merged, tmp_path / "w.gguf", "f16", tokenizer=tokenizer)
    # rows of 80 do not split into 32-wide Q8_0 blocks: ffn_down would fall back to F16
    down = merged.model.layers[0].mlp.down_proj.weight
    assert kg._tensor_type("blk.0.ffn_down.weight", down, "q8_0") == gguf.GGMLQuantizationType.F16
    # had output.weight been left out, the reader would tie the head and parity would fail
    row = kg.check_gguf(f, merged, blocks)
    assert row["max_abs_logit_diff"] < 1e-2 and row["top1_agreement"] >= 0.99


def test_rejects_what_llama_cpp_cannot_name(small, tmp_path):
    model = _load(small)
    state = model.state_dict() | {"proj.weight": torch.zeros(2, 2)}
    with pytest.raises(kg.GGUFExportError, match="proj.weight"):
        kg.gguf_tensors(state, model.config)
    with pytest.raises(kg.GGUFExportError, match="not one of"):
        kg.write_gguf(small, tmp_path / "x.gguf", "q4_k")


def test_width_pruned_student_exports_through_the_job_writers(small, tokenizer, blocks, tmp_path):
    """A kd.width student (hidden 48 but 2 heads of the teacher's head_dim 16, so
    heads·head_dim != hidden; 1 KV head) written by the job's gguf-f16 / gguf-q8_0
    writers and read back by their runtime (transformers' GGUF reader)."""
    from kd import exports
    from kd.config import DistillConfig
    from kd.shapes import Shape
    from kd.width import importance, prune, select

    teacher = _load(small)
    calib = [{"input_ids": blocks, "attention_mask": torch.ones_like(blocks)}]
    keep = select(importance(teacher, calib), [0, 1], Shape(2, 48, 96, 2, 1), kv_total=2)
    student = prune(teacher, keep).eval()
    assert student.config.head_dim * student.config.num_attention_heads != 48
    cfg = DistillConfig(teacher_model=str(small), export_formats=["gguf-f16", "gguf-q8_0"])
    paths = exports.export(
        student, ["gguf-f16", "gguf-q8_0"], tmp_path, tokenizer=tokenizer, cfg=cfg
    )
    assert paths["gguf-q8_0"] == tmp_path / "gguf" / "student-q8_0.gguf"
    mask = torch.ones_like(blocks)
    with torch.no_grad():
        want = student(input_ids=blocks, attention_mask=mask).logits
    # the f16 file through the job's runtime; the q8_0 one through check_gguf (each read
    # of a file parses its 49k-token vocabulary twice: ~5 s)
    got = exports.RUNTIMES["gguf-f16"](paths["gguf-f16"])(blocks, mask)
    assert float((got - want).abs().max()) < 1e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.99
    row = kg.check_gguf(paths["gguf-q8_0"], student, blocks)
    assert abs(row["ppl_ratio"] - 1) < 0.01 and row["top1_agreement"] >= 0.9
