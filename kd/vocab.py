"""The vocabulary-sized terms of the KD loss: T²·D(p_T‖p_S) and CE(student, argmax T)
(and CE on the data), computed in token chunks with closed-form gradients.

Everything vocabulary-sized is computed in fp32 on chunks of `loss_chunk_tokens` tokens. The
gradient with respect to the student logits has a closed form for each objective, so
the forward pass writes it chunk by chunk and the backward pass only scales it:

* `vocab_terms` takes materialized [B, L, V] logits and keeps one logits-sized gradient
  buffer;
* `fused_vocab_terms` takes hidden states and LM heads (`FusedLMHead`) and computes each
  chunk's logits itself, turning its gradient straight into dL/dh and dL/dW: no
  [B, L, V] tensor of either model exists.

`kd.losses.hybrid_loss` picks between them; see kd/losses.py for the conventions. The math
of one chunk (the divergences, the hard CE, their gradients): kd/vocab_chunk.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.vocab_chunk import (  # noqa: F401  (re-exported: kd.losses takes them from here)
    _chunk_terms,
    _upcast,
    effective_objective,
    validate_objective,
)


class _VocabTerms(torch.autograd.Function):
    """α·T²·mean D + β·mean CE(student, argmax teacher), gradient precomputed chunkwise.

    Returns (weighted_total, kd_part, ce_part); only the first carries a gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        s_logits,
        t_logits,
        rows,
        temperature,
        objective,
        jsd_beta,
        alpha_kl,
        beta_ce,
        loss_chunk_tokens,
    ):
        n_rows, vocab = s_logits.shape
        want_grad = s_logits.requires_grad
        grad_buf = torch.zeros_like(s_logits) if want_grad else None
        n = max(int(rows.numel()), 1)
        acc = torch.float64 if s_logits.dtype == torch.float64 else torch.float32
        kd_sum = torch.zeros((), dtype=acc, device=s_logits.device)
        ce_sum = torch.zeros((), dtype=acc, device=s_logits.device)
        args = (1.0 / n, temperature, objective, jsd_beta, alpha_kl, beta_ce, want_grad)
        for start in range(0, rows.numel(), loss_chunk_tokens):
            idx = rows[start : start + loss_chunk_tokens]
            # Fresh copies passed without a name here, so the helper can consume and free
            # them (CPython hands argument references over to the callee's frame).
            d, c, _, g = _chunk_terms(
                _upcast(s_logits.index_select(0, idx)),
                _upcast(t_logits.index_select(0, idx)),
                *args,
            )
            kd_sum += d
            ce_sum += c
            if want_grad and g is not None:
                grad_buf.index_copy_(0, idx, g.to(grad_buf.dtype))
        kd = kd_sum * (temperature**2) / n
        ce = ce_sum / n
        total = alpha_kl * kd + beta_ce * ce
        ctx.save_for_backward(grad_buf if want_grad else torch.empty(0))
        ctx.mark_non_differentiable(kd, ce)
        return total, kd, ce

    @staticmethod
    def backward(ctx, g_total, _g_kd, _g_ce):  # type: ignore[override]
        (grad_buf,) = ctx.saved_tensors
        # In place: the buffer is used once, and a second logits-sized tensor would raise
        # peak memory by |B·L·V| floats. (retain_graph + a second backward would see the
        # scaled buffer; nothing in kd does that.)
        grad = grad_buf.mul_(g_total.to(grad_buf.dtype)) if grad_buf.numel() else None
        return grad, None, None, None, None, None, None, None, None


@dataclass(frozen=True)
class FusedLMHead:
    """Logits not yet computed: logits = hidden @ weight.T, row by row when needed.

    hidden: [..., H] (the decoder's last normed hidden state); weight: [V, H], the LM
    head (for tied models, the embedding matrix). Passing this instead of [B, L, V]
    logits lets the loss compute them chunk by chunk (`fused_vocab_terms`), so no
    [B, L, V] tensor of either model ever exists.
    """

    hidden: Tensor
    weight: Tensor

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[0])

    def materialize(self) -> Tensor:
        """The full logits [..., V] (the unfused fallback)."""
        return F.linear(self.hidden, self.weight.to(self.hidden.dtype))


