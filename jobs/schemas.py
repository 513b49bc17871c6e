"""The HTTP API's response bodies, shared by the server and the client.

Requests are `kd.config.DistillConfig` itself (see jobs.spec).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

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


class Health(BaseModel):
    status: Literal["ok"]
    registry: bool


class Problem(BaseModel):
    """Every 4xx other than 422 (400, 401, 404, 409, 413) carries one message."""

    detail: str
