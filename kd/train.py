"""The distillation loop, written top to bottom, and its resumable state.

`setup()` builds everything a worker needs (models, data shard, optimizer, schedule)
into a `Run`; `train()` runs the loop:

    for each step:
        for each micro-batch:
            teacher forward (no grad; only the outputs the active terms need)
            student forward, hybrid loss parts, backward (grad accumulation)
        clip, AdamW step, schedule step
        every logging_steps: report(metrics)
        every save_every steps: checkpoint(run)   # the caller decides where

`state_dict(run)` / `load_state_dict(run, state)` capture and restore model,
optimizer, scheduler, step, RNG and data position. The Ray layer calls exactly these;
nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from kd import evaluate, models, shapes, width
from kd.config import DistillConfig
from kd.data import BlockSampler, Packed, build_datasets
from kd.losses import HiddenProjection, LossWeights, hybrid_loss

log = logging.getLogger(__name__)

Report = Callable[[dict[str, float]], None]


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
    step: int = 0
    rank: int = 0
    world: int = 1

    @property
    def lazy_logits(self) -> bool:
        return self.cfg.fused_lm_head

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------
# Building the student
# ---------------------------------------------------------------------------------
def build_student(
    cfg: DistillConfig,
    teacher: nn.Module,
    teacher_tok,
    train_data: Packed,
    eval_data: Packed,
    *,
    trust_remote_code: bool = False,
    kept_layers: list[int] | None = None,
    log_fn: Callable[[str], None] = log.info,
) -> tuple[nn.Module, object, list[int] | None, dict[str, object]]:
    """(student, tokenizer, kept_layers, selection report).

    A derived student keeps `student_layers` (default: half) of the teacher's layers,
    chosen by `layer_selection`. Every strategy's held-out perplexity is measured and
    reported before training so the choice is visible. `kept_layers` (from a
    checkpoint) skips the measurement and rebuilds the same student.
    """
    if not cfg.derives_student:
        student, tok = models.load_model_and_tokenizer(
            cfg.student_model, trust_remote_code=trust_remote_code
        )
        models.check_vocab_compatible(
            teacher_tok, tok, teacher.config.vocab_size, student.config.vocab_size
        )
        return student, tok, None, {}
    n_total = len(models.decoder_layers(teacher))
    shape = shapes.requested_shape(cfg, teacher.config)  # None: depth only
    n_keep = shape.layers if shape else cfg.student_layers or max(1, n_total // 2)
    if n_keep > n_total:
        raise ValueError(
            f"student_layers={n_keep} but the teacher has only {n_total} layers; choose "
            f"1..{n_total}"
        )
    if kept_layers is not None:
        pruned = width.derive_from_config(cfg, teacher, kept_layers, train_data)
        student = pruned[0] if pruned else models.derive_student(teacher, kept_layers)
        return student, teacher_tok, kept_layers, {}
    calib = [train_data.batch(list(range(i, min(i + 2, len(train_data))))) for i in (0, 2)]
    influence = models.block_influence(teacher, calib)
    report: dict[str, object] = {"block_influence": [round(x, 5) for x in influence]}
    candidates = {}
    for strategy in ("uniform", "block_influence", "first"):
        keep = models.select_layers(strategy, n_total, n_keep, influence)
        candidates[strategy] = keep
        ppl = evaluate.perplexity(
            models.derive_student(teacher, keep),
            eval_data,
            max_blocks=min(cfg.max_eval_blocks, 8),
            batch_size=cfg.per_device_batch_size,
        )
        report[f"ppl_{strategy}"] = ppl
        log_fn(
            f"derived student ({n_keep}/{n_total} layers, {strategy}): layers {keep}, "
            f"held-out perplexity before training {ppl:.1f}"
        )
    keep = candidates[cfg.layer_selection]
    report["chosen"] = cfg.layer_selection
    report["kept_layers"] = keep
    pruned = width.derive_from_config(cfg, teacher, keep, train_data, eval_data)
    if pruned is not None:  # width pruning of the kept layers (kd/width.py)
        report["width"] = pruned[1]
        log_fn(f"width-pruned student {pruned[1]['shape']}: {pruned[1]['params']:,} params")
        return pruned[0], teacher_tok, keep, report
    return models.derive_student(teacher, keep), teacher_tok, keep, report


# ---------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------
def setup(
    cfg: DistillConfig,
    *,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world: int = 1,
    trust_remote_code: bool = False,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    kept_layers: list[int] | None = None,
    log_fn: Callable[[str], None] = log.info,
) -> Run:
    """Load models and data and build the optimizer for one worker.

    wrap_model: applied to the student's DistillForward (Ray passes prepare_model for
    DDP). kept_layers: the derived student's layers from a checkpoint.
    """
    device = torch.device(device)
    seed_everything(cfg.seed)
    attn_impl = "eager" if cfg.needs_attention else None
    teacher, tok = models.load_model_and_tokenizer(
        cfg.teacher_model, trust_remote_code=trust_remote_code, attn_implementation=attn_impl
    )
    teacher.eval().requires_grad_(False)
    train_data, eval_data = build_datasets(cfg, tok)
    student, _, kept, selection = build_student(
        cfg,
        teacher,
        tok,
        train_data,
        eval_data,
        trust_remote_code=trust_remote_code,
        kept_layers=kept_layers,
        log_fn=log_fn,
    )
    if cfg.needs_attention:
        models.set_eager_attention(student)
    torch.manual_seed(cfg.seed)  # LoRA / projection init identical on every rank
    if cfg.lora_r is not None:
        student = models.apply_lora(student, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    s_dim, t_dim = student.config.hidden_size, teacher.config.hidden_size
    projection = HiddenProjection(s_dim, t_dim) if cfg.needs_hidden and s_dim != t_dim else None
    teacher.to(device)
    student.to(device).train()
    student_fwd: nn.Module = models.DistillForward(student, projection).to(device)
    if wrap_model is not None:
        student_fwd = wrap_model(student_fwd)
    params = [p for p in student_fwd.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    sampler = BlockSampler(len(train_data), cfg.per_device_batch_size, cfg.seed, rank, world)
    return Run(
        cfg=cfg,
        device=device,
        tokenizer=tok,
        teacher=teacher,
        teacher_fwd=models.DistillForward(teacher),
        student=student,
        student_fwd=student_fwd,
        train_data=train_data,
        eval_data=eval_data,
        sampler=sampler,
        optimizer=optimizer,
        scheduler=scheduler,
        kept_layers=kept,
        selection=selection,
        rank=rank,
        world=world,
    )


def unwrap(module: nn.Module) -> models.DistillForward:
    return module.module if hasattr(module, "module") else module  # DDP


# ---------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------
def train(
    run: Run,
    report: Report | None = None,
    checkpoint: Callable[[Run], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Train from `run.step` to `cfg.max_steps`. Returns the last logged metrics.

    report(metrics) is called every logging_steps and at the final step;
    checkpoint(run) every save_every steps and at the end (the caller saves).
    """
    cfg, dev = run.cfg, run.device
    weights = LossWeights.from_config(cfg)
    want_hidden, want_attn = cfg.needs_hidden, cfg.needs_attention
    fwd = run.student_fwd
    window: dict[str, float] = {}
    n_window, tokens_window, t_window = 0, 0, time.perf_counter()
    last: dict[str, float] = {}
    while run.step < cfg.max_steps:
        run.optimizer.zero_grad(set_to_none=True)
        step_parts: dict[str, float] = {}
        for micro in range(cfg.grad_accum_steps):
            idx = run.sampler.next_indices()
            batch = run.train_data.batch(idx)
            ids = batch["input_ids"].to(dev, non_blocking=True)
            mask = batch["attention_mask"].to(dev, non_blocking=True)
            # Teacher: no grad, and only the outputs the active terms need.
            t_logits = t_hidden = t_attn = None
            if cfg.needs_teacher:  # the no-teacher baseline (lm_ce only) skips it
                with torch.no_grad(), run.autocast:
                    t_logits, t_hidden, t_attn = run.teacher_fwd(
                        ids, mask, want_attn=want_attn, lazy_logits=run.lazy_logits
                    )
            # DDP syncs gradients only on the last micro-batch of a step.
            sync = micro == cfg.grad_accum_steps - 1
            ctx = (
                fwd.no_sync()
                if (not sync and hasattr(fwd, "no_sync"))
                else contextlib.nullcontext()
            )
            with ctx:
                with run.autocast:
                    s_logits, s_hidden, s_attn = fwd(
                        ids, mask, want_attn=want_attn, lazy_logits=run.lazy_logits
                    )
                loss, parts = hybrid_loss(
                    s_logits,
                    t_logits,
                    mask,
                    weights,
                    input_ids=ids,
                    student_hidden=s_hidden if want_hidden else None,
                    teacher_hidden=t_hidden if want_hidden else None,
                    student_attn=s_attn,
                    teacher_attn=t_attn,
                )
                # With lazy logits the loss computed them chunk by chunk; otherwise it
                # keeps its own gradient buffer, not the logits: drop both [B, L, V]
                # tensors so they are not alive at the backward's peak.
                del t_logits, s_logits
                (loss / cfg.grad_accum_steps).backward()
            for k, v in parts.items():
                step_parts[k] = step_parts.get(k, 0.0) + float(v) / cfg.grad_accum_steps
            tokens_window += int(mask.sum())
        params = [p for p in fwd.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        if not math.isfinite(grad_norm):
            raise FloatingPointError(
                f"non-finite gradient norm at step {run.step + 1}; lower lr (now {cfg.lr}) or "
                "the loss weights"
            )
        run.optimizer.step()
        run.scheduler.step()
        run.step += 1
        for k, v in step_parts.items():
            window[k] = window.get(k, 0.0) + v
        window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm
        n_window += 1
        done = run.step >= cfg.max_steps
        if run.step % cfg.logging_steps == 0 or done:
            elapsed = time.perf_counter() - t_window
            last = {k: v / n_window for k, v in window.items()}
            last.update(
                step=run.step,
                lr=run.scheduler.get_last_lr()[0],
                tokens_per_s=tokens_window / max(elapsed, 1e-9),
                epoch=run.sampler.epoch,
            )
            if cfg.eval_every and (run.step % cfg.eval_every == 0 or done):
                last["eval_ppl"] = eval_student_ppl(run)
            if report is not None:
                report(last)
            window, n_window, tokens_window = {}, 0, 0
            t_window = time.perf_counter()
        if checkpoint is not None and ((cfg.save_every and run.step % cfg.save_every == 0) or done):
            checkpoint(run)
        if should_stop is not None and should_stop():
            break
    return last


def eval_student_ppl(run: Run) -> float:
    lm = run.student
    was_training = lm.training
    lm.eval()
    try:
        with run.autocast:
            return evaluate.perplexity(
                lm,
                run.eval_data,
                batch_size=run.cfg.per_device_batch_size,
                max_blocks=run.cfg.max_eval_blocks,
                device=run.device,
            )
    finally:
        lm.train(was_training)


# ---------------------------------------------------------------------------------
# Resumable state
# ---------------------------------------------------------------------------------
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
    unwrap(run.student_fwd).load_state_dict(state["student_fwd"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.sampler.load_state(state["sampler"])
    run.step = int(state["step"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])


def trainable_summary(model: nn.Module) -> dict[str, int]:
    total = models.count_params(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params": total, "trainable_params": trainable}
