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
import torch.distributed as dist
from torch import nn

from kd import evaluate, models, rollout, teacher_signal
from kd.config import DistillConfig
from kd.data import BlockSampler, Packed, build_datasets
from kd.losses import HiddenProjection, LossWeights, TokenCounts, term_count
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
    signal: teacher_signal.TeacherSignal | None = None,
    data: tuple[Packed, Packed] | None = None,
    sampler: BlockSampler | None = None,
) -> Run:
    """Load models and data and build the optimizer for one worker.

    wrap_model: applied to the student's DistillForward (Ray passes prepare_model for
    DDP). kept_layers: the derived student's layers from a checkpoint. signal: the
    stored teacher signal of the training blocks (teacher_signal=cache builds it here
    when none is given). data, sampler: (train, held-out) blocks and their order when
    the caller built them (the Ray job's streamed corpus, train_job.stream); by default
    build_datasets and BlockSampler.
    """
    device = torch.device(device)
    seed_everything(cfg.seed)
    attn_impl = "eager" if cfg.needs_attention else None
    teacher, tok = models.load_model_and_tokenizer(
        cfg.teacher_model, trust_remote_code=trust_remote_code, attn_implementation=attn_impl
    )
    teacher.eval().requires_grad_(False)
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
    student, student_fwd = _prepare_student(cfg, teacher, student, device, wrap_model)
    optimizer = make_optimizer([p for p in student_fwd.parameters() if p.requires_grad], cfg)
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


@dataclass
class StepStats:
    """One optimizer step on this rank (`train_step`).

    sums, counts: per loss-term key, Σ mean × count and Σ count over this rank's
    micro-batches (`kd.losses.term_count`: target tokens for kd/ce/lm, real tokens for
    mse/cos/attn). loss: this rank's share of the step's loss (summed over the ranks,
    the token-weighted loss of the global batch). other: grad_norm (the same on every
    rank: the gradients are all-reduced before clipping), on_policy, rollout_s, train_s.
    tokens: real tokens this rank trained on.
    """

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    loss: float = 0.0
    other: dict[str, float] = field(default_factory=dict)
    tokens: int = 0


