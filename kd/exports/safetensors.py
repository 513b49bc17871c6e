"""`student/`: the merged student as a Hugging Face folder.

`model.safetensors` (LoRA folded in; the FitNets projection, which only served the
loss, is dropped) in the precision `save_dtype` resolves to (kd.exports.precision),
`config.json`, `generation_config.json`, the tokenizer files and `distill_config.json`
(the resolved job config, with `saved_dtype`). It loads back with
`AutoModelForCausalLM.from_pretrained(out / "student")` or `load_student` (fp32).
"""

from __future__ import annotations

from pathlib import Path

import torch

from kd.exports.common import ExportRequest, write_json
from kd.exports.precision import cast_for_saving, resolve_save_dtype

FORMAT = "safetensors"
DIR = "student"


def write(req: ExportRequest) -> Path:
    """Write the student, its tokenizer and the resolved config. Returns the folder."""
    folder = req.out / DIR
    folder.mkdir(parents=True, exist_ok=True)
    # The derived student keeps the teacher's name; say what it really is.
    req.student.config.name_or_path = "llm2slm-student"
    dtype, why = resolve_save_dtype(req.cfg)
    cast_for_saving(req.student, dtype).save_pretrained(folder, safe_serialization=True)
    req.tokenizer.save_pretrained(folder)
    extra = req.extra | {"saved_dtype": dtype, "saved_dtype_from": why}
    write_json(folder / "distill_config.json", req.cfg.model_dump(mode="json") | extra)
    return folder


@torch.no_grad()
def load_student(folder: str | Path):
    """(model, tokenizer) from a saved student folder, in fp32 whatever it was saved in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tok
