"""Who may call, which model and data sources a request may name, which files it may read."""

from __future__ import annotations

import hmac
import re
from pathlib import Path, PurePosixPath

from fastapi import HTTPException, Request

from jobs.paths import JobPaths, valid_job_id
from jobs.spec import DERIVED_STUDENT, DistillConfig
from kd.names import What, classify
from serve_app.settings import Settings

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def check_token(request: Request, settings: Settings) -> None:
    """401 unless the bearer token matches (constant-time); never logs the token."""
    if settings.api_token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    expected = settings.api_token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong API token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _check_source(
    field: str, value: str, what: What, settings: Settings, hub_ok: bool
) -> str | None:
    """The policy on one model or dataset name, classified by `kd.names.classify` exactly
    as the job's loaders will read it (a name spelt like a Hub id is a Hub id here and
    there, never a path relative to some working directory)."""
    if what == "model" and value == DERIVED_STUDENT:
        return None
    src = classify(value, what, relative_ok=False)
    if src.kind == "embedded":
        return None
    if src.kind == "s3":
        return f"{field}: S3 sources are not supported; give a Hugging Face id or a local path"
    if src.kind == "local":
        if ".." in PurePosixPath(value).parts or value.startswith(("file:", "~")):
            return f"{field}: '..', '~' and file: URLs are not allowed; give an absolute path"
        if src.relative:
            return f"{field}: local paths must be absolute"
        resolved = Path(value).resolve()
        roots = settings.local_roots()
        if not any(resolved.is_relative_to(r) for r in roots):
            allowed = ", ".join(map(str, roots)) or "none configured (LLM2SLM_ALLOWED_LOCAL_ROOTS)"
            return f"{field}: local path '{value}' is outside the allowed roots ({allowed})"
        return None
    if not HUB_ID.match(value):
        return f"{field}: '{value}' is neither a Hugging Face id (org/name) nor a local path"
    if not hub_ok:
        return f"{field}: Hugging Face Hub sources are disabled on this server"
    return None


def policy_problems(cfg: DistillConfig, settings: Settings) -> list[tuple[str, str]]:
    """(field, message) for every way a valid config breaks this server's policy."""
    problems: list[tuple[str, str]] = []
    checks: list[tuple[str, str, What, bool]] = [
        ("teacher_model", cfg.teacher_model, "model", settings.allow_hub_models),
        ("dataset", cfg.dataset, "dataset", settings.allow_hub_datasets),
    ]
    if not cfg.derives_student:
        checks.append(("student_model", cfg.student_model, "model", settings.allow_hub_models))
    if cfg.eval_dataset is not None:  # read like dataset, so held to the same policy
        checks.append(("eval_dataset", cfg.eval_dataset, "dataset", settings.allow_hub_datasets))
    for field, value, what, hub_ok in checks:
        msg = _check_source(field, value, what, settings, hub_ok)
        if msg:
            problems.append((field, msg))
    if cfg.max_steps > settings.max_steps_limit:
        problems.append(("max_steps", f"max_steps: at most {settings.max_steps_limit} here"))
    if cfg.num_workers > settings.max_workers_limit:
        problems.append(("num_workers", f"num_workers: at most {settings.max_workers_limit}"))
    return problems


def job_paths(settings: Settings, job_id: str) -> JobPaths:
    if not valid_job_id(job_id):
        raise HTTPException(status_code=404, detail=f"no job '{job_id[:80]}'")
    return JobPaths(settings.storage_root, job_id)


def _checked_rel(rel: str) -> HTTPException:
    """The 404 to raise for `rel`; raised at once for an absolute path, '..' or '.'
    parts, empty parts, backslashes or NUL."""
    not_found = HTTPException(status_code=404, detail=f"no artifact '{rel[:200]}'")
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel:
        raise not_found
    if any(p in ("..", ".", "") for p in rel.split("/")):  # not PurePosixPath: it drops them
        raise not_found
    return not_found


def safe_artifact(paths: JobPaths, rel: str) -> Path:
    """The file `rel` inside the job's (local) artifact folder, or 404.

    Rejects absolute paths, '..' and '.' parts, backslashes, NUL, and anything whose
    real path (symlinks resolved) leaves the artifact folder.
    """
    not_found = _checked_rel(rel)
    try:  # a name too long for the filesystem is not found, not a server error
        base = paths.artifacts.resolve()
        target = (paths.artifacts / rel).resolve()
        if not target.is_relative_to(base) or not target.is_file():
            raise not_found
    except OSError:
        raise not_found from None
    return target


def safe_artifact_key(paths: JobPaths, rel: str) -> tuple[str, int]:
    """(key, size) of the object `rel` under the job's artifact prefix on S3, or 404.

    The same checks on `rel` as for a folder; S3 has no links, so a key built from
    checked parts cannot leave the prefix. Temp files are as invisible as in listings.
    """
    not_found = _checked_rel(rel)
    key = paths.artifact_key(rel)
    size = None if rel.endswith(".tmp") else paths.storage.file_size(key)
    if size is None:
        raise not_found
    return key, size
