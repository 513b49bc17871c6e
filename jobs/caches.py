"""Caches on storage, as the service shows them: the packed corpus (train_job.ingest)
and the teacher signal (train_job.teacher_cache), listed, recorded and deleted alike.

    <root>/corpus/<key>/manifest.json            written last: its presence means complete
    <root>/teacher_signal/<key>/manifest.json
    <root>/<kind>/<key>/jobs/<job_id>.json       one per job that used the cache:
                                                 {"job_id", "built": bool, "time"}

A cache is addressed by (kind, key); the key is 20 hex digits (the sha256 prefix of
the cache's fingerprint), so a name from an HTTP request can never leave its folder.
Only the registry deletes (it knows which jobs are running); the jobs write their own
use records, so the history survives a registry that was never there (a job run by
hand) or was restarted.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:  # the API schemas import this module: keep it free of pyarrow
    from jobs.storage import Storage

CacheKind = Literal["corpus", "teacher_signal"]
CACHE_KINDS: tuple[str, ...] = get_args(CacheKind)
MANIFEST = "manifest.json"
USERS = "jobs"  # the folder of use records inside a cache
KEY_RE = re.compile(r"^[0-9a-f]{20}$")


class CacheNameError(ValueError):
    """A kind or key that names no cache (the API answers 404)."""


def check_name(kind: str, key: str) -> str:
    """'<kind>/<key>': the cache's storage prefix, and its name in the registry and a
    job's record; CacheNameError for a bad kind or key."""
    if kind not in CACHE_KINDS:
        raise CacheNameError(f"cache kind '{kind}' is not one of {', '.join(CACHE_KINDS)}")
    if not KEY_RE.match(key):
        raise CacheNameError(f"cache key '{key}' is not 20 lowercase hex digits")
    return f"{kind}/{key}"


def read_manifest(storage: Storage, kind: str, key: str) -> dict | None:
    """The manifest of a complete cache (written last), or None while there is none."""
    path = f"{check_name(kind, key)}/{MANIFEST}"
    return storage.read_json(path) if storage.is_file(path) else None


def record_use(storage: Storage, kind: str, key: str, job_id: str, built: bool) -> None:
    """Note that `job_id` used (and maybe built) this cache; listed by `describe`."""
    rec = {"job_id": job_id, "built": built, "time": time.time()}
    storage.write_json(f"{check_name(kind, key)}/{USERS}/{job_id}.json", rec)


def _summary(kind: str, manifest: dict) -> dict:
    """What the cache holds, from its manifest: teacher, corpus, mode, tokens."""
    fp = manifest.get("fingerprint", {})
    if kind == "teacher_signal":
        return {
            "teacher": (fp.get("teacher") or {}).get("name"),
            "corpus": fp.get("corpus"),
            "mode": manifest.get("mode"),
            "tokens": manifest.get("tokens"),
        }
    train = manifest.get("train", {})
    return {
        "teacher": None,
        "corpus": (fp.get("config") or {}).get("dataset"),
        "mode": None,
        "tokens": train.get("tokens", 0) + manifest.get("eval", {}).get("tokens", 0),
    }


def describe(storage: Storage, kind: str, key: str) -> dict | None:
    """One cache: {"kind", "key", "complete", "teacher", "corpus", "mode", "tokens",
    "bytes", "files", "created_at", "jobs": [{"job_id", "built", "time"}]}; None when
    nothing is stored under it."""
    prefix = check_name(kind, key)
    files = storage.list_files(prefix)
    if not files:
        return None
    manifest = read_manifest(storage, kind, key)
    jobs = []
    for f in files:
        if f["path"].startswith(f"{USERS}/") and f["path"].endswith(".json"):
            try:
                jobs.append(storage.read_json(f"{prefix}/{f['path']}"))
            except (OSError, ValueError):  # a record being written: skip it this time
                continue
    out = {
        "kind": kind,
        "key": key,
        "complete": manifest is not None,  # an incomplete one is being built, or died
        "bytes": sum(f["size"] for f in files),
        "files": len(files),
        "created_at": manifest.get("created_at") if manifest else None,
        "jobs": sorted(jobs, key=lambda j: j.get("time", 0)),
    }
    return out | _summary(kind, manifest or {})


def list_caches(storage: Storage) -> list[dict]:
    """Every cache under the root, newest first (incomplete ones last)."""
    out = []
    for kind in CACHE_KINDS:
        keys = {f["path"].split("/", 1)[0] for f in storage.list_files(kind)}
        for key in sorted(k for k in keys if KEY_RE.match(k)):
            info = describe(storage, kind, key)
            if info is not None:
                out.append(info)
    return sorted(out, key=lambda c: -(c["created_at"] or 0))


def delete(storage: Storage, kind: str, key: str) -> int | None:
    """Remove the cache's files; returns the bytes freed, or None when nothing was
    stored under it."""
    prefix = check_name(kind, key)
    files = storage.list_files(prefix)
    if not files:
        return None
    storage.delete_tree(prefix)
    return sum(f["size"] for f in files)
