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


class Problem(BaseModel):
    """Every 4xx other than 422 (400, 401, 404, 409, 413) carries one message."""

    detail: str


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error codes a route can answer with."""
    words = {
        400: "the body is not valid JSON",
        401: "missing or wrong API token",
        404: "no such job or artifact",
        409: "the job already ended",
        413: "request body too large",
    }
    return {c: {"model": Problem, "description": words[c]} for c in codes}


def json_problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`problems` for a route whose success is not JSON (the HTML report page): FastAPI
    would document a `model` under the route's own media type, but errors stay JSON."""
    ref = {"$ref": "#/components/schemas/Problem"}
    return {
        c: {"description": v["description"], "content": {"application/json": {"schema": ref}}}
        for c, v in problems(*codes).items()
    }
