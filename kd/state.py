"""Resumable state: everything needed to continue a `Run` exactly where it stopped.

`state_dict(run)` / `load_state_dict(run, state)` capture and restore the student (with
its hidden projection), optimizer, scheduler, step, RNG and data position. `python -m kd`
and the Ray worker save exactly this dict; resuming from it is bit-exact
(tests/test_train.py).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from kd.optim import apply_config_lr
from kd.train import Run, unwrap


def state_dict(run: Run) -> dict[str, object]:
    """Everything needed to continue exactly where training stopped."""
    return {
        "step": run.step,
        "student_fwd": unwrap(run.student_fwd).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "sampler": run.sampler.state(),
        "kept_layers": run.kept_layers,
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        },
        "config": run.cfg.model_dump(mode="json"),
    }


def load_state_dict(run: Run, state: dict[str, object]) -> None:
    """Restore `run` (built by `kd.train.setup` with the same config) from `state_dict`."""
    unwrap(run.student_fwd).load_state_dict(state["student_fwd"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    apply_config_lr(run.optimizer, run.scheduler, run.cfg)  # a resume's new lr takes effect
    run.sampler.load_state(state["sampler"])
    run.step = int(state["step"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
