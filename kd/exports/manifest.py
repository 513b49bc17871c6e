"""`manifest.json`: every file of the artifact folder with its size and sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

from kd.exports.common import write_json


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
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
