"""`Run`: everything one worker holds during training, and the precision it runs at.

`kd.train.setup` builds a Run, `kd.step.train_step` advances it by one optimizer step
and `kd.state` saves and restores it. It lives apart from the loop so that those
modules share the type without importing one another.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from kd import models
from kd.config import DistillConfig
from kd.data import BlockSampler, Packed


@dataclass
class Run:
    """Everything one worker holds during training."""

    cfg: DistillConfig
    device: torch.device
    tokenizer: object
    teacher: nn.Module  # the plain teacher LM, eval mode, no grad
    teacher_fwd: models.DistillForward
    student: nn.Module  # the plain student LM (LoRA-wrapped when lora_r is set)
    student_fwd: nn.Module  # DistillForward, possibly wrapped by DDP
    train_data: Packed
    eval_data: Packed
    sampler: BlockSampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    kept_layers: list[int] | None
    selection: dict[str, object] = field(default_factory=dict)
    # fp16 loss scaling (`make_scaler`); a disabled scaler is a no-op for fp32 and bf16
    scaler: torch.amp.GradScaler = field(
        default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False)
    )
    step: int = 0
    rank: int = 0
    world: int = 1
    teacher_forwards: int = 0  # live teacher forwards in training (0 with a cached signal)

    @property
    def autocast(self):
        dtype = resolve_precision(self.cfg, self.device)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def resolve_precision(cfg: DistillConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: None (fp32) on CPU, where bf16 matmuls are far slower without AMX."""
    if device.type != "cuda" or cfg.precision == "fp32":
        return None
    return torch.float16 if cfg.precision == "fp16" else torch.bfloat16


def loss_scaling(cfg: DistillConfig, device: torch.device) -> bool:
    """Whether the run scales its loss: fp16 autocast only. fp16's smallest normal number
    is 6e-5, so small gradients underflow to zero unless the loss is scaled up first;
    bf16 has fp32's exponent range and needs no scaling."""
    return resolve_precision(cfg, device) == torch.float16


def make_scaler(cfg: DistillConfig, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled when `loss_scaling`; its state goes into the checkpoint."""
    return torch.amp.GradScaler(device.type, enabled=loss_scaling(cfg, device))


def unwrap(module: nn.Module) -> models.DistillForward:
    return module.module if hasattr(module, "module") else module  # DDP
