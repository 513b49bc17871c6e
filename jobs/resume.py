"""Resuming a job: the config its latest checkpoint was trained with, and what changed.

A job id that is submitted again (the API's `POST /distill?job_id=`, `python -m
train_job --job-id`) resumes from its latest checkpoint. Only the schedule may change
then; `kd.config.config_changes` says which fields did, and MODEL_DATA_FIELDS which of
them refuse the resume.
"""

from __future__ import annotations

import re

from jobs.paths import RAY_KEY, SHAPE_SEARCH_FILE, JobPaths
from kd.config import DistillConfig, config_changes, resume_refusal

SHAPE_FIELDS = {  # DistillConfig field -> key of a kd.shapes.Shape
    "student_layers": "layers",
    "student_hidden": "hidden",
    "student_ffn": "ffn",
    "student_heads": "heads",
    "student_kv_heads": "kv_heads",
}

_CKPT_CONFIG = re.compile(r"checkpoint_[^/]+/distill_config\.json")


def checkpoint_config(paths: JobPaths) -> dict | None:
    """The resolved config saved in the job's latest checkpoint (Ray Train's run folder,
    `<root>/ray/<job_id>/checkpoint_<time>/`); None when the job has no checkpoint."""
    run_key = f"{RAY_KEY}/{paths.job_id}"
    found = [f["path"] for f in paths.storage.list_files(run_key)]
    configs = sorted(p for p in found if _CKPT_CONFIG.fullmatch(p))  # named by time
    return paths.storage.read_json(f"{run_key}/{configs[-1]}") if configs else None


def resume_changes(paths: JobPaths, new: dict) -> tuple[list[str], list[str]]:
    """(refused, allowed) changes of `new` against the job's latest checkpoint; both empty
    when there is no checkpoint (nothing to resume: the job starts over with `new`)."""
    old = checkpoint_config(paths)
    return ([], []) if old is None else config_changes(old, searched_shape(paths, new))


def searched_shape(paths: JobPaths, new: dict) -> dict:
    """`new` as its checkpoint holds it: a job with a parameter budget trains the shape
    its search chose (train_job.shape_search), so the same budget resubmitted means
    that shape. A different budget (or none) is compared as given."""
    key = paths.artifact_key(SHAPE_SEARCH_FILE)
    try:
        cfg = DistillConfig.model_validate(new).model_dump(mode="json")
    except ValueError:  # the caller reports what is wrong with the config
        return new
    if cfg.get("student_params") is None or not paths.storage.is_file(key):
        return new
    search = paths.storage.read_json(key)
    if search.get("budget") != cfg["student_params"]:
        return new
    shape = search["winner_shape"]
    return cfg | {"student_params": None} | {f: shape[k] for f, k in SHAPE_FIELDS.items()}


def resume_refused(paths: JobPaths, new: dict) -> str | None:
    """The 409 message when resuming the job with `new` would change its model or data
    (every changed field named); None when it may resume (or has nothing to resume)."""
    refused, _ = resume_changes(paths, new)
    return resume_refusal(refused) if refused else None
