"""The HTTP API's response bodies, shared by the server and the client.

Requests are `kd.config.DistillConfig` itself (see jobs.spec).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from jobs.caches import CacheKind
from jobs.states import JobState


class JobPublic(BaseModel):
    job_id: str
    state: JobState
    created_at: float
    updated_at: float
    step: int | None = None
    total_steps: int | None = None
    eta_s: float | None = None
    metrics: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    error: str | None = None
    attempt: int = 0
    resumed_from_step: int | None = None
    config: dict[str, Any] | None = None


class SubmitResponse(BaseModel):
    job_id: str
    state: JobState
    status_url: str


class JobPage(BaseModel):
    jobs: list[JobPublic]
    total: int
    offset: int
    limit: int


class Artifact(BaseModel):
    path: str
    size: int


class ArtifactList(BaseModel):
    job_id: str
    artifacts: list[Artifact]


class CacheUse(BaseModel):
    job_id: str
    built: bool  # this job built the cache (the others read it)
    time: float


class CacheInfo(BaseModel):
    """One cache on the service's storage (jobs.caches.describe)."""

    kind: CacheKind
    key: str
    complete: bool  # False: being built now, or a build that died (delete it)
    teacher: str | None = None  # teacher_signal caches
    corpus: str | None = None  # the dataset (corpus) or the corpus key (teacher_signal)
    mode: str | None = None  # teacher_signal: 'exact' or 'topk'
    tokens: int | None = None
    bytes: int  # size on storage
    files: int
    created_at: float | None = None
    jobs: list[CacheUse]  # every job that used it, oldest first
    in_use_by: list[str] = []  # active jobs reading it: DELETE answers 409
    building_by: list[str] = []  # the active job building it


class CacheList(BaseModel):
    caches: list[CacheInfo]
    total_bytes: int


class CacheDeleted(BaseModel):
    kind: CacheKind
    key: str
    bytes_freed: int


class Health(BaseModel):
    status: Literal["ok"]
    registry: bool


class Problem(BaseModel):
    """Every 4xx other than 422 (400, 401, 404, 409, 413) carries one message."""

    detail: str
