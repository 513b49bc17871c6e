"""The distillation loop, written top to bottom.

`setup()` builds everything a worker needs (models, data shard, optimizer, schedule)
into a `Run`; `train()` runs the loop:

    for each step:
        for each micro-batch:
            teacher forward (no grad; only the outputs the active terms need)
            student forward, hybrid loss parts, backward (grad accumulation)
        clip, AdamW step, schedule step
        due = schedule(cfg, step)          # log? evaluate? save? decided once, here
        if anything is due: on_event(Event(step, due, metrics))

The caller turns each event into its own side effects: `python -m kd` prints and saves a
checkpoint folder, the Ray worker makes exactly one `ray.train.report` per event (a
collective, so every rank must agree on the schedule: there is no other copy of it).
Nothing here imports Ray. Resumable state: kd/state.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from kd import evaluate, models, rollout
from kd.config import DistillConfig
from kd.data import BlockSampler, Packed, build_datasets
from kd.losses import HiddenProjection, LossWeights, hybrid_loss
from kd.optim import make_optimizer, make_scheduler
from kd.student import build_student

log = logging.getLogger(__name__)


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
    student, student_fwd = _prepare_student(cfg, teacher, student, device, wrap_model)
    optimizer = make_optimizer([p for p in student_fwd.parameters() if p.requires_grad], cfg)
    return Run(
        cfg=cfg,
        device=device,
        tokenizer=tok,
        teacher=teacher.to(device),
        teacher_fwd=models.DistillForward(teacher),
        student=student,
        student_fwd=student_fwd,
        train_data=train_data,
        eval_data=eval_data,
        sampler=BlockSampler(len(train_data), cfg.per_device_batch_size, cfg.seed, rank, world),
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, cfg),
        kept_layers=kept,
        selection=selection,
        rank=rank,
        world=world,
    )


def _prepare_student(
    cfg: DistillConfig,
    teacher: nn.Module,
    student: nn.Module,
    device: torch.device,
    wrap_model: Callable[[nn.Module], nn.Module] | None,
) -> tuple[nn.Module, nn.Module]:
    """(student on device, its DistillForward with the hidden projection, maybe DDP)."""
    if cfg.needs_attention:
        models.set_eager_attention(student)
    torch.manual_seed(cfg.seed)  # LoRA / projection init identical on every rank
    if cfg.lora_r is not None:
        student = models.apply_lora(student, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    s_dim, t_dim = student.config.hidden_size, teacher.config.hidden_size
    projection = HiddenProjection(s_dim, t_dim) if cfg.needs_hidden and s_dim != t_dim else None
    student.to(device).train()
    student_fwd: nn.Module = models.DistillForward(student, projection).to(device)
    if wrap_model is not None:
        student_fwd = wrap_model(student_fwd)
    return student, student_fwd


def unwrap(module: nn.Module) -> models.DistillForward:
    return module.module if hasattr(module, "module") else module  # DDP


# ---------------------------------------------------------------------------------
# The schedule and its events
# ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Due:
    """What is due after an optimizer step."""

    log: bool  # average the window's metrics and report them
    evaluate: bool  # held-out perplexity (only on logging steps)
    save: bool  # a checkpoint


def schedule(cfg: DistillConfig, step: int) -> Due:
    """The one schedule: every logging_steps, eval_every and save_every steps, and the
    last step (which logs, evaluates when eval_every is set, and saves)."""
    done = step >= cfg.max_steps
    logs = step % cfg.logging_steps == 0 or done
    return Due(
        log=logs,
        evaluate=logs and bool(cfg.eval_every) and (step % cfg.eval_every == 0 or done),
        save=bool(cfg.save_every and step % cfg.save_every == 0) or done,
    )


@dataclass(frozen=True)
class Event:
    """One step with something due.

    metrics: the window's averages (plus eval_ppl when evaluated) when `due.log`; on a
    save-only step the metrics of the last logging step ({} before the first one).
    """

    step: int
    due: Due
    metrics: dict[str, float]


OnEvent = Callable[[Event], None]


def on_log(report: Callable[[dict[str, float]], None]) -> OnEvent:
    """An `OnEvent` that hands the metrics of each logging step to `report`."""

    def handle(event: Event) -> None:
        if event.due.log:
            report(event.metrics)

    return handle


class _Window:
    """Sums of the step metrics since the last logging step."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.tokens, self.t0 = 0, 0, time.perf_counter()

    def add(self, parts: dict[str, float], tokens: int) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.tokens += tokens

    def flush(self, run: Run) -> dict[str, float]:
        """The averages with step, lr, tokens/s and epoch; starts a new window."""
        elapsed = time.perf_counter() - self.t0
        out = {k: v / self.steps for k, v in self.sums.items()}
        out.update(
            step=run.step,
            lr=run.scheduler.get_last_lr()[0],
            tokens_per_s=self.tokens / max(elapsed, 1e-9),
            epoch=run.sampler.epoch,
        )
        self.__init__()
        return out


