"""Submitting, stopping and inspecting training jobs through Ray's job API.

`JobSubmissionClient` is synchronous: callers run these methods in a thread
(`asyncio.to_thread`), never on an event loop. The submission id is the job id (or
`<job_id>--retryN` for a resubmission), which makes submitting idempotent.
"""

from __future__ import annotations

import os
import shlex
import sys
import threading
import time

from jobs.paths import JobPaths
from kd.names import API_ORIGIN, ORIGIN_ENV
from serve_app.settings import Settings

_ENV_OVERRIDES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
_env_lock = threading.Lock()
_AGENT_RETRIES = 15  # x 2 s: how long a new cluster may take to start its job agent


class JobLauncher:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._client = None

    def client(self):
        """The job client for the configured dashboard.

        RAY_ADDRESS / RAY_API_SERVER_ADDRESS would silently override the address we
        pass (and inside a Ray worker RAY_ADDRESS points at the GCS, not the job API),
        so they are hidden while the client is built.
        """
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            with _env_lock:
                saved = {k: os.environ.pop(k) for k in _ENV_OVERRIDES if k in os.environ}
                try:
                    self._client = JobSubmissionClient(self.settings.ray_dashboard_address)
                finally:
                    os.environ.update(saved)
        return self._client

    def entrypoint(self, job_id: str) -> str:
        paths = JobPaths(self.settings.storage_root, job_id)
        python = os.environ.get("LLM2SLM_JOB_PYTHON") or (
            "python" if self.settings.working_dir else sys.executable
        )
        args = [
            python,
            "-m",
            "train_job",
            "--config",
            paths.storage.uri(paths.config_key),  # a path or s3:// URI
            "--job-id",
            job_id,
            "--storage",
            paths.root,
            "--registry",
            self.settings.registry_spec,
        ]
        if self.settings.trust_remote_code:
            args.append("--trust-remote-code")
        return shlex.join(args)

    def runtime_env(self) -> dict:
        """The job's runtime_env. Every process of the job (driver, Ray Train workers)
        inherits its variables; the origin makes kd.names refuse relative paths there,
        and job_env cannot unset it."""
        env = dict(self.settings.job_env) | {ORIGIN_ENV: API_ORIGIN}
        runtime_env: dict = {"env_vars": env}
        if self.settings.working_dir:
            runtime_env["working_dir"] = self.settings.working_dir
        return runtime_env

    def submit(self, job_id: str, submission_id: str) -> None:
        runtime_env = self.runtime_env()
        for attempt in range(_AGENT_RETRIES + 1):
            try:
                self.client().submit_job(
                    entrypoint=self.entrypoint(job_id),
                    submission_id=submission_id,
                    runtime_env=runtime_env,
                    metadata={"llm2slm_job_id": job_id},
                )
                return
            except RuntimeError as e:
                if "already exists" in str(e):  # a repeated submit of the same attempt
                    return
                # A cluster that has just started may have no job agent yet: wait for one.
                if "No available agent" not in str(e) or attempt == _AGENT_RETRIES:
                    raise
                time.sleep(2.0)

    def stop(self, submission_id: str) -> None:
        """Stop a Ray job by submission id or driver job id; one that is gone is fine.

        Raises ValueError for a driver that was not submitted through the job API (run
        by hand): Ray cannot stop it.
        """
        try:
            self.client().stop_job(submission_id)
        except RuntimeError as e:
            if "Can only stop submission type jobs" in str(e):
                raise ValueError(
                    f"Ray job {submission_id} is a driver run by hand, not a submitted job: "
                    "Ray cannot stop it; stop that process (or run jobs with `ray job submit`)"
                ) from None
            if "does not exist" not in str(e) and "not found" not in str(e).lower():
                raise

    def is_submitted(self, ray_job_id: str) -> bool | None:
        """Whether a Ray job (submission id or driver job id) came through the job API,
        i.e. whether Ray can stop it; None when Ray has no record of it."""
        try:
            info = self.client().get_job_info(ray_job_id)
        except RuntimeError as e:
            if "does not exist" in str(e) or "not found" in str(e).lower():
                return None
            raise
        return str(getattr(info.type, "value", info.type)).upper() == "SUBMISSION"

    def status(self, submission_id: str) -> tuple[str | None, str | None]:
        try:
            info = self.client().get_job_info(submission_id)
        except RuntimeError as e:
            if "does not exist" in str(e) or "not found" in str(e).lower():
                return None, None
            raise
        return str(info.status.value if hasattr(info.status, "value") else info.status), (
            info.message
        )
