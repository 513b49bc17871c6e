"""What every export format shares: the request a writer gets, the plain student,
atomic JSON, and the tokenizer files copied next to a runtime's model file."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from kd import models
from kd.config import DistillConfig


class ExportError(RuntimeError):
    """An export failed; the job fails with this message (drop the format from
    export_formats to run without it)."""


@dataclass
class ExportRequest:
    """Everything a format writer may use; `written` grows as formats are written."""

    student: nn.Module  # the plain fp32 student (LoRA merged, projection dropped)
    tokenizer: object
    cfg: DistillConfig
    out: Path  # the artifact folder; each format writes its own subfolder
    extra: dict = field(default_factory=dict)  # more keys for distill_config.json
    written: dict[str, Path] = field(default_factory=dict)  # format -> its folder or file
    scratch: Path | None = None  # a temporary fp32 student folder (see fp32_folder)

    def fp32_folder(self) -> Path:
        """A Hugging Face folder of the fp32 student, for tools that read one (the GenAI
        builder): the saved student when it is fp32, else a temporary copy (`cleanup`)."""
        saved = self.written.get("safetensors")
        if saved is not None:
            dtype = json.loads((saved / "config.json").read_text()).get("dtype", "float32")
            if dtype == "float32":
                return saved
        if self.scratch is None:
            self.scratch = Path(tempfile.mkdtemp(prefix="llm2slm-fp32-"))
            self.student.save_pretrained(self.scratch, safe_serialization=True)
            self.tokenizer.save_pretrained(self.scratch)
        return self.scratch

    def cleanup(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


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
    if "safetensors" in req.written:
        copy_tokenizer(req.written["safetensors"], dst)
    else:
        req.tokenizer.save_pretrained(dst)
        req.student.config.save_pretrained(dst)
