"""The job registry: a detached, named, restartable Ray actor that owns job state.

It persists every change to `<storage>/registry/state.json` (write to a temp file,
then rename; one PUT on S3) and reloads it when Ray restarts it. A background loop (every
`poll_interval_s`) starts pending jobs in submission order while fewer than
`max_concurrent_jobs` are active, and reconciles with Ray's own job status so that a
driver that crashed shows `failed`, never `running` forever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import ray

from jobs.paths import REGISTRY_STATE_KEY
from jobs.states import ACTIVE, RESUBMITTABLE, TERMINAL
from jobs.storage import Storage
from serve_app.launcher import JobLauncher
from serve_app.metrics import JobMetrics
from serve_app.settings import Settings

log = logging.getLogger(__name__)
# Fields a job itself may set through `update`.
JOB_FIELDS = {
    "state",
    "step",
    "total_steps",
    "eta_s",
    "metrics",
    "summary",
    "error",
    "artifacts",
    "started_at",
    "finished_at",
    "resumed_from_step",
    "before",
}


class JobRegistry:
    def __init__(self, settings: dict[str, Any]):
        self.settings = Settings(**settings)
        self.storage = Storage(self.settings.storage_root)
        self.jobs: dict[str, dict[str, Any]] = {}
        self._loop: asyncio.Task | None = None
        self._tick_lock: asyncio.Lock | None = None
        self.launcher = JobLauncher(self.settings)
        self.metrics = JobMetrics()  # gauges for the Ray dashboard / Prometheus
        self._load()
        self.metrics.observe(self.jobs.values())

    # ---- persistence ----------------------------------------------------------
    def _load(self) -> None:
        if self.storage.is_file(REGISTRY_STATE_KEY):
            data = json.loads(self.storage.read_bytes(REGISTRY_STATE_KEY))
            self.jobs = {j["job_id"]: j for j in data.get("jobs", [])}
            where = self.storage.uri(REGISTRY_STATE_KEY)
            log.info("registry reloaded %d jobs from %s", len(self.jobs), where)

    def _save(self) -> None:
        data = json.dumps({"jobs": list(self.jobs.values())}, default=str)
        self.storage.write_bytes(REGISTRY_STATE_KEY, data.encode())
        self.metrics.observe(self.jobs.values())

    def _ensure_loop(self) -> None:
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self._run_loop())

    async def _run_loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # keep scheduling whatever one pass hit
                log.exception("registry tick failed")
            self.metrics.observe(self.jobs.values())  # gauges fade unless re-set
            await asyncio.sleep(self.settings.poll_interval_s)

    # ---- API --------------------------------------------------------------------
    async def ping(self) -> bool:
        self._ensure_loop()
        return True

    async def create(self, job_id: str, config: dict[str, Any]) -> tuple[dict, bool]:
        """Register a job (pending). Returns (record, created). An existing job that
        failed or was cancelled is queued again and resumes from its checkpoint."""
        self._ensure_loop()
        now = time.time()
        job = self.jobs.get(job_id)
        if job is not None:
            if job["state"] not in RESUBMITTABLE:
                return job, False
            job.update(
                state="pending",
                attempt=job.get("attempt", 0) + 1,
                error=None,
                updated_at=now,
                config=config,
            )
        else:
            job = {
                "job_id": job_id,
                "state": "pending",
                "created_at": now,
                "updated_at": now,
                "config": config,
                "attempt": 0,
                "total_steps": config.get("max_steps"),
            }
            self.jobs[job_id] = job
        self._save()
        # Start it in the background: the HTTP request must not wait on Ray's job API.
        asyncio.get_running_loop().create_task(self.tick())
        return job, True

    async def update(self, job_id: str, fields: dict[str, Any]) -> dict | None:
        job = self.jobs.get(job_id)
        if job is None:
            return None
        if job["state"] in TERMINAL:
            return job  # final: late progress from a cancelled or crashed driver is ignored
        job.update({k: v for k, v in fields.items() if k in JOB_FIELDS})
        job["updated_at"] = time.time()
        self._save()
        return job

    async def get(self, job_id: str) -> dict | None:
        self._ensure_loop()
        return self.jobs.get(job_id)

    async def list(self, offset: int = 0, limit: int = 50, state: str | None = None):
        self._ensure_loop()
        jobs = sorted(self.jobs.values(), key=lambda j: j["created_at"], reverse=True)
        if state:
            jobs = [j for j in jobs if j["state"] == state]
        return jobs[offset : offset + limit], len(jobs)

    async def cancel(self, job_id: str) -> dict | None:
        job = self.jobs.get(job_id)
        if job is None or job["state"] in TERMINAL:
            return job
        if job["state"] in ACTIVE:
            await asyncio.to_thread(self.launcher.stop, self._submission_id(job))
        job.update(state="cancelled", updated_at=time.time(), finished_at=time.time())
        self._save()
        return job

    # ---- scheduling and reconciliation ------------------------------------------
    @staticmethod
    def _submission_id(job: dict) -> str:
        n = job.get("attempt", 0)
        return job["job_id"] if n == 0 else f"{job['job_id']}--retry{n}"

    async def tick(self) -> None:
        if self._tick_lock is None:
            self._tick_lock = asyncio.Lock()
        async with self._tick_lock:  # one scheduling pass at a time
            await self._reconcile()
            await self._start_pending()

    async def _start_pending(self) -> None:
        active = sum(1 for j in self.jobs.values() if j["state"] in ACTIVE)
        pending = sorted(
            (j for j in self.jobs.values() if j["state"] == "pending"),
            key=lambda j: j["updated_at"] if j.get("attempt") else j["created_at"],
        )
        for job in pending:
            if active >= self.settings.max_concurrent_jobs:
                break
            try:
                await asyncio.to_thread(
                    self.launcher.submit, job["job_id"], self._submission_id(job)
                )
            except Exception as e:
                job.update(
                    state="failed",
                    error=f"could not submit the Ray job: {e}",
                    updated_at=time.time(),
                )
            else:
                job.update(state="submitted", updated_at=time.time())
                active += 1
            self._save()

    async def _reconcile(self) -> None:
        for job in [j for j in self.jobs.values() if j["state"] in ACTIVE]:
            try:
                status, message = await asyncio.to_thread(
                    self.launcher.status, self._submission_id(job)
                )
            except Exception as e:  # dashboard unreachable: try again next tick
                log.warning("cannot read Ray job status of %s: %s", job["job_id"], e)
                continue
            if job["state"] not in ACTIVE:  # changed while we waited
                continue
            if status is None:
                reason = "Ray has no record of this job (was the cluster restarted?)"
            elif status in ("FAILED", "STOPPED"):
                reason = f"the job driver ended ({status}): {message or 'no message'}"
            elif status == "SUCCEEDED":
                reason = "the job driver exited without reporting a result"
            else:
                continue
            job.update(state="failed", error=reason, updated_at=time.time())
            self._save()


def get_or_create_registry(settings: Settings):
    """The detached registry actor, created on first use (shared by all replicas)."""
    actor = ray.remote(JobRegistry).options(
        name=settings.registry_name,
        namespace=settings.namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        num_cpus=0,
    )
    # The registry never needs the API token: keep it out of the actor's arguments.
    return actor.remote(settings.model_dump(mode="json", exclude={"api_token"}))
