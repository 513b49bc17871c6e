"""`onnx/`: the student's logits as an fp32 ONNX graph (dynamic batch and sequence
axes, no KV cache) with its tokenizer, and `OnnxLM`, the ONNX Runtime that runs it (and
the INT8 graph of kd/exports/int8.py).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from kd.exports.common import ExportError, ExportRequest, tokenizer_files

FORMAT = "onnx-fp32"
DIR = "onnx"
ONNX_FILE = "model.onnx"
# Single-file ONNX protobufs are capped at 2 GB; above this, weights go to external data.
EXTERNAL_DATA_BYTES = 1 << 30


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


def write(req: ExportRequest) -> Path:
    """The fp32 graph and the tokenizer in `onnx/`; returns the folder."""
    folder = req.out / DIR
    export_onnx(req.student, folder / ONNX_FILE)
    tokenizer_files(req, folder)
    return folder


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
