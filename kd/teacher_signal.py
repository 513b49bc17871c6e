"""The teacher's signal computed once and stored, used in place of the teacher forward.

Two modes (`DistillConfig.teacher_cache_mode`):

* **exact**: the teacher's final hidden state per token (`last_hidden_state`, after the
  final norm) in fp16. The teacher's logits are exactly `hidden @ W_headᵀ`, so the
  training step wraps the cached hidden state with the teacher's LM head in a
  `FusedLMHead` and the existing chunked vocabulary terms run unchanged: full
  vocabulary, any temperature, any objective, and the hidden-state MSE / cosine terms
  read the same cached state. Only the head stays needed. fp16, not bf16: the final
  norm keeps hidden states far inside fp16's range, and fp16's 10 mantissa bits round
  8× finer than bf16's 7 (tests/test_teacher_signal.py measures both).
* **topk**: the teacher's top-k log-probabilities at the job's temperature τ, their
  ids, and the log of the tail mass (everything outside the k ids), for teachers whose
  head is too large to keep. The KD term is then the divergence between two
  distributions over k + 1 *buckets*: the k ids and one tail bucket. The teacher's
  buckets are (p_T^τ(id_1..id_k), tail_T); the student's are (p_S^τ(id_1..id_k),
  1 − Σ_i p_S^τ(id_i)), computed from the student's full softmax. forward_kl,
  reverse_kl and jsd are the usual formulas on those k + 1 buckets, times τ². β·CE uses
  id_1 (the teacher's argmax) and λ·CE the data's tokens, both at temperature 1 on the
  student's full vocabulary, as in the live loss. With k = V this equals the live loss.

A batch carries its signal under `SIGNAL_KEY` (a dict of [B, L, ...] tensors);
`teacher_outputs` turns it into what `hybrid_loss` takes from the teacher, and this
module's `hybrid_loss` dispatches a top-k signal to `topk_vocab_terms`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kd import losses
from kd.data import Packed
from kd.losses import FusedLMHead, LossWeights, target_mask
from kd.spec import LOSS_TERMS

SIGNAL_KEY = "teacher_signal"
CACHE_DTYPE = torch.float16  # exact mode's hidden states (see the module docstring)
_FP16_MAX = float(torch.finfo(torch.float16).max)
# An empty bucket's log-probability (k = V leaves no tail): finite, so that 0·log 0
# terms and the logsumexp of an all-masked row stay 0 instead of NaN.
_LOG_EMPTY = -1e4


class TeacherSignalError(ValueError):
    """A cached teacher signal does not fit the job; the message says how to fix it."""


# ---------------------------------------------------------------------------------
# Computing the signal (the cache builder's per-batch work)
# ---------------------------------------------------------------------------------
@torch.no_grad()
def compute_signal(
    teacher_fwd, input_ids: Tensor, attention_mask: Tensor, mode: str, k: int, temperature: float
) -> dict[str, np.ndarray]:
    """One teacher forward over blocks -> the arrays stored for them.

    Args:
        teacher_fwd: `kd.models.DistillForward` of the teacher.
        input_ids, attention_mask: [B, L] packed blocks.
        mode: "exact" -> {"hidden": [B, L, H] fp16};
            "topk" -> {"topk_logp": [B, L, k] fp32, "topk_ids": [B, L, k] int32,
            "tail_logp": [B, L] fp32}, log-probabilities at `temperature`.
    """
    logits, hidden, _ = teacher_fwd(input_ids, attention_mask, fused_lm_head=True)
    if mode == "exact":
        if teacher_fwd.head_weight() is None:
            raise TeacherSignalError(
                "teacher_cache_mode: 'exact' needs a teacher whose logits are hidden @ "
                "W_headᵀ (no bias, soft-capping or logit scale); use teacher_cache_mode=topk"
            )
        peak = float(hidden.abs().max())
        if not peak < _FP16_MAX:
            raise TeacherSignalError(
                f"teacher_cache_mode: the teacher's final hidden state reaches {peak:.3g}, "
                "beyond fp16's range; use teacher_cache_mode=topk"
            )
        return {"hidden": hidden.to(CACHE_DTYPE).cpu().numpy()}
    full = logits.materialize() if isinstance(logits, FusedLMHead) else logits
    logp = F.log_softmax(full.float() / temperature, dim=-1)  # [B, L, V]
    top, ids = logp.topk(k, dim=-1)  # sorted: ids[..., 0] is the teacher's argmax
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(dim=-1)  # log Σ outside top-k
    return {
        "topk_logp": top.cpu().numpy(),
        "topk_ids": ids.to(torch.int32).cpu().numpy(),
        "tail_logp": tail.cpu().numpy(),
    }


# ---------------------------------------------------------------------------------
# Stored signal aligned with packed blocks
# ---------------------------------------------------------------------------------
@dataclass
class TeacherSignal:
    """A cached signal for every training block: arrays [N_blocks, L, ...] by name
    (the keys of `compute_signal`; numpy arrays, possibly memory-mapped)."""

    mode: str
    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def take(self, idx: Tensor | list[int]) -> dict[str, Tensor]:
        rows = np.asarray(torch.as_tensor(idx, dtype=torch.long))
        return {
            name: torch.from_numpy(np.ascontiguousarray(a[rows])) for name, a in self.arrays.items()
        }


@dataclass
class SignalPacked(Packed):
    """Packed blocks whose batches also carry the teacher signal of those blocks."""

    signal: TeacherSignal | None = None

    def batch(self, idx: list[int] | Tensor) -> dict:
        out = super().batch(idx)
        out[SIGNAL_KEY] = self.signal.take(idx)
        return out


def with_signal(data: Packed, signal: TeacherSignal) -> SignalPacked:
    """`data` whose batches carry `signal`; checks that both cover the same blocks."""
    n, seq = data.input_ids.shape
    first = next(iter(signal.arrays.values()))
    if len(signal) != n or first.shape[1] != seq:
        raise TeacherSignalError(
            f"teacher_signal: the cached signal covers {len(signal)} blocks of "
            f"{first.shape[1]} tokens but the training data has {n} blocks of {seq}; the "
            "cache was built for another corpus or max_seq_len: rebuild it"
        )
    return SignalPacked(data.input_ids, data.attention_mask, data.split, signal=signal)


def build_in_process(
    teacher_fwd, data: Packed, mode: str, k: int, temperature: float, batch_size: int
) -> TeacherSignal:
    """The whole signal of `data` computed here, batch by batch (the plain-PyTorch path;
    the Ray job builds it with an actor pool: train_job/teacher_cache.py)."""
    parts: list[dict[str, np.ndarray]] = []
    dev = next(teacher_fwd.parameters()).device
    for start in range(0, len(data), batch_size):
        b = data.batch(list(range(start, min(start + batch_size, len(data)))))
        ids, mask = b["input_ids"].to(dev), b["attention_mask"].to(dev)
        parts.append(compute_signal(teacher_fwd, ids, mask, mode, k, temperature))
    return TeacherSignal(mode, {n: np.concatenate([p[n] for p in parts]) for n in parts[0]})


# ---------------------------------------------------------------------------------
# Using the signal in the training step
# ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TopKSignal:
    """The teacher's top-k support: logp [B, L, k] at τ, ids [B, L, k], tail_logp [B, L]."""

    logp: Tensor
    ids: Tensor
    tail_logp: Tensor