class _FusedVocabTerms(torch.autograd.Function):
    """`_VocabTerms` with the two LM heads inside: logits exist one chunk at a time.

    Inputs are the masked rows of both hidden states ([n, H_S], [n, H_T]) and both head
    matrices. For each chunk, s = h_S W_Sᵀ and t = h_T W_Tᵀ (fp32); the closed-form
    gradient g = dL/ds of that chunk is turned at once into dL/dh_S = g W_S and
    accumulated into dL/dW_S += gᵀ h_S. Same FLOPs as the unfused head + autograd;
    memory O(chunk × V) instead of three [n, V] tensors (both logits and their grad).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        h_s,
        w_s,
        h_t,
        w_t,
        labels,
        vocab,
        temperature,
        objective,
        jsd_beta,
        alpha_kl,
        beta_ce,
        lm_ce,
        loss_chunk_tokens,
    ):
        n = max(int(h_s.shape[0]), 1)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_grad = need_h or need_w
        # Data CE: every student row (its full softmax); D, CE(argmax): the shared prefix.
        ws, wt = _upcast(w_s if lm_ce != 0.0 else w_s[:vocab]), _upcast(w_t[:vocab])
        grad_h = torch.zeros(h_s.shape, dtype=ws.dtype, device=h_s.device) if need_h else None
        # A frozen head (LoRA) gets no weight gradient and saves a third of the head FLOPs.
        grad_w = torch.zeros(w_s.shape, dtype=ws.dtype, device=w_s.device) if need_w else None
        acc = torch.float64 if ws.dtype == torch.float64 else torch.float32
        kd_sum, ce_sum, lm_sum = (torch.zeros((), dtype=acc, device=h_s.device) for _ in range(3))
        # Under GPU autocast the hidden states arrive in bf16/fp16: the head matmuls run
        # in that dtype (tensor cores) and only their [c, V] products are upcast.
        low = h_s.is_cuda and h_s.dtype in (torch.bfloat16, torch.float16)
        mm = h_s.dtype if low else ws.dtype
        ws_mm, wt_mm = ws.to(mm), wt.to(mm)
        active = alpha_kl != 0.0 or beta_ce != 0.0 or lm_ce != 0.0
        args = (1.0 / n, temperature, objective, jsd_beta, alpha_kl, beta_ce, want_grad)
        for start in range(0, h_s.shape[0] if active else 0, loss_chunk_tokens):
            hs = h_s[start : start + loss_chunk_tokens].to(mm)
            d, c, lm, g = _chunk_terms(  # s = h_S W_Sᵀ, t = h_T W_Tᵀ: [c, V], consumed
                _upcast(hs @ ws_mm.T),
                _upcast(h_t[start : start + loss_chunk_tokens].to(mm) @ wt_mm.T),
                *args,
                labels=None if labels is None else labels[start : start + loss_chunk_tokens],
                lm_ce=lm_ce,
            )
            kd_sum, ce_sum, lm_sum = kd_sum + d, ce_sum + c, lm_sum + lm
            if g is not None:
                g = g.to(mm)
                if need_h:
                    grad_h[start : start + loss_chunk_tokens] = g @ ws_mm
                if need_w and low:
                    grad_w[: ws.shape[0]] += (g.T @ hs).to(grad_w.dtype)
                elif need_w:
                    grad_w[: ws.shape[0]].addmm_(g.T, hs)
            del g
        kd, ce, lm = kd_sum * (temperature**2) / n, ce_sum / n, lm_sum / n
        total = alpha_kl * kd + beta_ce * ce + lm_ce * lm
        none = torch.empty(0)
        ctx.save_for_backward(grad_h if need_h else none, grad_w if need_w else none)
        ctx.dtypes = (h_s.dtype, w_s.dtype)
        ctx.mark_non_differentiable(kd, ce, lm)
        return total, kd, ce, lm

    @staticmethod
    def backward(ctx, g_total, _g_kd, _g_ce, _g_lm):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        # In place, as in `_VocabTerms`: each buffer is used once.
        gh = grad_h.mul_(g_total.to(grad_h.dtype)).to(ctx.dtypes[0]) if grad_h.numel() else None
        gw = grad_w.mul_(g_total.to(grad_w.dtype)).to(ctx.dtypes[1]) if grad_w.numel() else None
        return (gh, gw) + (None,) * 12


def fused_vocab_terms(
    student: FusedLMHead,
    teacher: FusedLMHead,
    mask: Tensor,
    *,
    temperature: float = 2.0,
    objective: str = "forward_kl",
    jsd_beta: float = 0.5,
    alpha_kl: float = 1.0,
    beta_ce: float = 0.0,
    loss_chunk_tokens: int | None = None,
    labels: Tensor | None = None,
    lm_ce: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`vocab_terms` computed from hidden states and LM heads, chunk by chunk.

    Args:
        student: FusedLMHead with hidden [B, L, H_S] and weight [V_S, H_S].
        teacher: FusedLMHead with hidden [B, L, H_T] and weight [V_T, H_T]; no gradient.
        mask: [B, L], true where the position has a real target.
        labels: [B, L] the data's next token at each position, for lm_ce·CE(labels)
            (the same cross-entropy as `lm_cross_entropy`, fused in the same pass).
    Returns:
        (alpha_kl·T²·D + beta_ce·CE + lm_ce·LM, T²·D, CE, LM), equal to `vocab_terms` on
        the materialized logits aligned to the shared vocabulary prefix (when V_S != V_T)
        and to `lm_cross_entropy` on the student's full [.., V_S] logits. Differentiable
        with respect to the student's hidden state and head weight.
    """
    rows = _flat_rows(mask.bool())
    loss_chunk_tokens = _checked_chunk(objective, temperature, loss_chunk_tokens, rows)
    h_s = student.hidden.reshape(-1, student.hidden.shape[-1]).index_select(0, rows)
    h_t = teacher.hidden.detach().reshape(-1, teacher.hidden.shape[-1]).index_select(0, rows)
    vocab = min(student.vocab, teacher.vocab)
    if lm_ce != 0.0 and labels is None:
        raise ValueError("lm_ce > 0 needs labels (the data's next tokens)")
    flat_labels = None if labels is None else labels.reshape(-1).index_select(0, rows)
    return _FusedVocabTerms.apply(
        h_s,
        student.weight,
        h_t,
        teacher.weight.detach(),
        flat_labels,
        vocab,
        float(temperature),
        objective,
        float(jsd_beta),
        float(alpha_kl),
        float(beta_ce),
        float(lm_ce),
        loss_chunk_tokens,
    )


