"""What every export format shares: the request a writer gets, the plain student,
atomic JSON, and the tokenizer files copied next to a runtime's model file."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from kd import models
from kd.config import DistillConfig


class ExportError(RuntimeError):
    """An export failed; the job fails with this message unless export_onnx=false."""


@dataclass
class ExportRequest:
    """Everything a format writer may use; `written` grows as formats are written."""

    student: nn.Module  # the plain fp32 student (LoRA merged, projection dropped)
    tokenizer: object
    cfg: DistillConfig
    out: Path  # the artifact folder; each format writes its own subfolder
    extra: dict = field(default_factory=dict)  # more keys for distill_config.json
    written: dict[str, Path] = field(default_factory=dict)  # format -> its folder


Writer = Callable[[ExportRequest], Path]  # writes one format, returns its folder


def plain_student(student: nn.Module) -> nn.Module:
    """A detached fp32 copy of the student with any LoRA adapters merged in."""
    if getattr(student, "_llm2slm_plain", False):
        return student
    m = copy.deepcopy(student).to("cpu").float()
    m = models.merged(m)
    m.eval()
    m._llm2slm_plain = True
    return m


def write_json(path: Path, data: object) -> None:
    """Write to a temp file, then rename: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def copy_tokenizer(student_dir: Path, dst: Path) -> None:
    """The tokenizer and model config files of the student folder, copied into dst."""
    for f in student_dir.iterdir():
        if f.name.startswith(
            ("tokenizer", "special_tokens", "chat_template", "vocab", "merges")
        ) or f.name in ("config.json", "generation_config.json"):
            shutil.copy2(f, dst / f.name)


def tokenizer_files(req: ExportRequest, dst: Path) -> None:
    """Tokenizer and config next to a runtime's model file, so the folder loads alone."""
    if "student" in req.written:
        copy_tokenizer(req.written["student"], dst)
    else:
        req.tokenizer.save_pretrained(dst)
        req.student.config.save_pretrained(dst)