def teacher_outputs(signal: dict[str, Tensor], head_weight: Tensor | None, device) -> tuple:
    """(teacher logits, teacher hidden, teacher attention) from a batch's cached signal.

    exact: (FusedLMHead(hidden [B, L, H] fp32, head_weight [V, H]), hidden, None);
    topk: (TopKSignal, None, None). The attention map is never cached (epsilon_attn
    needs a live teacher; the config refuses that combination).
    """
    if "hidden" in signal:
        if head_weight is None:
            raise TeacherSignalError(
                "teacher_cache_mode: 'exact' needs the teacher's LM head as a plain "
                "matrix; this teacher's head has a bias or post-processing: use topk"
            )
        hidden = signal["hidden"].to(device, non_blocking=True).float()
        return FusedLMHead(hidden, head_weight), hidden, None
    top = TopKSignal(
        signal["topk_logp"].to(device).float(),
        signal["topk_ids"].to(device).long(),
        signal["tail_logp"].to(device).float(),
    )
    return top, None, None


def _bucket_divergence(log_q: Tensor, log_s: Tensor, objective: str, beta: float) -> Tensor:
    """D per row between bucket distributions: log_q (teacher), log_s (student) [n, k+1]."""
    q, s = log_q.exp(), log_s.exp()
    if objective == "forward_kl":
        return (q * (log_q - log_s)).sum(-1)
    if objective == "reverse_kl":
        return (s * (log_s - log_q)).sum(-1)
    if beta <= 0.0 or beta >= 1.0:  # as kd.vocab: the limits of the JSD are 0
        return torch.zeros_like(log_q[:, 0])
    log_m = torch.logaddexp(log_q + np.log(beta), log_s + np.log(1.0 - beta))
    return beta * (q * (log_q - log_m)).sum(-1) + (1 - beta) * (s * (log_s - log_m)).sum(-1)