def _all_ranks_sum(values: list[float], device: torch.device) -> list[float]:
    """Σ over the ranks when torch.distributed runs (a collective: every rank calls it
    with the same length), else the values themselves."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    # NCCL reduces only device tensors; gloo only CPU ones.
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _Window:
    """The step metrics since the last logging step, reduced over the ranks at flush."""

    def __init__(self) -> None:
        self.acc = StepStats()
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, st: StepStats) -> None:
        a = self.acc
        for src, dst in ((st.sums, a.sums), (st.counts, a.counts), (st.other, a.other)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0.0) + v
        a.loss += st.loss
        a.tokens += st.tokens
        self.steps += 1

    def flush(self, run: Run) -> dict[str, float]:
        """Token-weighted means of the loss terms and the mean step loss over all ranks,
        the other step values averaged, step, lr, tokens/s (all ranks) and epoch; starts
        a new window. A collective under torch.distributed: every rank logs together.
        """
        a, world = self.acc, _world()
        elapsed = time.perf_counter() - self.t0
        terms, other = sorted(a.sums), sorted(a.other)  # the same keys on every rank
        flat = [a.sums[k] for k in terms] + [a.counts[k] for k in terms]
        flat += [a.other[k] for k in other] + [a.loss, float(a.tokens)]
        red = _all_ranks_sum(flat, run.device)
        n = len(terms)
        out = {k: red[i] / red[n + i] if red[n + i] > 0 else 0.0 for i, k in enumerate(terms)}
        out |= {k: red[2 * n + i] / (self.steps * world) for i, k in enumerate(other)}
        out["loss"] = red[-2] / self.steps
        out.update(
            step=run.step,
            lr=run.scheduler.get_last_lr()[0],
            tokens_per_s=red[-1] / max(elapsed, 1e-9),
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
        window.add(train_step(run, weights, source))
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
) -> StepStats:
    """One optimizer step over grad_accum_steps micro-batches.

    The step minimises the loss of the global batch (every micro-batch on every rank),
    each term token-weighted: the batches are fetched first, their target and real
    token counts summed over the micro-batches and all-reduced over the ranks, and each
    micro-batch backpropagates its token sums divided by those global counts. A short
    micro-batch (the tail block, a short generation) then weighs per token exactly what
    a full one does, as in one big batch.
    """
    cfg = run.cfg
    source = source or rollout.BatchSource(run)
    run.optimizer.zero_grad(set_to_none=True)
    st = StepStats(other={"on_policy": 0.0})
    t_step = time.perf_counter()
    batches = [source.next_batch(run.step, micro) for micro in range(cfg.grad_accum_steps)]
    rollout_s = time.perf_counter() - t_step  # generation and batch assembly
    local = [TokenCounts.of(b["attention_mask"], b.get("loss_mask")) for b in batches]
    total = sum(local, TokenCounts(0.0, 0.0))
    norm = TokenCounts(*_all_ranks_sum([total.targets, total.tokens], run.device))
    for micro, (batch, counts) in enumerate(zip(batches, local, strict=True)):
        # DDP syncs gradients only on the last micro-batch of a step.
        sync = micro == cfg.grad_accum_steps - 1
        parts = _micro_batch(run, weights, batch, sync=sync, norm=norm)
        st.loss += float(parts.pop("loss"))
        for k, v in parts.items():  # local means -> token sums
            st.sums[k] = st.sums.get(k, 0.0) + float(v) * term_count(k, counts)
            st.counts[k] = st.counts.get(k, 0.0) + term_count(k, counts)
        st.other["on_policy"] += float(batch["on_policy"]) / cfg.grad_accum_steps
        st.tokens += int(counts.tokens)
    st.other.update(_clip_and_step(run))  # grad_norm (+ loss_scale, fp16_skipped)
    run.scheduler.step()
    run.step += 1
    if cfg.generates:  # off-policy runs have no rollout to time apart
        st.other["rollout_s"] = rollout_s
        st.other["train_s"] = time.perf_counter() - t_step - rollout_s
    else:
        del st.other["on_policy"]
    return st


def _clip_and_step(run: Run) -> dict[str, float]:
    """Unscale (fp16), clip and take the optimizer step. Returns grad_norm (before
    clipping) and, with fp16 loss scaling, loss_scale and fp16_skipped.

    With fp16 an overflowed step (non-finite gradients) is skipped by the scaler, which
    halves its scale; it reports grad_norm 0 and fp16_skipped 1. Without loss scaling,
    or once the scale falls below 1 (the gradients are non-finite at any scale), a
    non-finite norm stops the run.
    """
    cfg, scaler = run.cfg, run.scaler
    scaler.unscale_(run.optimizer)  # no-op unless fp16
    params = [p for p in run.student_fwd.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    finite = math.isfinite(grad_norm)
    if not finite and (not scaler.is_enabled() or scaler.get_scale() < 1.0):
        raise FloatingPointError(
            f"non-finite gradient norm at step {run.step + 1}; lower lr (now {cfg.lr}) or "
            "the loss weights"
        )
    scaler.step(run.optimizer)  # skips the step when fp16 gradients overflowed
    scaler.update()
    if not scaler.is_enabled():
        return {"grad_norm": grad_norm}
    return {
        "grad_norm": grad_norm if finite else 0.0,  # inf/nan would break JSON reports
        "loss_scale": float(scaler.get_scale()),
        "fp16_skipped": 0.0 if finite else 1.0,
    }


def _micro_batch(
    run: Run, weights: LossWeights, batch: dict, sync: bool, norm: TokenCounts
) -> dict:
    """Forward both models on one micro-batch (`rollout.BatchSource`), backward its
    share of the global batch's loss (`norm`: that batch's token counts). Returns the
    loss parts of `hybrid_loss` (term means over this micro-batch, "loss" its share).
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
    signal = batch.get(teacher_signal.SIGNAL_KEY)
    if signal is not None:  # the stored teacher signal replaces the teacher forward
        head = run.teacher_fwd.head_weight()
        t_logits, t_hidden, t_attn = teacher_signal.teacher_outputs(signal, head, dev)
    elif cfg.needs_teacher:  # the no-teacher baseline (lm_ce only) skips it
        run.teacher_forwards += 1
        with torch.no_grad(), run.autocast:
            t_logits, t_hidden, t_attn = run.teacher_fwd(ids, mask, **kw)
    ddp = hasattr(fwd, "no_sync")
    no_sync = fwd.no_sync() if (not sync and ddp) else contextlib.nullcontext()
    with no_sync:
        with run.autocast:
            s_logits, s_hidden, s_attn = fwd(ids, mask, **kw)
        loss, parts = teacher_signal.hybrid_loss(  # kd.losses.hybrid_loss, or top-k
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
            norm=norm,
        )
        # With fused_lm_head the loss computed the logits chunk by chunk; otherwise it
        # keeps its own gradient buffer, not the logits: drop both [B, L, V] tensors so
        # they are not alive at the backward's peak.
        del t_logits, s_logits
        # DDP averages the gradients over the ranks; the loss is already divided by the
        # global count, so undo that average: the result is Σ over ranks. fp16: the
        # scaler multiplies the loss up so small gradients do not underflow.
        run.scaler.scale(loss * (_world() if ddp else 1)).backward()
    return parts


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