def _flat_rows(mask: Tensor) -> Tensor:
    return mask.reshape(-1).nonzero(as_tuple=False).squeeze(1)


def _checked_chunk(
    objective: str, temperature: float, loss_chunk_tokens: int | None, rows: Tensor
) -> int:
    """Validates the shared arguments; tokens per chunk (all masked rows when None)."""
    validate_objective(objective)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return int(loss_chunk_tokens) if loss_chunk_tokens else max(int(rows.numel()), 1)


def vocab_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    temperature: float = 2.0,
    objective: str = "forward_kl",
    jsd_beta: float = 0.5,
    alpha_kl: float = 1.0,
    beta_ce: float = 0.0,
    loss_chunk_tokens: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The vocabulary-sized terms in one chunked pass.

    Args:
        student_logits: [B, L, V] (or [N, V]), aligned with the teacher's.
        teacher_logits: same shape; receives no gradient.
        mask: [B, L] (or [N]) bool or 0/1, true where the position has a real target.
    Returns:
        (alpha_kl·T²·D + beta_ce·CE, T²·D, CE) as scalars; D and CE averaged over masked rows.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape; align the vocabularies "
            "first (kd.losses.align_vocab)"
        )
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.detach().reshape(-1, vocab)
    rows = _flat_rows(mask.bool())
    loss_chunk_tokens = _checked_chunk(objective, temperature, loss_chunk_tokens, rows)
    return _VocabTerms.apply(
        s,
        t,
        rows,
        float(temperature),
        objective,
        float(jsd_beta),
        float(alpha_kl),
        float(beta_ce),
        loss_chunk_tokens,
    )


def kd_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    temperature: float = 2.0,
    objective: str = "forward_kl",
    jsd_beta: float = 0.5,
    loss_chunk_tokens: int | None = None,
) -> Tensor:
    """T² · D(p_T^τ ‖ p_S^τ), summed over the vocabulary, averaged over masked positions.

    Args:
        student_logits: [B, L, V], already aligned with the teacher's.
        teacher_logits: [B, L, V]; treated as a constant (no gradient).
        mask: [B, L], bool or 0/1; positions where it is false are ignored.
        temperature: τ > 0; both distributions are softmax(logits / τ).
        objective: "forward_kl" KL(p_T‖p_S), "reverse_kl" KL(p_S‖p_T), or "jsd" (GKD's
            generalized JSD with weight `jsd_beta` on the teacher).
        loss_chunk_tokens: tokens per chunk; None computes all masked tokens in one chunk.
    Returns:
        A scalar tensor, differentiable with respect to `student_logits`.
    """
    total, _, _ = vocab_terms(
        student_logits,
        teacher_logits,
        mask,
        temperature=temperature,
        objective=objective,
        jsd_beta=jsd_beta,
        alpha_kl=1.0,
        beta_ce=0.0,
        loss_chunk_tokens=loss_chunk_tokens,
    )
    return total
