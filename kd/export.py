"""Saving the trained student as a model people can load.

`save_student(run_or_model, tokenizer, cfg, out_dir)` writes `student/`:
merged `model.safetensors` (LoRA folded in; the FitNets projection, which only served
the loss, is dropped), `config.json`, `generation_config.json`, the tokenizer files and
`distill_config.json` (the resolved job config). It loads back with
`AutoModelForCausalLM.from_pretrained(out_dir / "student")`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from kd import models
from kd.config import DistillConfig

STUDENT_DIR = "student"


def plain_student(student: nn.Module) -> nn.Module:
    """A detached fp32 copy of the student with any LoRA adapters merged in."""
    m = copy.deepcopy(student).to("cpu").float()
    m = models.merged(m)
    m.eval()
    m._llm2slm_plain = True
    return m


def write_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def save_student(
    student: nn.Module,
    tokenizer,
    cfg: DistillConfig,
    out_dir: str | Path,
    *,
    extra: dict | None = None,
) -> Path:
    """Write the merged student, its tokenizer and the resolved config. Returns the folder."""
    folder = Path(out_dir) / STUDENT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    model = student if getattr(student, "_llm2slm_plain", False) else plain_student(student)
    # The derived student keeps the teacher's name; say what it really is.
    model.config.name_or_path = "llm2slm-student"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    write_json(folder / "distill_config.json", cfg.model_dump(mode="json") | (extra or {}))
    return folder


@torch.no_grad()
def load_student(folder: str | Path):
    """(model, tokenizer) from a saved student folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tok


# ---------------------------------------------------------------------------------
# ONNX and INT8
# ---------------------------------------------------------------------------------
ONNX_DIR = "onnx"
INT8_DIR = "int8-dynamic"
ONNX_FILE = "model.onnx"
# Single-file ONNX protobufs are capped at 2 GB; above this, weights go to external data.
EXTERNAL_DATA_BYTES = 1 << 30


class ExportError(RuntimeError):
    """An export failed; the job fails with this message unless export_onnx=false."""


class _LogitsOnly(nn.Module):
    """(input_ids [B, L], attention_mask [B, L]) -> logits [B, L, V], no KV cache."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export_onnx(model: nn.Module, out_file: Path, seq_len: int = 16) -> Path:
    """Export logits(input_ids, attention_mask) with dynamic batch and sequence axes.

    Uses the TorchScript exporter (opset 17) on eager attention, which needs no extra
    packages; weights move to external data (`model.onnx.data`) for large models.
    """
    import onnx

    m = copy.deepcopy(model).float().eval()
    if hasattr(m, "set_attn_implementation"):
        m.set_attn_implementation("eager")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.ones((2, seq_len), dtype=torch.long)
    mask = torch.ones_like(ids)
    axes = {0: "batch", 1: "sequence"}
    try:
        with torch.no_grad():
            torch.onnx.export(
                _LogitsOnly(m),
                (ids, mask),
                str(out_file),
                dynamo=False,
                opset_version=17,
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": axes},
            )
    except Exception as e:
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {e}") from e
    n_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    if n_bytes > EXTERNAL_DATA_BYTES:
        proto = onnx.load(str(out_file))
        onnx.save_model(
            proto,
            str(out_file),
            save_as_external_data=True,
            location=out_file.name + ".data",
            all_tensors_to_one_file=True,
        )
    return out_file


def quantize_onnx_int8(src: Path, dst: Path) -> Path:
    """ONNX Runtime dynamic quantization: INT8 weights, activations quantized per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        use_external_data_format=(src.with_name(src.name + ".data")).exists(),
    )
    return dst


class OnnxLM:
    """A saved ONNX student: `OnnxLM(folder)(input_ids, attention_mask) -> logits`.

    The folder holds model.onnx and the tokenizer files, so it loads on its own:
        lm = OnnxLM("artifacts/int8-dynamic"); tok = lm.tokenizer()
    """

    def __init__(self, folder: str | Path, threads: int = 0):
        import onnxruntime as ort

        self.folder = Path(folder)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(self.folder / ONNX_FILE), opts, providers=["CPUExecutionProvider"]
        )

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.session.run(
            None,
            {
                "input_ids": input_ids.cpu().numpy().astype("int64"),
                "attention_mask": attention_mask.cpu().numpy().astype("int64"),
            },
        )[0]
        return torch.from_numpy(out)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder)


@torch.no_grad()
def logits_parity(reference, candidate, batches) -> dict[str, float]:
    """Max |Δlogit| over real tokens and top-1 agreement of two logits functions."""
    max_diff, agree, count = 0.0, 0, 0
    for ids, mask in batches:
        a, b = reference(ids, mask).float(), candidate(ids, mask).float()
        real = mask.bool()
        max_diff = max(max_diff, float((a - b).abs()[real].max()))
        agree += int((a.argmax(-1) == b.argmax(-1))[real].sum())
        count += int(real.sum())
    return {"max_abs_logit_diff": max_diff, "top1_agreement": agree / max(count, 1)}


def _copy_tokenizer(student_dir: Path, dst: Path) -> None:
    import shutil

    for f in student_dir.iterdir():
        if f.name.startswith(
            ("tokenizer", "special_tokens", "chat_template", "vocab", "merges")
        ) or f.name in ("config.json", "generation_config.json"):
            shutil.copy2(f, dst / f.name)


# ---------------------------------------------------------------------------------
# Manifest and model card
# ---------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> Path:
    """manifest.json: every file under `folder` with its size and sha256."""
    files = []
    for p in sorted(folder.rglob("*")):
        if (
            p.is_file()
            and not p.is_symlink()
            and p.name != "manifest.json"
            and not p.name.endswith(".tmp")
        ):
            files.append(
                {
                    "path": p.relative_to(folder).as_posix(),
                    "size": p.stat().st_size,
                    "sha256": sha256_file(p),
                }
            )
    write_json(folder / "manifest.json", {"files": files})
    return folder / "manifest.json"
