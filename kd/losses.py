"""The hybrid knowledge-distillation loss.

    L = α·T²·D(p_T^τ ‖ p_S^τ) + β·CE(student, argmax teacher)
        + γ·MSE(h_S, h_T) + δ·(1 − cos(h_S, h_T)) + ε·MSE(A_S, A_T)
        + λ·CE(student, the data's next token)

with (α, β, γ, δ, ε, λ) = (alpha_kl, beta_ce, gamma_mse, delta_cos, epsilon_attn, lm_ce): the
`DistillConfig` fields, also the fields of `LossWeights`. `hybrid_loss` is the sum of three
small functions: `vocabulary_terms` (α, β, λ), `hidden_state_terms` (γ, δ) and
`attention_term` (ε). Each term's unweighted value is reported under its key in
`kd.spec.LOSS_TERMS` (alpha_kl -> "kd", beta_ce -> "ce", ..., lm_ce -> "lm").

Conventions shared by every term:

* Logits are [B, L, V] and *aligned*: position t of both models predicts token t+1.
  `hybrid_loss` derives the target mask for that shift itself (position t counts only
  when tokens t and t+1 are both real), `kd_divergence` takes an explicit mask.
* The vocabulary terms (D, CE, lm) are averaged over real target tokens (`target_mask`,
  with the loss_mask of generated batches); the hidden-state and attention terms over
  all real tokens (`attention_mask`). D is summed over the vocabulary and then averaged
  over tokens (not "batchmean" over [B, L, V], which divides by B only).
* Gradient accumulation and DDP: `hybrid_loss(..., norm=TokenCounts)` divides each
  term's token sum by the count of the *global* batch (all micro-batches, all ranks)
  instead of this batch's own, so the summed gradients are those of one big batch and
  a short micro-batch weighs no more per token than a full one (`TokenCounts`).
* Everything vocabulary-sized is computed in fp32 on chunks of `loss_chunk_tokens`
  tokens with closed-form gradients, from materialized logits or, with
  `fused_lm_head`, from hidden states + LM heads (`FusedLMHead`: no [B, L, V] tensor at
  all): kd/vocab.py.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.spec import LOSS_TERMS, OBJECTIVES
from kd.vocab import (  # re-exported: the loss API lives in kd.losses
    FusedLMHead,
    _upcast,
    fused_vocab_terms,
    kd_divergence,
    validate_objective,
    vocab_terms,
)

__all__ = [
    "LOSS_TERMS",
    "OBJECTIVES",
    "FusedLMHead",
    "HiddenProjection",
    "LossWeights",
    "TokenCounts",
    "align_vocab",
    "attention_mse",
    "attention_term",
    "fused_vocab_terms",
    "hidden_cosine",
    "hidden_mse",
    "hidden_state_terms",
    "hybrid_loss",
    "kd_divergence",
    "lm_cross_entropy",
    "target_mask",
    "term_count",
    "validate_objective",
    "vocab_terms",
    "vocabulary_terms",
]


# ---------------------------------------------------------------------------------
# Hidden-state and attention terms
# ---------------------------------------------------------------------------------
def _masked_token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """values [B, L], mask [B, L] -> mean over masked tokens (0 when none)."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def hidden_mse(h_s: Tensor, h_t: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens of mean_h (h_S − h_T)². h_*: [B, L, H], mask: [B, L]."""
    per_tok = (_upcast(h_s) - _upcast(h_t)).pow(2).mean(dim=-1)
    return _masked_token_mean(per_tok, mask)


