"""Exporting the trained student: one module per format behind one entry point.

    written = export(student, ["safetensors", "gguf-q8_0", "ort-genai-int4"], out,
                     tokenizer=tok, cfg=cfg)   # {format: its folder or file under out}

Modules:
    common       ExportRequest (what a writer gets), plain_student, write_json, tokenizer files
    safetensors  "safetensors": the merged student as a Hugging Face folder student/
                 (+ load_student), in the precision save_dtype resolves to (precision)
    onnx         "onnx-fp32": the logits as an fp32 ONNX graph, and OnnxLM (its runtime)
    int8         "int8-dynamic": the ONNX graph with ONNX Runtime dynamic INT8 weights
    manifest     manifest.json: every artifact file with its size and sha256
    gguf         "gguf-<type>": gguf/student-<type>.gguf for llama.cpp (F16, Q8_0, 4/5-bit)
    ort_genai    "ort-genai-<p>": ONNX Runtime GenAI models (fp32, INT8, INT4 weight-only)
    parity       logits parity, perplexity and agreement of an artifact vs the PyTorch student
    precision    save_dtype: the teacher's own precision, and the cast of the saved student

The names are kd.spec.EXPORT_FORMATS (what DistillConfig.export_formats accepts).

A format is one `write(req) -> path` function listed in WRITERS; formats are written
in the order given, and a later one may reuse an earlier one's folder (`req.written`).
`RUNTIMES` loads each format back with its own runtime or reader as a logits function
`(input_ids, attention_mask) -> logits`, for the job's round-trip check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

from torch import nn

from kd.config import EXPORT_FORMATS, GGUF_TYPES, DistillConfig
from kd.exports import gguf, int8, onnx, ort_genai, safetensors
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
    **{f"gguf-{q}": gguf.writer(q) for q in GGUF_TYPES},
    **{f"ort-genai-{p}": ort_genai.writer(p) for p in ort_genai.GENAI_PRECISIONS},
}
# What each exported path loads back as: a logits function (input_ids, attention_mask).
RUNTIMES: dict[str, Callable[[Path], Callable]] = {
    onnx.FORMAT: OnnxLM,
    int8.FORMAT: OnnxLM,
    **{f"gguf-{q}": gguf.GGUFRuntime for q in GGUF_TYPES},
    **{f"ort-genai-{p}": ort_genai.GenAIRuntime for p in ort_genai.GENAI_PRECISIONS},
}
if set(WRITERS) != set(EXPORT_FORMATS):  # the config's names and the writers must agree
    raise ImportError(f"kd.exports.WRITERS {sorted(WRITERS)} != EXPORT_FORMATS")

__all__ = [
    "RUNTIMES",
    "WRITERS",
    "ExportError",
    "ExportRequest",
    "OnnxLM",
    "check_formats",
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
    return [f for f in cfg.export_formats if f != safetensors.FORMAT]


def check_formats(cfg: DistillConfig, student_config) -> None:
    """Before training: fail now, not after it, when an export cannot be written for this
    student's architecture (GGUF: Llama only). Raises ExportError naming the field."""
    wanted = [f for f in cfg.export_formats if f.startswith("gguf-")]
    if not wanted:
        return
    try:
        gguf.check_architecture(student_config)
    except gguf.GGUFExportError as e:
        raise ExportError(
            f"export_formats: {wanted} cannot be written for this student: {e}; drop the "
            "gguf-* formats (ort-genai-* and safetensors cover other architectures)"
        ) from e


def export(
    student: nn.Module,
    formats: Iterable[str],
    out: str | Path,
    *,
    tokenizer: object,
    cfg: DistillConfig,
    extra: dict | None = None,
    written: dict[str, Path] | None = None,
    seconds: dict[str, float] | None = None,
) -> dict[str, Path]:
    """Write each format under `out`, in order. Returns {format: folder or file}.

    student: the trained student (a plain copy is made: LoRA merged, fp32, CPU).
    extra: more keys for the student's distill_config.json (e.g. kept_layers).
    written: folders of formats written by an earlier call, for reuse (tokenizer files).
    seconds: if given, gets each format's writing time.
    """
    formats = list(formats)
    unknown = [f for f in formats if f not in WRITERS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; known: {sorted(WRITERS)}")
    req = ExportRequest(
        plain_student(student), tokenizer, cfg, Path(out), extra or {}, dict(written or {})
    )
    try:
        for name in formats:
            t0 = time.perf_counter()
            req.written[name] = WRITERS[name](req)
            if seconds is not None:
                seconds[name] = time.perf_counter() - t0
    finally:
        req.cleanup()
    return {name: req.written[name] for name in formats}
