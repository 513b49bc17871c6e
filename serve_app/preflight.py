"""Preflight before queueing: `kd.preflight` against the memory of this Ray cluster.

Only config and tokenizer files are read (no weights), in well under 5 s, so a job that
cannot work is refused with a 422 before it is queued, with the numbers and the fix.
"""

from __future__ import annotations

import ray

from jobs.spec import DistillConfig
from kd.preflight import http_problems as _problems


def http_problems(cfg: DistillConfig) -> list[dict]:
    """422 details (one per problem, `loc` naming the field) or [] when the job fits."""
    return _problems(cfg, ray.nodes() if ray.is_initialized() else None)
