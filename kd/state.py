"""Resumable state: everything needed to continue a `Run` exactly where it stopped.

`state_dict(run, history)` / `load_state_dict(run, state)` capture and restore the
student (with its hidden projection), optimizer, scheduler, fp16 loss scaler, step,
RNG states (CPU, the run's CUDA device, Python, NumPy), data position and the logged
history. Resuming from it is bit-exact (tests/test_train.py, tests/test_state.py).

On disk (`save` / `load`) a checkpoint is ONE file, `state.safetensors`: the tensors
(weights, optimizer moments, RNG states as uint8) in safetensors, everything else as
JSON in its header metadata. Nothing is unpickled: checkpoints live on shared storage,
and unpickling a file there would run whatever code anyone who can write to it put in
it. An old pickled `state.pt` is refused with `CheckpointError`, not loaded.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kd.optim import apply_config_lr
from kd.run import Run, unwrap

FILE = "state.safetensors"  # a checkpoint folder holds this file (and distill_config.json)
LEGACY_FILE = "state.pt"  # pickled checkpoints of older versions: refused
FORMAT = 2
_META = "llm2slm_state"
_TENSOR = "__tensor__"  # JSON placeholder {"__tensor__": key} for a tensor in the file


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded safely; the message names the file and the fix."""


def state_dict(run: Run, history: list[dict] | None = None) -> dict[str, object]:
    """Everything needed to continue exactly where training stopped.

    history: the metrics logged so far, so that a resumed run's metrics.json and
    curves cover the whole run. Tensors stay tensors; everything else is JSON-able.
    """
    cuda = run.device.type == "cuda" and torch.cuda.is_available()
    return {
        "format": FORMAT,
        "step": run.step,
        "student_fwd": unwrap(run.student_fwd).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),  # {} unless fp16 loss scaling is on
        "sampler": run.sampler.state(),
        "kept_layers": run.kept_layers,
        "rng": {
            "torch": torch.get_rng_state(),
            # dropout (lora_dropout) on a GPU draws from the device's generator
            "cuda": torch.cuda.get_rng_state(run.device) if cuda else None,
            "python": _python_rng(),
            "numpy": _numpy_rng(),
        },
        "config": run.cfg.model_dump(mode="json"),
        "history": [dict(h) for h in history or []],
    }


def load_state_dict(run: Run, state: dict[str, object]) -> None:
    """Restore `run` (built by `kd.train.setup` with the same config) from `state_dict`."""
    unwrap(run.student_fwd).load_state_dict(state["student_fwd"])
    run.optimizer.load_state_dict(_optimizer_state(state["optimizer"], run.optimizer))
    run.scheduler.load_state_dict(state["scheduler"])
    apply_config_lr(run.optimizer, run.scheduler, run.cfg)  # a resume's new lr takes effect
    if state.get("scaler") and run.scaler.is_enabled():  # {} from a run without fp16
        run.scaler.load_state_dict(state["scaler"])
    run.sampler.load_state(state["sampler"])
    run.step = int(state["step"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    py_version, py_state, py_gauss = rng["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_rng = rng["numpy"]
    np.random.set_state(
        (
            np_rng["key"],
            np.asarray(np_rng["keys"], dtype=np.uint32),
            np_rng["pos"],
            np_rng["has_gauss"],
            np_rng["cached_gaussian"],
        )
    )


def save(state: dict[str, object], folder: str | Path) -> Path:
    """Write `state` (from `state_dict`) to `folder/state.safetensors`, atomically: a
    temp file renamed over the previous checkpoint. Returns the file's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta = _split(state, "", tensors, {})
    path, tmp = folder / FILE, folder / (FILE + ".tmp")
    save_file(tensors, tmp, metadata={_META: json.dumps(meta)})
    os.replace(tmp, path)
    return path


def find(folder: str | Path) -> Path | None:
    """The checkpoint file in `folder`, None when there is none. Raises CheckpointError
    for a pickled checkpoint of an older version, which is never unpickled."""
    folder = Path(folder)
    if (folder / FILE).is_file():
        return folder / FILE
    if (folder / LEGACY_FILE).is_file():
        raise CheckpointError(
            f"{folder / LEGACY_FILE} is a pickled checkpoint (an older llm2slm format); it "
            "is not loaded because unpickling a file from shared storage can run arbitrary "
            "code. Start a new run (a new job id, or a fresh --out folder without --resume); "
            f"delete {folder} if you wrote that file yourself and want it gone."
        )
    return None


def load(path: str | Path) -> dict[str, object]:
    """Read a checkpoint written by `save` (a file, or a folder holding one) on the CPU.

    Raises CheckpointError when it is missing, pickled (old format), not a safetensors
    file, or not an llm2slm checkpoint. Nothing in it is executed.
    """
    path = Path(path)
    file = find(path) if path.is_dir() else path
    if file is None:
        raise CheckpointError(f"no checkpoint ({FILE}) in {path}")
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            meta = (f.metadata() or {}).get(_META)
            names = f.keys()  # safe_open is not iterable
            tensors = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{file} is not a readable safetensors checkpoint ({e}); it may be truncated "
            "or written by something else. Start a new run, or restore the file."
        ) from None
    if meta is None:
        raise CheckpointError(f"{file} has no '{_META}' metadata: not an llm2slm checkpoint")
    state = _join(json.loads(meta), tensors)
    if state.get("format") != FORMAT:
        raise CheckpointError(
            f"{file} has checkpoint format {state.get('format')!r}, this version reads "
            f"{FORMAT}; start a new run"
        )
    return state


# ---------------------------------------------------------------------------------
# Helpers: JSON-able RNG states, tensors in and out of the JSON tree
# ---------------------------------------------------------------------------------
def _python_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng() -> dict:
    key, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "key": key,
        "keys": [int(k) for k in keys],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _split(obj: object, key: str, tensors: dict, seen: dict) -> object:
    """`obj` as JSON, each tensor replaced by {"__tensor__": name} and put in `tensors`.

    Tensors that are the same view of the same storage (a tied embedding and LM head)
    are stored once and both names point to it, so loading ties them again.
    """
    if isinstance(obj, torch.Tensor):
        ident = (
            obj.untyped_storage().data_ptr(),
            obj.storage_offset(),
            tuple(obj.shape),
            tuple(obj.stride()),
            obj.dtype,
        )
        if ident in seen:
            return {_TENSOR: seen[ident]}
        seen[ident] = key
        t = obj.detach().to("cpu")
        # safetensors refuses views of a larger storage: copy those out
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.contiguous().clone()
        tensors[key] = t
        return {_TENSOR: key}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out[str(k)] = _split(v, f"{key}/{k}" if key else str(k), tensors, seen)
        return out
    if isinstance(obj, list | tuple):
        return [_split(v, f"{key}/{i}", tensors, seen) for i, v in enumerate(obj)]
    return obj


def _join(obj: object, tensors: dict[str, torch.Tensor]) -> object:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def _optimizer_state(saved: dict, live: torch.optim.Optimizer) -> dict:
    """JSON keeps neither int keys nor tuples: give the per-parameter state its int ids
    back, and each param-group value the type the live optimizer uses (betas a tuple)."""
    ref = live.param_groups
    groups = []
    for i, group in enumerate(saved["param_groups"]):
        g = dict(group)
        for k, v in g.items():
            if i < len(ref) and isinstance(ref[i].get(k), tuple) and isinstance(v, list):
                g[k] = tuple(v)
        groups.append(g)
    return {"state": {int(k): v for k, v in saved["state"].items()}, "param_groups": groups}
