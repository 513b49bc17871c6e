"""Job metrics for the Ray dashboard and Prometheus, exported by the registry actor.

Ray prefixes application metrics with `ray_`, so these appear as:

    ray_llm2slm_jobs{state="running"}              jobs per state (every state, 0s included)
    ray_llm2slm_job_tokens_per_second{job_id=...}  training throughput, all ranks (0 when done)
    ray_llm2slm_job_loss{job_id=...}               the last reported total loss
    ray_llm2slm_job_step{job_id=...}               the last reported optimizer step

The registry owns every state change, so it is the one place that sees them all; it
calls `observe` after each change it persists and on every scheduling tick: Ray
exports a gauge only while it keeps being set, so values are re-recorded for as long
as they should be visible. Per-job series cover active jobs and jobs that finished in
the last `RECENT_S` seconds, so their number stays bounded however many jobs ran.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from ray.util.metrics import Gauge

from jobs.states import ACTIVE, JOB_STATES

log = logging.getLogger(__name__)
RECENT_S = 600.0


class JobMetrics:
    def __init__(self) -> None:
        self.jobs = Gauge("llm2slm_jobs", "llm2slm jobs per state", tag_keys=("state",))
        per_job = ("job_id",)
        self.tokens = Gauge(
            "llm2slm_job_tokens_per_second", "training tokens/s (all ranks)", tag_keys=per_job
        )
        self.loss = Gauge("llm2slm_job_loss", "last reported total loss", tag_keys=per_job)
        self.step = Gauge("llm2slm_job_step", "last reported optimizer step", tag_keys=per_job)

    def observe(self, jobs: Iterable[dict]) -> None:
        try:
            self._observe(jobs)
        except Exception:  # a metrics problem must never break the registry
            log.exception("exporting job metrics failed")

    def _observe(self, jobs: Iterable[dict]) -> None:
        counts = dict.fromkeys(JOB_STATES, 0)
        now = time.time()
        for job in jobs:
            counts[job["state"]] = counts.get(job["state"], 0) + 1
            job_id, m = job["job_id"], job.get("metrics") or {}
            active = job["state"] in ACTIVE
            finished = job.get("finished_at") or job.get("updated_at") or 0
            if not active and now - float(finished) > RECENT_S:
                continue
            tags = {"job_id": job_id}
            # a finished job keeps its last loss and step; its throughput is 0
            self.tokens.set(m.get("tokens_per_s") if active else 0, tags=tags)
            self.loss.set(m.get("loss"), tags=tags)
            self.step.set(job.get("step"), tags=tags)
        for state, n in counts.items():
            self.jobs.set(n, tags={"state": state})
