"""HTTP routes. Thin: validate, ask the registry, read files; never train in a request."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response

from jobs import caches
from jobs.paths import new_job_id, valid_job_id
from jobs.resume import resume_refused
from jobs.schemas import (
    ArtifactList,
    CacheDeleted,
    CacheInfo,
    CacheList,
    Health,
    JobPage,
    JobPublic,
    SubmitResponse,
)
from jobs.spec import DistillConfig
from jobs.states import TERMINAL, JobState
from jobs.storage import Storage
from serve_app.downloads import artifact_response
from serve_app.openapi import problems
from serve_app.preflight import http_problems
from serve_app.security import check_token, job_paths, policy_problems
from serve_app.service import Service, current


def authorized(request: Request, svc: Annotated[Service, Depends(current)]) -> Service:
    check_token(request, svc.settings)
    return svc


Svc = Annotated[Service, Depends(authorized)]
public = APIRouter()
router = APIRouter(responses=problems(401))


@public.get("/healthz", response_model=Health, tags=["ops"])
async def healthz(svc: Annotated[Service, Depends(current)]) -> Health:
    return Health(status="ok", registry=await svc.registry_alive())


@router.post(
    "/distill",
    status_code=202,
    response_model=SubmitResponse,
    tags=["jobs"],
    responses=problems(400, 409, 413),
)
async def distill(
    cfg: DistillConfig,
    svc: Svc,
    job_id: Annotated[str | None, Query(max_length=64, description="Resubmit/resume")] = None,
) -> SubmitResponse:
    """Queue a distillation job. Answers at once; the job runs as a Ray Job."""
    if job_id is not None and not valid_job_id(job_id):
        raise HTTPException(
            422,
            detail=[
                {
                    "loc": ["query", "job_id"],
                    "type": "value_error",
                    "msg": "job_id: 1-64 letters, digits, '-' or '_'",
                }
            ],
        )
    problems = policy_problems(cfg, svc.settings)
    if problems:
        raise HTTPException(
            422, detail=[{"loc": ["body", f], "msg": m, "type": "value_error"} for f, m in problems]
        )
    # Preflight (tokenizers, memory per worker) from config files only, before queueing.
    refused = await asyncio.to_thread(http_problems, cfg)
    if refused:
        raise HTTPException(422, detail=refused)
    job_id = job_id or new_job_id()
    paths = job_paths(svc.settings, job_id)
    config = cfg.model_dump(mode="json")
    # A resubmitted id resumes from its checkpoint: refuse a changed model or data before
    # anything is written (the schedule may change; the job logs what did).
    refused = await asyncio.to_thread(resume_refused, paths, config)
    if refused:
        raise HTTPException(409, detail=refused)
    # The registry writes config.json, and only for a new, failed or cancelled job.
    job, created = await svc.registry.create.remote(job_id, config)
    if not created:
        raise HTTPException(
            409,
            detail=f"job '{job_id}' exists and is {job['state']}: only a failed or cancelled "
            "job can be resubmitted; use another job_id (or none) for a new job",
        )
    return SubmitResponse(job_id=job_id, state=job["state"], status_url=f"/status/{job_id}")


async def job_or_404(svc: Service, job_id: str) -> dict:
    job_paths(svc.settings, job_id)  # validates the id
    job = await svc.registry.get.remote(job_id)
    if job is None:
        raise HTTPException(404, detail=f"no job '{job_id}'")
    return job


@router.get("/status/{job_id}", response_model=JobPublic, tags=["jobs"], responses=problems(404))
async def status(job_id: str, svc: Svc) -> JobPublic:
    return JobPublic(**(await job_or_404(svc, job_id)))


@router.get("/jobs", response_model=JobPage, tags=["jobs"])
async def list_jobs(
    svc: Svc,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    state: JobState | None = None,
) -> JobPage:
    jobs, total = await svc.registry.list.remote(offset, limit, state)
    return JobPage(jobs=[JobPublic(**j) for j in jobs], total=total, offset=offset, limit=limit)


@router.delete(
    "/jobs/{job_id}", response_model=JobPublic, tags=["jobs"], responses=problems(404, 409)
)
async def cancel(job_id: str, svc: Svc) -> JobPublic:
    """Stop the Ray Job (or drop it from the queue); the state becomes `cancelled`."""
    job = await job_or_404(svc, job_id)
    if job["state"] in TERMINAL:
        raise HTTPException(409, detail=f"job '{job_id}' already {job['state']}")
    try:
        return JobPublic(**(await svc.registry.cancel.remote(job_id)))
    except ValueError as e:  # a driver run by hand: Ray cannot stop it
        raise HTTPException(409, detail=str(getattr(e, "cause", None) or e)) from None


@router.get(
    "/artifacts/{job_id}",
    response_model=ArtifactList,
    tags=["artifacts"],
    responses=problems(404),
)
async def artifacts(job_id: str, svc: Svc) -> ArtifactList:
    await job_or_404(svc, job_id)
    paths = job_paths(svc.settings, job_id)
    return ArtifactList(job_id=job_id, artifacts=await asyncio.to_thread(paths.list_artifacts))


@router.get(
    "/download/{job_id}/{path:path}",
    tags=["artifacts"],
    response_class=FileResponse,  # for the docs; S3 answers with a StreamingResponse
    responses={200: {"content": {"application/octet-stream": {}}}} | problems(404),
)
async def download(job_id: str, path: str, request: Request, svc: Svc) -> Response:
    """Stream one artifact, with Content-Length; HTTP Range requests are honoured."""
    await job_or_404(svc, job_id)
    paths = job_paths(svc.settings, job_id)
    return await artifact_response(paths, path, request.headers.get("range"))


@router.get("/caches", response_model=CacheList, tags=["caches"])
async def list_caches(svc: Svc) -> CacheList:
    """The corpus and teacher-signal caches on the service's storage: what each holds,
    its size, the jobs that used it, and the active jobs that use it now."""
    found = await asyncio.to_thread(caches.list_caches, Storage(svc.settings.storage_root))
    in_use = await svc.registry.caches_in_use.remote()
    out = [CacheInfo(**c, **in_use.get(caches.check_name(c["kind"], c["key"]), {})) for c in found]
    return CacheList(caches=out, total_bytes=sum(c.bytes for c in out))


@router.delete(
    "/caches/{kind}/{key}",
    response_model=CacheDeleted,
    tags=["caches"],
    responses=problems(404, 409),
)
async def delete_cache(kind: str, key: str, svc: Svc) -> CacheDeleted:
    """Delete a cache to reclaim its space; refused (409) while an active job uses it.
    A later job that needs it builds it again."""
    try:
        caches.check_name(kind, key)
    except caches.CacheNameError as e:
        raise HTTPException(404, detail=f"no cache {kind[:40]}/{key[:40]}: {e}") from None
    try:
        freed = await svc.registry.delete_cache.remote(kind, key)
    except ValueError as e:  # registry.CacheInUse
        raise HTTPException(409, detail=str(getattr(e, "cause", None) or e)) from None
    if freed is None:
        raise HTTPException(404, detail=f"no cache {kind}/{key}")
    return CacheDeleted(kind=kind, key=key, bytes_freed=freed)
