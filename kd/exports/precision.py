"""The precision the student is saved in (`save_dtype`), and the teacher's own.

`auto` saves the student in the teacher's precision, read from where the teacher comes
from (training itself runs in fp32 on CPU whatever the source says):
* a Hugging Face folder or hub id: its config.json `dtype` (`torch_dtype` in older
  files); a config without one counts as fp32;
* a GGUF file (the embedded teacher among them): F32 -> fp32, F16 -> fp16, BF16 -> bf16;
  a quantized file (the embedded SmolLM2 is Q4_1) -> fp16, because GGUF's block scales
  are fp16 and fp16 is the 16-bit type llama.cpp dequantizes to. No float type holds a
  4-bit weight at its own size; the size table puts both models at that precision.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from kd import models
from kd.config import DistillConfig
from kd.exports.common import ExportError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_HF_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_GGUF_FLOAT = {0: "fp32", 1: "fp16", 32: "bf16"}  # general.file_type (LlamaFileType)
FP16_MAX = 65504.0


def teacher_precision(name: str) -> tuple[str, str]:
    """(fp32|bf16|fp16, why) for a teacher name as DistillConfig.teacher_model takes it."""
    src = models.resolve_source(name)
    if src.kind == "gguf":
        from kd.model_files import gguf_metadata

        kv, _ = gguf_metadata(src.location)
        ft = kv.get("general.file_type")
        if ft in _GGUF_FLOAT:
            return _GGUF_FLOAT[ft], f"GGUF file type {ft}"
        return "fp16", f"quantized GGUF (file type {ft}); its block scales are fp16"
    from transformers import PretrainedConfig

    cfg, _ = PretrainedConfig.get_config_dict(src.location)
    raw = cfg.get("dtype") or cfg.get("torch_dtype")
    if raw in _HF_NAMES:
        return _HF_NAMES[raw], f"config.json dtype {raw}"
    return "fp32", f"config.json dtype {raw!r}: counted as fp32"


def resolve_save_dtype(cfg: DistillConfig) -> tuple[str, str]:
    """(dtype, why) the student is saved in: save_dtype, or the teacher's when auto."""
    if cfg.save_dtype != "auto":
        return cfg.save_dtype, "save_dtype"
    try:
        dtype, why = teacher_precision(cfg.teacher_model)
    except Exception as e:  # an unreadable source must not lose a trained student
        log.warning("teacher precision unknown (%s); saving the student in fp32", e)
        return "fp32", f"teacher precision unknown: {e}"
    return dtype, f"the teacher's ({why})"


def cast_for_saving(model: nn.Module, dtype: str) -> nn.Module:
    """A copy of the fp32 `model` in `dtype`; refuses fp16 for weights it cannot hold."""
    if dtype == "fp32":
        return model
    if dtype == "fp16":
        big = {n: float(p.detach().abs().max()) for n, p in model.named_parameters()}
        over = {n: v for n, v in big.items() if v > FP16_MAX}
        if over:
            name, value = next(iter(over.items()))
            raise ExportError(
                f"save_dtype: fp16 cannot hold {name} (|w| up to {value:.3g} > 65504); "
                "set save_dtype=bf16 or fp32"
            )
    out = copy.deepcopy(model).to(DTYPES[dtype])
    out.config.dtype = DTYPES[dtype]
    return out
