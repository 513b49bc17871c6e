"""`student/`: the merged student as a Hugging Face folder.

`model.safetensors` (LoRA folded in; the FitNets projection, which only served the
loss, is dropped), `config.json`, `generation_config.json`, the tokenizer files and
`distill_config.json` (the resolved job config). It loads back with
`AutoModelForCausalLM.from_pretrained(out / "student")` or `load_student`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kd.exports.common import ExportRequest, write_json

FORMAT = "student"
DIR = "student"


def write(req: ExportRequest) -> Path:
    """Write the student, its tokenizer and the resolved config. Returns the folder."""
    folder = req.out / DIR
    folder.mkdir(parents=True, exist_ok=True)
    model = req.student
    # The derived student keeps the teacher's name; say what it really is.
    model.config.name_or_path = "llm2slm-student"
    model.save_pretrained(folder, safe_serialization=True)
    req.tokenizer.save_pretrained(folder)
    write_json(folder / "distill_config.json", req.cfg.model_dump(mode="json") | req.extra)
    return folder


@torch.no_grad()
def load_student(folder: str | Path):
    """(model, tokenizer) from a saved student folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tok