def _student_support(
    x: Tensor, weight: Tensor | None, ids: Tensor, labels: Tensor, inv_t: float, vocab: int
):
    """One chunk of student rows -> (bucket log-probs [c, k+1] at τ, log p(id_1) and
    log p(label) at temperature 1 [c]). x: logits [c, V] or hidden [c, H] with weight."""
    z = (x @ weight[:vocab].T.to(x.dtype)) if weight is not None else x[:, :vocab]
    z = z.float()
    zt = z * inv_t
    log_z = zt.logsumexp(-1, keepdim=True)
    on_ids = zt.gather(1, ids) - log_z
    tail = zt.scatter(1, ids, _LOG_EMPTY).logsumexp(-1, keepdim=True) - log_z
    logp1 = z - z.logsumexp(-1, keepdim=True)
    return (
        torch.cat([on_ids, tail], 1),
        logp1.gather(1, ids[:, :1])[:, 0],
        logp1.gather(1, labels[:, None])[:, 0],
    )


def _check_ids(ids: Tensor, vocab: int) -> None:
    if ids.numel() and int(ids.max()) >= vocab:
        raise TeacherSignalError(
            f"teacher_signal: a cached top-k id ({int(ids.max())}) is outside the student's "
            f"vocabulary ({vocab}); the cache was built for another tokenizer: rebuild it"
        )


