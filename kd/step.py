"""One optimizer step of the distillation loop, and the window of metrics it feeds.

`train_step` is the step `kd.train.train` repeats: fetch grad_accum_steps micro-batches,
count their tokens over every rank, run the teacher (no grad) and the student on each,
backpropagate each micro-batch's share of the global batch's loss, then clip and take
the AdamW and learning-rate schedule steps (`_clip_and_step`: fp16 loss scaling
included). `_Window` gathers the
`StepStats` of the steps between two logging steps and reduces them over the ranks.
Nothing here imports Ray: the torch.distributed collectives run only when a process
group is initialised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from kd import rollout, teacher_signal
from kd.losses import LossWeights, TokenCounts, term_count
from kd.run import Run


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