# ---------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------
def train(
    run: Run, on_event: OnEvent | None = None, source: rollout.BatchSource | None = None
) -> dict[str, float]:
    """Train from `run.step` to `cfg.max_steps`. Returns the last logged metrics.
    source: the batches (default: a new `rollout.BatchSource(run)`); pass one to read
    what it generated afterwards.

    After each step `schedule` says what is due; a step with anything due becomes one
    `Event` handed to `on_event` (which prints, reports, or saves `run`).
    """
    cfg = run.cfg
    weights = LossWeights.from_config(cfg)
    source = source or rollout.BatchSource(run)  # data, or generated (lmbda, seq_kd)
    window, last = _Window(), {}
    while run.step < cfg.max_steps:
        parts, tokens = train_step(run, weights, source)
        window.add(parts, tokens)
        due = schedule(cfg, run.step)
        if due.log:
            last = window.flush(run)
            if due.evaluate:
                last["eval_ppl"] = eval_student_ppl(run)
        if (due.log or due.save) and on_event is not None:
            on_event(Event(run.step, due, dict(last)))
    return last


def train_step(
    run: Run, weights: LossWeights, source: rollout.BatchSource | None = None
) -> tuple[dict[str, float], int]:
    """One optimizer step over grad_accum_steps micro-batches.

    Returns (the loss parts averaged over micro-batches plus grad_norm, the on-policy
    share, rollout_s and train_s; real tokens seen).
    """
    cfg = run.cfg
    source = source or rollout.BatchSource(run)
    run.optimizer.zero_grad(set_to_none=True)
    parts: dict[str, float] = {"on_policy": 0.0}
    tokens, t_step, rollout_s = 0, time.perf_counter(), 0.0
    for micro in range(cfg.grad_accum_steps):
        t0 = time.perf_counter()
        batch = source.next_batch(run.step, micro)
        rollout_s += time.perf_counter() - t0  # generation and batch assembly
        # DDP syncs gradients only on the last micro-batch of a step.
        sync = micro == cfg.grad_accum_steps - 1
        micro_parts, n = _micro_batch(run, weights, batch, sync=sync)
        micro_parts["on_policy"] = float(batch["on_policy"])
        for k, v in micro_parts.items():
            parts[k] = parts.get(k, 0.0) + float(v) / cfg.grad_accum_steps
        tokens += n
    params = [p for p in run.student_fwd.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    if not math.isfinite(grad_norm):
        raise FloatingPointError(
            f"non-finite gradient norm at step {run.step + 1}; lower lr (now {cfg.lr}) or "
            "the loss weights"
        )
    run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    parts["grad_norm"] = grad_norm
    if cfg.generates:  # off-policy runs have no rollout to time apart
        parts["rollout_s"] = rollout_s
        parts["train_s"] = time.perf_counter() - t_step - rollout_s
    else:
        del parts["on_policy"]
    return parts, tokens


def _micro_batch(run: Run, weights: LossWeights, batch: dict, sync: bool) -> tuple[dict, int]:
    """Forward both models on one micro-batch (`rollout.BatchSource`), backward the
    scaled loss. Returns (the loss parts of `hybrid_loss`, real tokens in the batch).
    """
    cfg, dev, fwd = run.cfg, run.device, run.student_fwd
    ids = batch["input_ids"].to(dev, non_blocking=True)
    mask = batch["attention_mask"].to(dev, non_blocking=True)
    loss_mask = batch.get("loss_mask")  # generated / instruction batches: targets only
    if loss_mask is not None:
        loss_mask = loss_mask.to(dev, non_blocking=True)
    if batch["on_policy"]:  # the student's own samples are no data to imitate
        weights = dataclasses.replace(weights, lm_ce=0.0)
    kw = dict(want_attn=cfg.needs_attention, fused_lm_head=cfg.fused_lm_head)
    # Teacher: no grad, and only the outputs the active terms need.
    t_logits = t_hidden = t_attn = None
    if cfg.needs_teacher:  # the no-teacher baseline (lm_ce only) skips it
        with torch.no_grad(), run.autocast:
            t_logits, t_hidden, t_attn = run.teacher_fwd(ids, mask, **kw)
    no_sync = fwd.no_sync() if (not sync and hasattr(fwd, "no_sync")) else contextlib.nullcontext()
    with no_sync:
        with run.autocast:
            s_logits, s_hidden, s_attn = fwd(ids, mask, **kw)
        loss, parts = hybrid_loss(
            s_logits,
            t_logits,
            mask,
            weights,
            input_ids=ids,
            student_hidden=s_hidden if cfg.needs_hidden else None,
            teacher_hidden=t_hidden if cfg.needs_hidden else None,
            student_attn=s_attn,
            teacher_attn=t_attn,
            loss_mask=loss_mask,
        )
        # With fused_lm_head the loss computed the logits chunk by chunk; otherwise it
        # keeps its own gradient buffer, not the logits: drop both [B, L, V] tensors so
        # they are not alive at the backward's peak.
        del t_logits, s_logits
        (loss / cfg.grad_accum_steps).backward()
    return parts, int(mask.sum())


def eval_student_ppl(run: Run) -> float:
    """Held-out perplexity of the student (eval mode for the measurement only)."""
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