def topk_vocab_terms(
    student_logits: Tensor | FusedLMHead,
    teacher: TopKSignal,
    mask: Tensor,
    w: LossWeights,
    input_ids: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """α·τ²·D(buckets_T‖buckets_S) + β·CE(student, id_1) + λ·CE(student, data).

    Args:
        student_logits: [B, L, V_S] or FusedLMHead (hidden [B, L, H], weight [V_S, H]).
        teacher: TopKSignal (logp [B, L, k] at τ = w.temperature, ids, tail_logp [B, L]).
        mask: [B, L] bool, positions with a real target (`target_mask`).
        input_ids: [B, L] the data, for λ.
    Returns (weighted total, {"kd", "ce", "lm" as weighted}) averaged over masked rows.
    Each chunk of `loss_chunk_tokens` rows is recomputed in the backward (checkpoint),
    so no [n, V] tensor outlives its chunk.
    """
    rows = mask.reshape(-1).nonzero().squeeze(1)
    fused = isinstance(student_logits, FusedLMHead)
    x = student_logits.hidden if fused else student_logits
    weight = student_logits.weight if fused else None
    vocab = student_logits.vocab if fused else x.shape[-1]
    ids = teacher.ids.reshape(-1, teacher.ids.shape[-1])[rows]
    _check_ids(ids, vocab)
    labels = losses.next_tokens(input_ids).reshape(-1)[rows]
    x = x.reshape(-1, x.shape[-1])[rows]
    chunk = w.loss_chunk_tokens or max(int(rows.numel()), 1)
    outs = [
        checkpoint(
            _student_support,
            x[i : i + chunk],
            weight,
            ids[i : i + chunk],
            labels[i : i + chunk],
            1.0 / w.temperature,
            vocab,
            use_reentrant=False,
        )
        for i in range(0, rows.numel(), chunk)
    ]
    log_s = torch.cat([o[0] for o in outs]) if outs else x.new_zeros(0, ids.shape[-1] + 1)
    log_q = torch.cat(
        [
            teacher.logp.reshape(-1, ids.shape[-1])[rows],
            teacher.tail_logp.reshape(-1, 1)[rows].clamp_min(_LOG_EMPTY),
        ],
        1,
    )
    n = max(int(rows.numel()), 1)
    kd = w.temperature**2 * _bucket_divergence(log_q, log_s, w.objective, w.jsd_beta).sum() / n
    ce = -torch.cat([o[1] for o in outs]).sum() / n if outs else kd * 0
    lm = -torch.cat([o[2] for o in outs]).sum() / n if outs else kd * 0
    return _weighted(w, {"alpha_kl": kd, "beta_ce": ce, "lm_ce": lm})


def _weighted(w: LossWeights, values: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """(Σ weight·value over the weighted terms, their detached values by LOSS_TERMS key)."""
    total, parts = next(iter(values.values())) * 0, {}
    for name, value in values.items():
        if getattr(w, name) > 0:
            total = total + getattr(w, name) * value
            parts[LOSS_TERMS[name]] = value.detach()
    return total, parts


def hybrid_loss(
    student_logits: Tensor | FusedLMHead,
    teacher_logits: Tensor | FusedLMHead | TopKSignal | None,
    attention_mask: Tensor,
    weights: LossWeights,
    **kw,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`kd.losses.hybrid_loss`, plus a top-k teacher signal (`topk_vocab_terms` for the
    α, β and λ terms; the hidden-state and attention terms need no teacher logits)."""
    if not isinstance(teacher_logits, TopKSignal):
        return losses.hybrid_loss(student_logits, teacher_logits, attention_mask, weights, **kw)
    tmask = target_mask(attention_mask, kw.get("loss_mask"))
    vocab, parts = topk_vocab_terms(
        student_logits, teacher_logits, tmask, weights, kw.get("input_ids")
    )
    norm = kw.get("norm")
    if norm is not None:  # this micro-batch's share of the global batch (kd.losses)
        local = losses.TokenCounts.of(attention_mask, kw.get("loss_mask"))
        vocab = vocab * (local.targets / norm.targets if norm.targets > 0 else 0.0)
    rest = dataclasses.replace(weights, alpha_kl=0.0, beta_ce=0.0, lm_ce=0.0)
    other, other_parts = losses.hybrid_loss(student_logits, None, attention_mask, rest, **kw)
    total = vocab + other
    parts |= other_parts
    parts["loss"] = total.detach()
    return total, parts


def attach(run, signal: TeacherSignal | None = None) -> SignalPacked:
    """`run.train_data` carrying `signal` (`kd.train.setup`); without one, the signal is
    computed here, one teacher forward per batch of blocks (counted in
    `run.teacher_forwards`)."""
    cfg = run.cfg
    if signal is None:
        bs = cfg.per_device_batch_size
        signal = build_in_process(
            run.teacher_fwd,
            run.train_data,
            cfg.teacher_cache_mode,
            cfg.teacher_topk,
            cfg.temperature,
            bs,
        )
        run.teacher_forwards += -(-len(run.train_data) // bs)
    if signal.mode != cfg.teacher_cache_mode:
        raise TeacherSignalError(
            f"teacher_cache_mode: the job asks for '{cfg.teacher_cache_mode}' but the cached "
            f"signal is '{signal.mode}'; rebuild the cache or change teacher_cache_mode"
        )
    return with_signal(run.train_data, signal)
