"""Exporting the trained student: one module per format behind one entry point.

    written = export(student, ["student", "onnx-fp32", "int8-dynamic"], out,
                     tokenizer=tok, cfg=cfg)          # {format: its folder under out}

Modules:
    common       ExportRequest (what a writer gets), plain_student, write_json, tokenizer files
    safetensors  "student": the merged student as a Hugging Face folder (+ load_student)
    onnx         "onnx-fp32": the logits as an fp32 ONNX graph, and OnnxLM (its runtime)
    int8         "int8-dynamic": the ONNX graph with ONNX Runtime dynamic INT8 weights
    manifest     manifest.json: every artifact file with its size and sha256
    gguf         GGUF files for llama.cpp (F16, Q8_0, 4/5-bit) and their round-trip check
    ort_genai    ONNX Runtime GenAI models (fp32, INT8, INT4 weight-only) via its builder
    parity       logits parity, perplexity and agreement of an artifact vs the PyTorch student

gguf and ort_genai are not in WRITERS yet (a job cannot ask for them until the config's
export_formats field lands); bench/formats.py writes and measures them today.

A format is one `write(req) -> folder` function listed in WRITERS; formats are written
in the order given, and a later one may reuse an earlier one's folder (`req.written`).
`RUNTIMES` names the formats the pipeline can load back to measure parity and speed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from torch import nn

from kd.config import DistillConfig
from kd.exports import int8, onnx, safetensors
from kd.exports.common import (
    ExportError,
    ExportRequest,
    Writer,
    plain_student,
    write_json,
)
from kd.exports.manifest import sha256_file, write_manifest
from kd.exports.onnx import OnnxLM
from kd.exports.safetensors import load_student

WRITERS: dict[str, Writer] = {
    safetensors.FORMAT: safetensors.write,
    onnx.FORMAT: onnx.write,
    int8.FORMAT: int8.write,
}
# Formats whose folder loads back as a logits function (input_ids, attention_mask).
RUNTIMES: dict[str, Callable[[Path], Callable]] = {
    onnx.FORMAT: OnnxLM,
    int8.FORMAT: OnnxLM,
}

__all__ = [
    "RUNTIMES",
    "WRITERS",
    "ExportError",
    "ExportRequest",
    "OnnxLM",
    "export",
    "formats_for",
    "load_student",
    "plain_student",
    "sha256_file",
    "write_json",
    "write_manifest",
]


def formats_for(cfg: DistillConfig) -> list[str]:
    """The formats a job asks for beside the student folder, in writing order."""
    wanted = {onnx.FORMAT: cfg.export_onnx, int8.FORMAT: cfg.post_training_quant}
    return [name for name, on in wanted.items() if on]


def export(
    student: nn.Module,
    formats: Iterable[str],
    out: str | Path,
    *,
    tokenizer: object,
    cfg: DistillConfig,
    extra: dict | None = None,
    written: dict[str, Path] | None = None,
) -> dict[str, Path]:
    """Write each format under `out`, in order. Returns {format: folder} of this call.

    student: the trained student (a plain copy is made: LoRA merged, fp32, CPU).
    extra: more keys for the student's distill_config.json (e.g. kept_layers).
    written: folders of formats written by an earlier call, for reuse (tokenizer files).
    """
    formats = list(formats)
    unknown = [f for f in formats if f not in WRITERS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; known: {sorted(WRITERS)}")
    req = ExportRequest(
        plain_student(student), tokenizer, cfg, Path(out), extra or {}, dict(written or {})
    )
    for name in formats:
        req.written[name] = WRITERS[name](req)
    return {name: req.written[name] for name in formats}
