"""A job's states, defined once: the Literal, the allowed transitions, and which states
are active or final.

    pending -> submitted -> running -> exporting -> succeeded
    (any non-final state) -> failed | cancelled;  failed | cancelled -> pending (resubmit)

`TRANSITIONS` is the one table of allowed changes; the registry refuses any other, so
a late or out-of-order report (a submit that returns after a cancel, a crashed driver's
last progress line) can never move a job backwards or out of a final state.
`ACTIVE` states hold a Ray job (they count against `max_concurrent_jobs` and are
reconciled with Ray's own job status); `TERMINAL` states never change again, except
that a failed or cancelled job goes back to `pending` when it is resubmitted.
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

# state -> the states it may change to. None is "no record yet".
TRANSITIONS: dict[str | None, tuple[str, ...]] = {
    # POST /distill queues a job; a job started outside the service registers as running
    None: ("pending", "running"),
    # a driver may report `running` before the registry's submit call has returned
    "pending": ("submitted", "running", "failed", "cancelled"),
    "submitted": ("running", "exporting", "succeeded", "failed", "cancelled"),
    "running": ("exporting", "succeeded", "failed", "cancelled"),
    # Ray Train restarts a failed worker group from its checkpoint: training again
    "exporting": ("running", "succeeded", "failed", "cancelled"),
    "succeeded": (),
    "failed": ("pending",),
    "cancelled": ("pending",),
}


def can_transition(old: str | None, new: str) -> bool:
    """Whether a job in state `old` (None: not yet recorded) may change to `new`.

    Staying in the same non-final state is allowed (progress updates carry their state).
    """
    if old == new and old not in TERMINAL and old is not None:
        return True
    return new in TRANSITIONS.get(old, ())
