"""The storage layout: where a job's files live under the storage root.

<root>/registry/state.json         the job registry's persisted state
<root>/jobs/<job_id>/config.json   the DistillConfig the job was submitted with
<root>/jobs/<job_id>/artifacts/    everything the user downloads
<root>/ray/<job_id>/               Ray Train's run folder (checkpoints)

The root is a shared folder or s3://bucket/prefix (see jobs.storage). The `*_key`
attributes work for both; the Path properties only for a folder.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from jobs.storage import Storage

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
REGISTRY_STATE_KEY = "registry/state.json"
RAY_KEY = "ray"
# A job with a parameter budget: its shape search's candidates and winner, in artifacts
SHAPE_SEARCH_FILE = "shape_search.json"


def new_job_id() -> str:
    return "kd-" + uuid.uuid4().hex[:12]


def valid_job_id(job_id: str) -> bool:
    return bool(JOB_ID_RE.match(job_id))


class JobPaths:
    def __init__(self, root: str | Path | Storage, job_id: str):
        if not valid_job_id(job_id):
            raise ValueError(
                f"job id '{job_id}' is invalid: use 1-64 letters, digits, '-' or '_', "
                "starting with a letter or digit"
            )
        self.storage = root if isinstance(root, Storage) else Storage(root)
        self.job_id = job_id
        self.job_key = f"jobs/{job_id}"
        self.config_key = f"{self.job_key}/config.json"
        self.error_key = f"{self.job_key}/error.json"
        self.artifacts_key = f"{self.job_key}/artifacts"

    @property
    def root(self) -> str:
        """The storage root as a path or s3:// URI."""
        return self.storage.root

    def artifact_key(self, rel: str) -> str:
        return f"{self.artifacts_key}/{rel}"

    def list_artifacts(self) -> list[dict]:
        """Regular files inside the artifact folder; symlinks and temp files never listed."""
        return self.storage.list_files(self.artifacts_key)

    @property
    def artifacts(self) -> Path:
        """The artifact folder as a local path (a shared-folder root only)."""
        return self.storage.local_path(self.artifacts_key)
