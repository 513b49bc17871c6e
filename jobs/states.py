"""A job's states, defined once: the Literal, and which states are active or final.

    pending -> submitted -> running -> exporting -> succeeded
    (any non-final state) -> failed | cancelled;  failed -> pending on a resubmit

`ACTIVE` states hold a Ray job (they count against `max_concurrent_jobs` and are
reconciled with Ray's own job status); `TERMINAL` states never change again, except
that the registry resets a failed or cancelled job to `pending` when it is resubmitted.
"""

from __future__ import annotations

from typing import Literal, get_args

JobState = Literal[
    "pending", "submitted", "running", "exporting", "succeeded", "failed", "cancelled"
]
JOB_STATES: tuple[str, ...] = get_args(JobState)
ACTIVE = ("submitted", "running", "exporting")
TERMINAL = ("succeeded", "failed", "cancelled")
RESUBMITTABLE = ("failed", "cancelled")  # POST /distill with the same job_id resumes these
