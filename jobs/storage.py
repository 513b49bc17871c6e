"""The storage root: a folder on a shared filesystem or an S3 prefix (`s3://bucket/prefix`).

One small interface, used by train_job (driver and workers) and serve_app (API and
registry), over keys relative to the root ("jobs/<id>/config.json"). A local root keeps
using plain files exactly as before; an S3 root goes through `pyarrow.fs.S3FileSystem`,
which is also what Ray Train gets as `RunConfig(storage_filesystem=...)`.

S3 settings come from the environment of every process that touches storage (API
replica, registry actor, job driver, training workers):

    LLM2SLM_S3_ENDPOINT_URL   an S3-compatible store, e.g. http://minio:9000
                              (falls back to AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL)
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION
                              the standard AWS credential chain (env, ~/.aws, instance role)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

ENDPOINT_ENV = ("LLM2SLM_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")


class StorageError(ValueError):
    """A storage root or S3 setting that cannot work; the message says how to fix it."""


def is_uri(value: str) -> bool:
    return "://" in str(value)


def s3_endpoint() -> tuple[str | None, str | None, str | None]:
    """(variable, host:port, scheme) of the configured S3 endpoint; Nones for AWS itself."""
    for var in ENDPOINT_ENV:
        url = os.environ.get(var, "").strip()
        if not url:
            continue
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(
                f"{var}='{url}' is not an endpoint URL: use scheme://host[:port], "
                "e.g. http://minio:9000 or https://s3.example.com"
            )
        return var, parsed.netloc, parsed.scheme
    return None, None, None


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem with the endpoint and region from the environment.

    Credentials are left to the AWS chain (AWS_* variables, ~/.aws, instance role);
    pyarrow itself does not read AWS_ENDPOINT_URL, hence the explicit override.
    """
    _, endpoint, scheme = s3_endpoint()
    region = next((os.environ[v] for v in REGION_ENV if os.environ.get(v)), None)
    return pafs.S3FileSystem(endpoint_override=endpoint, scheme=scheme, region=region)


