"""The job registry: a detached, named, restartable Ray actor that owns job state.

It persists every change to `<storage>/registry/state.json` (write to a temp file,
then rename; one PUT on S3) and reloads it when Ray restarts it. A background loop (every
`poll_interval_s`) starts pending jobs in submission order while fewer than
`max_concurrent_jobs` are active, and reconciles with Ray's own job status so that a
driver that crashed shows `failed`, never `running` forever.

Every change of a job's state goes through `_set_state`, which allows only the changes in
`jobs.states.TRANSITIONS`. Calls into Ray's job API are awaited in threads, and other
calls (a cancel, a driver's report) run meanwhile: after every such await the job is
looked at again before anything is written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import ray

from jobs import caches
from jobs.paths import REGISTRY_STATE_KEY, JobPaths
from jobs.results import job_error, job_result
from jobs.states import ACTIVE, RESUBMITTABLE, TERMINAL, can_transition
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


class CacheInUse(ValueError):
    """DELETE of a cache that an active job reads or builds (the API answers 409). One
    message argument only: Ray rebuilds the exception in the caller from its args."""


class JobRegistry:
    def __init__(self, settings: dict[str, Any]):
        self.settings = Settings(**settings)
        self.storage = Storage(self.settings.storage_root)
        self.jobs: dict[str, dict[str, Any]] = {}
        # '<kind>/<key>' -> the job building that cache now (jobs.caches)
        self.cache_builds: dict[str, str] = {}
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
            self.cache_builds = data.get("cache_builds", {})
            where = self.storage.uri(REGISTRY_STATE_KEY)
            log.info("registry reloaded %d jobs from %s", len(self.jobs), where)

    def _save(self) -> None:
        state = {"jobs": list(self.jobs.values()), "cache_builds": self.cache_builds}
        data = json.dumps(state, default=str)
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

    # ---- the one writer of `state` ------------------------------------------------
    def _set_state(self, job: dict[str, Any], state: str, **fields: Any) -> bool:
        """Move `job` to `state` and set `fields`, if `TRANSITIONS` allows it; persist.

        The only code that writes a job's state. A refused change (a report or a
        submit that arrived too late) writes nothing and returns False.
        """
        old = job.get("state")
        if not can_transition(old, state):
            log.info("job %s: %s -> %s refused (not in TRANSITIONS)", job["job_id"], old, state)
            return False
        now = time.time()
        job.update(fields, state=state, updated_at=now)
        if state in TERMINAL and not job.get("finished_at"):
            job["finished_at"] = now
        self._save()
        return True

    def _new_record(self, job_id: str) -> dict[str, Any]:
        """An empty record (no state yet: `_set_state` gives it its first one)."""
        job = {"job_id": job_id, "state": None, "created_at": time.time(), "attempt": 0}
        self.jobs[job_id] = job
        return job

    @staticmethod
    def _again(job: dict[str, Any]) -> dict[str, Any]:
        """Fields that reset a failed or cancelled job for another attempt."""
        attempt = job.get("attempt", 0) + 1
        # ray_job_id, storage_root, stoppable: only for a job that registered itself.
        # Progress is the attempt's own: a pending or just-started attempt that showed the
        # killed one's step read as "resumed, already past it" before it had loaded anything.
        return {
            "attempt": attempt,
            "error": None,
            "finished_at": None,
            "step": None,
            "eta_s": None,
            "metrics": None,
            "resumed_from_step": None,
            "started_at": None,
            "ray_job_id": None,
            "storage_root": None,
            "stoppable": None,
        }

    # ---- API --------------------------------------------------------------------
    async def ping(self) -> bool:
        self._ensure_loop()
        return True

    async def create(self, job_id: str, config: dict[str, Any]) -> tuple[dict, bool]:
        """Queue a job (pending) and write its config.json. Returns (record, created).

        An existing job that failed or was cancelled is queued again and resumes from its
        checkpoint; any other existing job is returned unchanged, its files untouched.
        """
        self._ensure_loop()
        job = self.jobs.get(job_id)
        if job is not None and job["state"] not in RESUBMITTABLE:
            return job, False
        # Written here, after the check and with no await in between: a job that may not
        # be resubmitted never has its config replaced. The job reads it from storage.
        paths = JobPaths(self.storage, job_id)
        paths.storage.write_json(paths.config_key, config)
        if job is None:
            job, again = self._new_record(job_id), {}
        else:
            again = self._again(job)
        self._set_state(job, "pending", config=config, total_steps=config.get("max_steps"), **again)
        # Start it in the background: the HTTP request must not wait on Ray's job API.
        asyncio.get_running_loop().create_task(self.tick())
        return job, True

    async def register(
        self, job_id: str, config: dict[str, Any], storage_root: str, ray_job_id: str
    ) -> bool:
        """A job started outside the service (`ray job submit -- python -m train_job`, or a
        driver run by hand) records itself as running, then reports like any other.

        `ray_job_id` is its driver's Ray job id, which the reconciliation and a cancel use.
        False when the id belongs to a job that is queued, active or succeeded: that
        record is not this run's to change.
        """
        self._ensure_loop()
        try:  # a driver run by hand (not `ray job submit`) is one Ray cannot stop
            stoppable = await asyncio.to_thread(self.launcher.is_submitted, ray_job_id)
        except Exception as e:  # dashboard unreachable: a cancel will find out
            log.warning("cannot read Ray job %s of %s: %s", ray_job_id, job_id, e)
            stoppable = None
        job = self.jobs.get(job_id)  # looked up after the await
        if job is None:
            job = self._new_record(job_id)
        elif job["state"] in RESUBMITTABLE:
            self._set_state(job, "pending", **self._again(job))
        else:
            return False
        return self._set_state(
            job,
            "running",
            config=config,
            total_steps=config.get("max_steps"),
            storage_root=storage_root,
            ray_job_id=ray_job_id,
            stoppable=stoppable,
            started_at=time.time(),
        )

    async def update(self, job_id: str, fields: dict[str, Any]) -> dict | None:
        """A job's own report: progress, or a new state. A report that `TRANSITIONS`
        refuses (late progress of a cancelled or crashed driver) is ignored whole."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        fields = {k: v for k, v in fields.items() if k in JOB_FIELDS}
        self._set_state(job, fields.pop("state", job["state"]), **fields)
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
        """Cancel a job. Its state changes first, so that the stopped driver's own last
        report is refused; its Ray job (if it has one) is stopped after. A pending job
        whose submission is in flight is stopped when that submission returns."""
        job = self.jobs.get(job_id)
        if job is None or job["state"] in TERMINAL:
            return job
        if job.get("ray_job_id") and job.get("stoppable") is False:
            raise ValueError(
                f"job '{job_id}' runs in a driver started by hand, not with `ray job "
                "submit`: Ray cannot stop it; stop that process where it runs"
            )
        held = job["state"] in ACTIVE
        ray_job_id = self._ray_job_id(job)
        self._set_state(job, "cancelled")
        if held:
            await self._stop(job, ray_job_id)
        return job

    # ---- caches (jobs.caches): one builder per missing cache; no delete while in use --
    # None of these awaits: each runs whole, so a claim, a use and a delete never
    # interleave (the actor runs one coroutine step at a time).
    def _active(self, job_id: str | None) -> bool:
        job = self.jobs.get(job_id) if job_id else None
        return job is not None and job["state"] in ACTIVE

    async def use_cache(self, cache: str, job_id: str) -> None:
        """Job `job_id` reads (or is about to build) `cache`: it is in use while the job
        is active. Called before the job looks for the cache's manifest, so a delete
        either comes first (the job then builds it) or is refused."""
        job = self.jobs.get(job_id)
        if job is not None and cache not in job.setdefault("caches", []):
            job["caches"].append(cache)
            self._save()

    async def claim_cache_build(self, cache: str, job_id: str) -> str | None:
        """None: `job_id` now builds `cache` (the build lease is its). Otherwise the id of
        the active job that holds the lease: wait for its manifest, then claim again.
        A lease held by a job that is no longer active (it died) passes on."""
        holder = self.cache_builds.get(cache)
        if holder not in (None, job_id) and self._active(holder):
            return holder
        self.cache_builds[cache] = job_id
        self._save()
        return None

    async def release_cache_build(self, cache: str, job_id: str) -> None:
        if self.cache_builds.get(cache) == job_id:
            del self.cache_builds[cache]
            self._save()

    async def caches_in_use(self) -> dict[str, dict[str, list[str]]]:
        """'<kind>/<key>' -> {"in_use_by": active jobs using it, "building_by": [...]}."""
        out: dict[str, dict[str, list[str]]] = {}
        for job in self.jobs.values():
            if job["state"] in ACTIVE:
                for cache in job.get("caches", []):
                    entry = out.setdefault(cache, {"in_use_by": [], "building_by": []})
                    entry["in_use_by"].append(job["job_id"])
        for cache, holder in self.cache_builds.items():
            if self._active(holder):
                out.setdefault(cache, {"in_use_by": [], "building_by": []})
                out[cache]["building_by"].append(holder)
        return out

    async def delete_cache(self, kind: str, key: str) -> int | None:
        """Delete cache (kind, key); the bytes freed, or None when there is none.

        Raises CacheInUse naming the active jobs that use or build it. The check and the
        delete run with no await between them: no job can start using it in between."""
        cache = caches.check_name(kind, key)
        users = (await self.caches_in_use()).get(cache)
        if users:
            jobs = ", ".join(sorted(set(users["in_use_by"] + users["building_by"])))
            raise CacheInUse(
                f"cache {cache} is in use by active job(s) {jobs}: delete it after they "
                "end (or cancel them first)"
            )
        return caches.delete(self.storage, kind, key)

    # ---- scheduling and reconciliation ------------------------------------------
    @staticmethod
    def _submission_id(job: dict) -> str:
        n = job.get("attempt", 0)
        return job["job_id"] if n == 0 else f"{job['job_id']}--retry{n}"

    def _ray_job_id(self, job: dict) -> str:
        """The Ray job of the current attempt: its submission id, or the driver's Ray job
        id for a job that registered itself."""
        return job.get("ray_job_id") or self._submission_id(job)

    async def tick(self) -> None:
        if self._tick_lock is None:
            self._tick_lock = asyncio.Lock()
        async with self._tick_lock:  # one scheduling pass at a time
            await self._retry_stops()
            await self._reconcile()
            await self._start_pending()

    async def _stop(self, job: dict, ray_job_id: str) -> None:
        """Stop a cancelled job's Ray job. Kept in the record (`to_stop`) until Ray has
        taken the stop, and tried again every tick: a cancel is never lost."""
        to_stop = job.setdefault("to_stop", [])
        if ray_job_id not in to_stop:
            to_stop.append(ray_job_id)
            self._save()
        try:
            await asyncio.to_thread(self.launcher.stop, ray_job_id)
        except ValueError as e:  # a driver Ray cannot stop: say so, do not retry
            job["error"] = str(e)
        except Exception as e:  # dashboard unreachable: the next tick tries again
            log.warning("cannot stop Ray job %s of %s yet: %s", ray_job_id, job["job_id"], e)
            return
        if ray_job_id in to_stop:
            to_stop.remove(ray_job_id)
        self._save()

    async def _retry_stops(self) -> None:
        for job in [j for j in self.jobs.values() if j.get("to_stop")]:
            for ray_job_id in list(job["to_stop"]):
                await self._stop(job, ray_job_id)

    async def _start_pending(self) -> None:
        active = sum(1 for j in self.jobs.values() if j["state"] in ACTIVE)
        pending = sorted(
            (j for j in self.jobs.values() if j["state"] == "pending"),
            key=lambda j: j["updated_at"] if j.get("attempt") else j["created_at"],
        )
        for job in pending:
            if active >= self.settings.max_concurrent_jobs:
                break
            if job["state"] == "pending" and await self._submit(job):
                active += 1

    async def _submit(self, job: dict) -> bool:
        """Submit the job's current attempt; True when it now holds a Ray job."""
        submission_id = self._submission_id(job)
        job["submitted_at"] = time.time()  # error.json older than this is an earlier attempt's
        try:
            await asyncio.to_thread(self.launcher.submit, job["job_id"], submission_id)
        except Exception as e:
            if self._submission_id(job) == submission_id:  # still that attempt
                self._set_state(job, "failed", error=f"could not submit the Ray job: {e}")
            return False
        # Looked at again: a cancel (maybe then a resubmit) may have come while we waited.
        if job["state"] == "cancelled" or self._submission_id(job) != submission_id:
            await self._stop(job, submission_id)
            return False
        # Refused when the driver has already reported `running` (or `failed`).
        self._set_state(job, "submitted")
        return job["state"] in ACTIVE

    async def _reconcile(self) -> None:
        for job in [j for j in self.jobs.values() if j["state"] in ACTIVE]:
            ray_job_id = self._ray_job_id(job)
            try:
                status, message = await asyncio.to_thread(self.launcher.status, ray_job_id)
            except Exception as e:  # dashboard unreachable: try again next tick
                log.warning("cannot read Ray job status of %s: %s", job["job_id"], e)
                continue
            if status not in (None, "FAILED", "STOPPED", "SUCCEEDED"):
                continue  # still running (or changed while we waited: checked below)
            outcome = await asyncio.to_thread(self._outcome, job, status, message)
            if job["state"] in ACTIVE and self._ray_job_id(job) == ray_job_id:
                self._set_state(job, **outcome)

    def _outcome(self, job: dict, status: str | None, message: str | None) -> dict:
        """What a job whose Ray job ended before it reported an end came to, read from
        its files: metrics.json means it succeeded (its report was lost, e.g. a registry
        call that timed out under load), error.json gives the reason it failed."""
        if status is None:
            return {"state": "failed", "error": "Ray has no record of this job (was the "
                    "cluster restarted?)"}  # fmt: skip
        paths = JobPaths(job.get("storage_root") or self.storage, job["job_id"])
        if status == "SUCCEEDED":
            result = job_result(paths)
            if result is not None:
                return {"state": "succeeded", **result}
        written = job_error(paths, since=job.get("submitted_at") or job.get("started_at") or 0)
        if status == "SUCCEEDED":
            reason = "the job driver exited without reporting a result (no metrics.json)"
            detail = written
        else:
            reason = f"the job driver ended ({status})"
            detail = written or message or "no message"
        return {"state": "failed", "error": f"{reason}: {detail}" if detail else reason}


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
