"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from kd.config import DistillConfig


def make_optimizer(params: list[nn.Parameter], cfg: DistillConfig) -> torch.optim.AdamW:
    decay = [p for p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in params if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_factor(step: int, cfg: DistillConfig) -> float:
    """Linear warmup to 1, then cosine / linear decay to min_lr_ratio, or constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: DistillConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Multiplies the peak lr by `lr_factor(step, cfg)`; stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))


def apply_config_lr(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    cfg: DistillConfig,
) -> None:
    """After a checkpoint is loaded: this run's lr and weight decay, not the checkpoint's.

    `load_state_dict` restores each param group's lr, initial_lr and weight_decay and the
    scheduler's base_lrs from the checkpoint, so a resume with a new `lr` would keep
    training at the old one. The schedule itself (warmup, max_steps, decay) already
    comes from `cfg`: LambdaLR does not save its lambda. Groups are in make_optimizer's
    order: matrices (weight decay), then the rest (none).
    """
    step = scheduler.last_epoch  # optimizer steps taken; the next step runs at this lr
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * lr_factor(step, cfg)
        group["weight_decay"] = cfg.weight_decay if i == 0 else 0.0
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr says
