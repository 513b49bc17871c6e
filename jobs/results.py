"""A finished job's outcome, read from its files: what the job driver reports to the
registry when it ends, and what the registry reads itself when that report never came.

Also where the job registry lives, so that a job started outside the service can find
it (`LLM2SLM_NAMESPACE`, `LLM2SLM_REGISTRY_NAME`: the service's own settings).
"""

from __future__ import annotations

import os
from typing import Any

from jobs.paths import JobPaths

REGISTRY_NAMESPACE = "llm2slm"
REGISTRY_NAME = "llm2slm-job-registry"
_EXPORT_FIELDS = ("ppl", "max_abs_logit_diff", "top1_agreement")


def registry_spec() -> str:
    """The registry actor as "namespace/name", from the service's environment variables."""
    namespace = os.environ.get("LLM2SLM_NAMESPACE") or REGISTRY_NAMESPACE
    return f"{namespace}/{os.environ.get('LLM2SLM_REGISTRY_NAME') or REGISTRY_NAME}"


def job_result(paths: JobPaths) -> dict[str, Any] | None:
    """The registry fields of a job that wrote its metrics.json (`step`, `summary`,
    `artifacts`), or None when it has none (it never finished)."""
    store = paths.storage
    metrics_key = paths.artifact_key("metrics.json")
    if not store.is_file(metrics_key):
        return None
    metrics = store.read_json(metrics_key)  # an unreadable store raises: no verdict yet
    summary = {k: v for k, v in metrics.items() if k not in ("history", "student_selection")}
    report_key = paths.artifact_key("report.json")
    if store.is_file(report_key):  # the exports' quality in the status too
        exports = store.read_json(report_key).get("exports", {})
        summary["exports"] = {
            name: {k: e[k] for k in _EXPORT_FIELDS} for name, e in exports.items()
        }
    return {"step": metrics.get("steps"), "summary": summary, "artifacts": paths.list_artifacts()}


def job_error(paths: JobPaths, since: float) -> str | None:
    """The failure reason the job wrote to error.json at or after `since` (epoch s)."""
    if not paths.storage.is_file(paths.error_key):
        return None
    error = paths.storage.read_json(paths.error_key)
    return error.get("reason") if error.get("time", 0) >= since else None
