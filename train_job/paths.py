"""Where a job's files live under the storage root (shared by train_job and serve_app).

<root>/registry/state.json         the job registry's persisted state
<root>/jobs/<job_id>/config.json   the DistillConfig the job was submitted with
<root>/jobs/<job_id>/artifacts/    everything the user downloads
<root>/ray/<job_id>/               Ray Train's run folder (checkpoints)
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def new_job_id() -> str:
    return "kd-" + uuid.uuid4().hex[:12]


def valid_job_id(job_id: str) -> bool:
    return bool(JOB_ID_RE.match(job_id))


class JobPaths:
    def __init__(self, root: str | Path, job_id: str):
        if not valid_job_id(job_id):
            raise ValueError(
                f"job id '{job_id}' is invalid: use 1-64 letters, digits, '-' or '_', "
                "starting with a letter or digit"
            )
        self.root = Path(root)
        self.job_id = job_id

    @property
    def job_dir(self) -> Path:
        return self.root / "jobs" / self.job_id

    @property
    def config(self) -> Path:
        return self.job_dir / "config.json"

    @property
    def artifacts(self) -> Path:
        return self.job_dir / "artifacts"

    def list_artifacts(self) -> list[dict]:
        """Regular files inside the artifact folder; symlinks and temp files never listed."""
        base = self.artifacts
        if not base.is_dir():
            return []
        real_base = base.resolve()
        out = []
        for p in sorted(base.rglob("*")):
            if p.is_symlink() or not p.is_file() or p.name.endswith(".tmp"):
                continue
            if not p.resolve().is_relative_to(real_base):  # reached through a linked folder
                continue
            out.append({"path": p.relative_to(base).as_posix(), "size": p.stat().st_size})
        return out

    @property
    def ray_storage(self) -> Path:
        return self.root / "ray"

    @property
    def run_dir(self) -> Path:
        return self.ray_storage / self.job_id


def registry_state_file(root: str | Path) -> Path:
    return Path(root) / "registry" / "state.json"
