"""Response bodies. Requests are `kd.config.DistillConfig` itself."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

JobState = Literal[
    "pending", "submitted", "running", "exporting", "succeeded", "failed", "cancelled"
]
TERMINAL = ("succeeded", "failed", "cancelled")


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


class Health(BaseModel):
    status: Literal["ok"]
    registry: bool
