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
    model = plain_student(student)
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