class Storage:
    """Files under one root, addressed by '/'-separated keys relative to it."""

    def __init__(self, root: str | Path):
        root = str(root)
        if root.startswith("s3://"):
            self.base = root[len("s3://") :].strip("/")
            if not self.base or self.base.startswith("/"):
                raise StorageError(f"storage root '{root}' names no bucket: use s3://bucket/prefix")
            self.fs: pafs.FileSystem = s3_filesystem()
            self.root = "s3://" + self.base
            self.is_local = False
        elif is_uri(root):
            raise StorageError(
                f"storage root '{root}' is not supported: use a shared-filesystem path "
                "(e.g. /mnt/llm2slm) or an S3 URI (s3://bucket/prefix)"
            )
        else:
            self.base = os.path.abspath(os.path.expanduser(root))
            self.fs = pafs.LocalFileSystem()
            self.root = self.base
            self.is_local = True

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    # ---- naming -------------------------------------------------------------------
    def fs_path(self, key: str = "") -> str:
        """The path of `key` on `self.fs` (bucket/prefix/key on S3)."""
        key = key.strip("/")
        return f"{self.base}/{key}" if key else self.base

    def uri(self, key: str = "") -> str:
        """What another process passes to Storage or prints: a path or s3:// URI."""
        return ("s3://" if not self.is_local else "") + self.fs_path(key)

    def local_path(self, key: str = "") -> Path:
        if not self.is_local:
            raise StorageError(
                f"'{key}' has no local path: the storage root {self.root} is on S3 "
                "(use the Storage methods, or staged() for a local working copy)"
            )
        return Path(self.fs_path(key))

    # ---- files ----------------------------------------------------------------------
    def file_size(self, key: str) -> int | None:
        """Size of the regular file at `key`, or None when there is none."""
        if self.is_local:
            p = self.local_path(key)
            return p.stat().st_size if p.is_file() else None
        info = self.fs.get_file_info(self.fs_path(key))
        return info.size if info.type == pafs.FileType.File else None

    def is_file(self, key: str) -> bool:
        return self.file_size(key) is not None

    def read_bytes(self, key: str) -> bytes:
        if self.is_local:
            return self.local_path(key).read_bytes()
        with self.fs.open_input_stream(self.fs_path(key)) as f:
            return f.read()

    def read_json(self, key: str):
        return json.loads(self.read_bytes(key))

    def write_bytes(self, key: str, data: bytes) -> None:
        """Replace the file at `key` atomically (temp file + rename; one PUT on S3)."""
        if self.is_local:
            path = self.local_path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return
        with self.fs.open_output_stream(self.fs_path(key)) as f:
            f.write(data)

    def write_json(self, key: str, data: object) -> None:
        text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
        self.write_bytes(key, text.encode())

    def open_input(self, key: str):
        """A random-access reader (`read_at`, `seek`); ranged GETs on S3."""
        return self.fs.open_input_file(self.fs_path(key))

    def list_files(self, key: str) -> list[dict]:
        """Regular files under `key` as {"path", "size"}, sorted; temp files never listed,
        and on a local root neither symlinks nor files reached through a linked folder."""
        if self.is_local:
            return _list_local(self.local_path(key))
        prefix = self.fs_path(key) + "/"
        sel = pafs.FileSelector(self.fs_path(key), recursive=True, allow_not_found=True)
        out = [
            {"path": info.path[len(prefix) :], "size": info.size}
            for info in self.fs.get_file_info(sel)
            if info.type == pafs.FileType.File and not info.path.endswith(".tmp")
        ]
        return sorted(out, key=lambda f: f["path"])

    # ---- folders ----------------------------------------------------------------------
    def upload_dir(self, local: Path, key: str) -> None:
        pafs.copy_files(
            str(local),
            self.fs_path(key),
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.fs,
        )

    def download_dir(self, key: str, local: Path) -> None:
        if self.list_files(key):
            pafs.copy_files(
                self.fs_path(key),
                str(local),
                source_filesystem=self.fs,
                destination_filesystem=pafs.LocalFileSystem(),
            )

    def delete_tree(self, key: str) -> None:
        """Remove everything under `key` (nothing to remove is not an error)."""
        if not key.strip("/"):
            raise StorageError("refusing to delete the whole storage root")
        if self.is_local:
            shutil.rmtree(self.local_path(key), ignore_errors=True)
            return
        with suppress(FileNotFoundError):
            self.fs.delete_dir(self.fs_path(key))

    @contextmanager
    def staged(self, key: str) -> Iterator[Path]:
        """A local folder to write the files under `key` with plain file APIs.

        Local root: the folder itself. S3: a temp folder holding a copy of what is
        already there, uploaded when the block ends without an error, then removed.
        """
        if self.is_local:
            yield self.local_path(key)
            return
        tmp = Path(tempfile.mkdtemp(prefix="llm2slm-stage-"))
        try:
            self.download_dir(key, tmp)
            yield tmp
            self.upload_dir(tmp, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- Ray Train and checks -----------------------------------------------------------
    def ray_storage(self, key: str) -> tuple[str, pafs.FileSystem | None]:
        """(storage_path, storage_filesystem) for Ray Train's RunConfig."""
        if self.is_local:
            return str(self.local_path(key)), None
        return self.fs_path(key), self.fs  # Ray wants the path without "s3://" here

    def check(self) -> None:
        """Raise StorageError, with what to fix, when the root cannot be reached."""
        if self.is_local:
            return
        bucket = self.base.split("/")[0]
        var, endpoint, _ = s3_endpoint()
        where = f"endpoint {endpoint} (from {var})" if var else "AWS S3 (no endpoint override)"
        try:
            info = self.fs.get_file_info(bucket)
        except OSError as e:
            raise StorageError(
                f"cannot reach storage root {self.root} at {where}: {e}. Check "
                f"{', '.join(ENDPOINT_ENV)} and the AWS credentials (AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY) in this process's environment"
            ) from e
        if info.type != pafs.FileType.Directory:
            raise StorageError(
                f"bucket '{bucket}' of storage root {self.root} does not exist at {where}: "
                "create it first, or fix the bucket name"
            )


def _list_local(base: Path) -> list[dict]:
    if not base.is_dir():
        return []
    real_base = base.resolve()
    out = []
    for p in sorted(base.rglob("*")):
        if p.is_symlink() or not p.is_file() or p.name.endswith(".tmp"):
            continue
        if not p.resolve().is_relative_to(real_base):  # reached through a linked folder
            continue
        out.append({"path": p.relative_to(base).as_posix(), "size": p.stat().st_size})
    return out


def read_json_uri(uri: str):
    """A JSON file named by a full path or s3:// URI (e.g. a job's config.json)."""
    root, _, name = uri.rstrip("/").rpartition("/")
    return Storage(root).read_json(name)
