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
Nothing here imports Ray. The step itself (micro-batches, token weighting, clip and
AdamW step, the metric window): kd/step.py. `Run`: kd/run.py. Resumable state:
kd/state.py.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kd import evaluate, models, rollout, teacher_signal
from kd.config import DistillConfig
from kd.data import BlockSampler, Packed, build_datasets
from kd.losses import HiddenProjection, LossWeights
from kd.optim import make_optimizer, make_scheduler
from kd.run import (  # noqa: F401  (re-exported: callers import Run and its precision from here)
    Run,
    loss_scaling,
    make_scaler,
    resolve_precision,
    unwrap,
)
from kd.step import StepStats, _Window, train_step  # noqa: F401  (StepStats re-exported)
from kd.student import build_student

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------
def _load_teacher(cfg: DistillConfig, trust_remote_code: bool):
    """The frozen teacher and its tokenizer; eager attention when a loss term reads the
    attention maps (SDPA does not return them)."""
    attn_impl = "eager" if cfg.needs_attention else None
    teacher, tok = models.load_model_and_tokenizer(
        cfg.teacher_model, trust_remote_code=trust_remote_code, attn_implementation=attn_impl
    )
    return teacher.eval().requires_grad_(False), tok


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
    signal: teacher_signal.TeacherSignal | None = None,
    data: tuple[Packed, Packed] | None = None,
    sampler: BlockSampler | None = None,
) -> Run:
    """Load models and data and build the optimizer for one worker.

    wrap_model: applied to the student's DistillForward (Ray's prepare_model for DDP).
    kept_layers: the derived student's layers from a checkpoint. signal: the stored
    teacher signal of the training blocks (teacher_signal=cache builds it when None).
    data, sampler: (train, held-out) blocks and their order when the caller built them
    (the Ray job's streamed corpus, train_job.stream); default build_datasets, BlockSampler.
    """
    device = torch.device(device)
    seed_everything(cfg.seed)
    teacher, tok = _load_teacher(cfg, trust_remote_code)
    train_data, eval_data = data if data is not None else build_datasets(cfg, tok)
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
    student, student_fwd, optimizer = _prepare_student(cfg, teacher, student, device, wrap_model)
    run = Run(
        cfg=cfg,
        device=device,
        tokenizer=tok,
        teacher=teacher.to(device),
        teacher_fwd=models.DistillForward(teacher),
        student=student,
        student_fwd=student_fwd,
        train_data=train_data,
        eval_data=eval_data,
        sampler=sampler
        or BlockSampler(len(train_data), cfg.per_device_batch_size, cfg.seed, rank, world),
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, cfg),
        scaler=make_scaler(cfg, device),
        kept_layers=kept,
        selection=selection,
        rank=rank,
        world=world,
    )
    if signal is not None or cfg.teacher_signal == "cache":
        run.train_data = teacher_signal.attach(run, signal)
    return run


def _prepare_student(
    cfg: DistillConfig,
    teacher: nn.Module,
    student: nn.Module,
    device: torch.device,
    wrap_model: Callable[[nn.Module], nn.Module] | None,
) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """(student on device, its DistillForward with the hidden projection, maybe DDP, and
    the optimizer over what trains: LoRA adapters or all weights, and the projection)."""
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
    optimizer = make_optimizer([p for p in student_fwd.parameters() if p.requires_grad], cfg)
    return student, student_fwd, optimizer


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
        window.add(train_step(run, weights, source))
        due = schedule(cfg, run.step)
        if due.log:
            last = window.flush(run)
            if due.evaluate:
                last["eval_ppl"] = eval_student_ppl(run)
        if (due.log or due.save) and on_event is not None:
            on_event(Event(run.step, due, dict(last)))
    return last


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