def hidden_cosine(h_s: Tensor, h_t: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens of 1 − cos(h_S, h_T). h_*: [B, L, H], mask: [B, L]."""
    per_tok = 1.0 - F.cosine_similarity(_upcast(h_s), _upcast(h_t), dim=-1, eps=1e-8)
    return _masked_token_mean(per_tok, mask)


def attention_mse(a_s: Tensor, a_t: Tensor, mask: Tensor) -> Tensor:
    """Last-layer attention MSE over real query/key pairs.

    Args:
        a_s: [B, H_S, L, L] student attention probabilities.
        a_t: [B, H_T, L, L] teacher attention probabilities.
        mask: [B, L] real tokens.
    When H_S != H_T both maps are averaged over heads first. For each real query the
    squared difference is averaged over heads and real keys; the result is averaged
    over real queries.
    """
    a_s, a_t = _upcast(a_s), _upcast(a_t)
    if a_s.shape[1] != a_t.shape[1]:
        a_s, a_t = a_s.mean(dim=1, keepdim=True), a_t.mean(dim=1, keepdim=True)
    m = mask.to(torch.float32)
    key_m = m[:, None, None, :]  # [B, 1, 1, L]
    sq = (a_s - a_t).pow(2) * key_m
    n_keys = m.sum(dim=1).clamp_min(1.0)[:, None]  # [B, 1]
    per_query = sq.sum(dim=-1).mean(dim=1) / n_keys  # [B, L]
    return _masked_token_mean(per_query, mask)


class HiddenProjection(nn.Module):
    """FitNets projection of student hidden states into the teacher's width.

    It trains with the student and is discarded at export: it only serves the loss,
    the exported student keeps its own width and needs no extra layer.
    """

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim, bias=False)
        with torch.no_grad():  # start as a (truncated / padded) identity
            self.proj.weight.zero_()
            k = min(student_dim, teacher_dim)
            self.proj.weight[:k, :k] = torch.eye(k)

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(h)


# ---------------------------------------------------------------------------------
# Vocabulary alignment and the hybrid loss
# ---------------------------------------------------------------------------------
def align_vocab(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Keep the shared vocabulary prefix when the sizes differ only by padding rows.

    Whether the tokenizers really agree is checked once at load time
    (`kd.models.check_vocab_compatible`); here the sizes alone are trimmed.
    """
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vs == vt:
        return student_logits, teacher_logits
    v = min(vs, vt)
    return student_logits[..., :v], teacher_logits[..., :v]


def target_mask(attention_mask: Tensor, loss_mask: Tensor | None = None) -> Tensor:
    """[B, L] real-token mask -> [B, L] mask of positions whose next token is real.

    Position t predicts token t+1, so the last position never has a target.
    loss_mask: [B, L], optional, 1 on the tokens that are targets (e.g. the generated
    continuation: prompt, padding and anything after EOS are 0); position t then counts
    only when token t+1 is one of them.
    """
    m = attention_mask.bool()
    out = torch.zeros_like(m)
    out[:, :-1] = m[:, :-1] & m[:, 1:]
    if loss_mask is not None:
        out[:, :-1] &= loss_mask[:, 1:].bool()
    return out


def next_tokens(input_ids: Tensor | None) -> Tensor:
    """[B, L] tokens -> [B, L] labels: position t holds token t+1 (the last holds 0)."""
    if input_ids is None:
        raise ValueError("lm_ce > 0 needs input_ids (the data's next tokens)")
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


@dataclass(frozen=True)
class LossWeights:
    """The loss settings of a `DistillConfig`, under the same field names."""

    alpha_kl: float = 1.0
    beta_ce: float = 0.0
    gamma_mse: float = 0.0
    delta_cos: float = 0.0
    epsilon_attn: float = 0.0
    lm_ce: float = 0.0
    temperature: float = 2.0
    objective: str = "forward_kl"
    jsd_beta: float = 0.5
    loss_chunk_tokens: int | None = None

    @classmethod
    def from_config(cls, cfg) -> LossWeights:  # cfg: kd.config.DistillConfig
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class TokenCounts:
    """The token counts the loss terms are averaged over.

    targets: positions with a real target token (`target_mask`, loss_mask included),
    the count of the vocabulary terms kd, ce and lm; tokens: real tokens
    (attention_mask), the count of the hidden-state and attention terms mse, cos, attn.
    """

    targets: float
    tokens: float

    @classmethod
    def of(cls, attention_mask: Tensor, loss_mask: Tensor | None = None) -> TokenCounts:
        """Counts of one batch: attention_mask, loss_mask [B, L] as for `hybrid_loss`."""
        tm = target_mask(attention_mask, loss_mask)
        return cls(float(tm.sum()), float(attention_mask.bool().sum()))

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(self.targets + other.targets, self.tokens + other.tokens)


# The metric keys of the vocabulary terms, averaged over TokenCounts.targets.
_TARGET_KEYS = frozenset(LOSS_TERMS[k] for k in ("alpha_kl", "beta_ce", "lm_ce"))


def term_count(key: str, counts: TokenCounts) -> float:
    """The count a `LOSS_TERMS` metric key is averaged over (targets or real tokens)."""
    return counts.targets if key in _TARGET_KEYS else counts.tokens


def _share(local: float, total: float) -> float:
    """local / total: this batch's weight in a mean over the global batch."""
    return local / total if total > 0 else 0.0


Term = tuple[Tensor, dict[str, Tensor]]  # (weighted sum, unweighted detached values by key)


def _zero(like: Tensor) -> Tensor:
    return torch.zeros((), device=like.device)


def vocabulary_terms(
    student_logits: Tensor | FusedLMHead,
    teacher_logits: Tensor | FusedLMHead | None,
    attention_mask: Tensor,
    w: LossWeights,
    input_ids: Tensor | None = None,
    loss_mask: Tensor | None = None,
) -> Term:
    """α·T²·D(p_T‖p_S) + β·CE(student, argmax teacher) + λ·CE(student, data).

    Args:
        student_logits, teacher_logits: [B, L, V_S], [B, L, V_T] or `FusedLMHead`s
            (hidden [B, L, H] + LM head [V, H]); with both fused every term, λ included,
            is computed chunk by chunk and no logits tensor exists. teacher_logits may
            be None when only λ is weighted (the no-teacher baseline).
        attention_mask: [B, L], 1 for real tokens.
        input_ids: [B, L], needed when lm_ce > 0.
        loss_mask: [B, L], optional: only these target tokens count (`target_mask`).
    """
    tmask = target_mask(attention_mask, loss_mask)
    total, parts = _zero(attention_mask), {}
    fused_lm_head = isinstance(student_logits, FusedLMHead) and isinstance(
        teacher_logits, FusedLMHead
    )
    lm_fused = fused_lm_head and w.lm_ce > 0
    kw = dict(
        temperature=w.temperature,
        objective=w.objective,
        jsd_beta=w.jsd_beta,
        alpha_kl=w.alpha_kl,
        beta_ce=w.beta_ce,
        loss_chunk_tokens=w.loss_chunk_tokens,
    )
    if w.alpha_kl > 0 or w.beta_ce > 0 or lm_fused:
        if teacher_logits is None:
            raise ValueError("alpha_kl/beta_ce > 0 need the teacher's logits")
        if fused_lm_head:
            labels = next_tokens(input_ids) if lm_fused else None
            total, kd, ce, lm = fused_vocab_terms(
                student_logits, teacher_logits, tmask, labels=labels, lm_ce=w.lm_ce, **kw
            )
            if lm_fused:
                parts[LOSS_TERMS["lm_ce"]] = lm
        else:
            s_logits, t_logits = align_vocab(_logits(student_logits), _logits(teacher_logits))
            total, kd, ce = vocab_terms(s_logits, t_logits, tmask, **kw)
        if w.alpha_kl > 0:
            parts[LOSS_TERMS["alpha_kl"]] = kd
        if w.beta_ce > 0:
            parts[LOSS_TERMS["beta_ce"]] = ce
    if w.lm_ce > 0 and not lm_fused:
        if input_ids is None:
            raise ValueError("lm_ce > 0 needs input_ids (the data's next tokens)")
        lm = lm_cross_entropy(_logits(student_logits), input_ids, attention_mask, loss_mask)
        total = total + w.lm_ce * lm
        parts[LOSS_TERMS["lm_ce"]] = lm.detach()
    return total, parts


def hidden_state_terms(
    student_hidden: Tensor | None,
    teacher_hidden: Tensor | None,
    attention_mask: Tensor,
    w: LossWeights,
    projection: nn.Module | None = None,
) -> Term:
    """γ·MSE(h_S, h_T) + δ·(1 − cos(h_S, h_T)) over real tokens.

    student_hidden [B, L, H_S], teacher_hidden [B, L, H_T], attention_mask [B, L];
    `projection` maps H_S to H_T when the widths differ.
    """
    total, parts = _zero(attention_mask), {}
    if not (w.gamma_mse > 0 or w.delta_cos > 0):
        return total, parts
    if student_hidden is None or teacher_hidden is None:
        raise ValueError("gamma_mse/delta_cos > 0 need student_hidden and teacher_hidden")
    h_s, h_t = student_hidden, teacher_hidden.detach()
    if projection is not None:
        h_s = projection(h_s)
    elif h_s.shape[-1] != h_t.shape[-1]:
        raise ValueError(
            f"student hidden size {h_s.shape[-1]} != teacher hidden size "
            f"{h_t.shape[-1]}: pass a HiddenProjection"
        )
    real = attention_mask.bool()
    for weight, fn in (("gamma_mse", hidden_mse), ("delta_cos", hidden_cosine)):
        if getattr(w, weight) > 0:
            value = fn(h_s, h_t, real)
            total = total + getattr(w, weight) * value
            parts[LOSS_TERMS[weight]] = value.detach()
    return total, parts


def attention_term(
    student_attn: Tensor | None, teacher_attn: Tensor | None, attention_mask: Tensor, w: LossWeights
) -> Term:
    """ε·MSE(A_S, A_T) of the last layer's attention maps [B, H, L, L] over real tokens."""
    if not w.epsilon_attn > 0:
        return _zero(attention_mask), {}
    if student_attn is None or teacher_attn is None:
        raise ValueError("epsilon_attn > 0 needs student_attn and teacher_attn (eager)")
    value = attention_mse(student_attn, teacher_attn.detach(), attention_mask.bool())
    return w.epsilon_attn * value, {LOSS_TERMS["epsilon_attn"]: value.detach()}


def hybrid_loss(
    student_logits: Tensor | FusedLMHead,
    teacher_logits: Tensor | FusedLMHead | None,
    attention_mask: Tensor,
    weights: LossWeights,
    *,
    input_ids: Tensor | None = None,
    student_hidden: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    student_attn: Tensor | None = None,
    teacher_attn: Tensor | None = None,
    projection: nn.Module | None = None,
    loss_mask: Tensor | None = None,
    norm: TokenCounts | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = vocabulary terms + hidden-state terms + attention term (see the module doc).

    Args:
        student_logits, teacher_logits: [B, L, V_S], [B, L, V_T] or `FusedLMHead`s.
        attention_mask: [B, L], 1 for real tokens.
        input_ids: [B, L], needed only when lm_ce > 0.
        student_hidden, teacher_hidden: last hidden states [B, L, H_S], [B, L, H_T].
        student_attn, teacher_attn: last-layer attentions [B, H, L, L].
        projection: maps H_S to H_T when the widths differ.
        loss_mask: [B, L], optional: 1 on the tokens that are targets (a generated
            continuation); the vocabulary terms and lm_ce count only those (see
            `target_mask`). The hidden-state and attention terms keep every real token.
        norm: the counts of the global batch this batch is part of (every micro-batch
            of the step on every rank). Each term is then Σ over this batch's tokens /
            the global count, so the totals of all the batches add up to the loss of
            the global batch. None: this batch is the whole batch.
    Returns:
        (total, parts): parts holds the unweighted, detached value of each active term
        under its `LOSS_TERMS` key ("kd", "ce", "lm", "mse", "cos", "attn"), its mean
        over this batch, and "loss", the total (this batch's share with `norm`).
    """
    vocab, parts = vocabulary_terms(
        student_logits, teacher_logits, attention_mask, weights, input_ids, loss_mask
    )
    hidden, hidden_parts = hidden_state_terms(
        student_hidden, teacher_hidden, attention_mask, weights, projection
    )
    attn, attn_parts = attention_term(student_attn, teacher_attn, attention_mask, weights)
    if norm is not None:  # mean over this batch × its count = Σ; then / the global count
        local = TokenCounts.of(attention_mask, loss_mask)
        vocab = vocab * _share(local.targets, norm.targets)
        hidden = hidden * _share(local.tokens, norm.tokens)
        attn = attn * _share(local.tokens, norm.tokens)
    total = vocab + hidden + attn
    parts |= hidden_parts | attn_parts
    parts["loss"] = total.detach()
    return total, parts


def _logits(x: Tensor | FusedLMHead) -> Tensor:
    """Materialized [B, L, V] logits (the unfused path)."""
    return x.materialize() if isinstance(x, FusedLMHead) else x


def lm_cross_entropy(
    logits: Tensor, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor | None = None
) -> Tensor:
    """Next-token CE on the data: mean over real targets of −log p(token t+1 | ≤ t).

    logits [B, L, V], input_ids [B, L], attention_mask [B, L], loss_mask [B, L] optional
    (see `target_mask`). Used for perplexity and for the no-teacher baseline.
    """
    tmask = target_mask(attention_mask, loss_mask)[:, :-1]
    lg = _upcast(logits[:, :-1])
    tgt = input_ids[:, 1:]
    nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none")
    return _masked_token_mean(nll.view_as(tgt), tmask)
