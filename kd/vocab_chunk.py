"""The per-chunk math of the vocabulary terms (kd/vocab.py): one chunk of rows.

Rows are tokens, columns the vocabulary, everything fp32 (fp64 in tests). For a chunk
of student and teacher logits, `_chunk_terms` returns the sums of D(p_T‖p_S),
CE(student, argmax teacher) and CE on the data, and the closed-form gradient with
respect to the student logits, already weighted. kd.vocab's autograd Functions loop
over chunks and call it; keeping the math apart keeps each file to one job.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.spec import OBJECTIVES


def _divergence_rows(
    s_logp: Tensor, t_logp: Tensor, objective: str, jsd_beta: float, want_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """D per row and dD/ds (s = student logits / T), for [n, V] log-probabilities.

    Consumes `s_logp` and `t_logp` (they may be overwritten).

    forward_kl: KL(p_T‖p_S) = Σ p_T (log p_T − log p_S);   dD/ds = p_S − p_T
    reverse_kl: KL(p_S‖p_T) = Σ p_S r, r = log p_S − log p_T;  dD/ds = p_S ⊙ (r − D)
    jsd:        β·KL(p_T‖m) + (1−β)·KL(p_S‖m), m = β p_T + (1−β) p_S;
                dD/dp_S = (1−β) log(p_S/m) =: g,  dD/ds = p_S ⊙ (g − Σ p_S g)
    At β = 0 and β = 1 the JSD itself is identically 0 (m equals one side), so those
    values follow TRL GKD's convention instead: β = 0 is forward KL, β = 1 reverse KL
    (`effective_objective`).
    """
    objective = effective_objective(objective, jsd_beta)
    if objective == "forward_kl":
        # In place (both inputs are consumed): at most three [n, V] tensors alive.
        p_t = t_logp.exp()
        d = t_logp.sub_(s_logp).mul_(p_t).sum(dim=-1)
        grad = s_logp.exp_().sub_(p_t) if want_grad else None
        return d, grad
    p_s = s_logp.exp()
    if objective == "reverse_kl":
        r = s_logp - t_logp
        d = torch.sum(p_s * r, dim=-1)
        grad = p_s * (r - d.unsqueeze(-1)) if want_grad else None
    elif objective == "jsd":
        p_t = t_logp.exp()
        log_m = torch.logaddexp(t_logp + math.log(jsd_beta), s_logp + math.log(1.0 - jsd_beta))
        kl_t = torch.sum(p_t * (t_logp - log_m), dim=-1)
        kl_s = torch.sum(p_s * (s_logp - log_m), dim=-1)
        d = jsd_beta * kl_t + (1.0 - jsd_beta) * kl_s
        if want_grad:
            g = (1.0 - jsd_beta) * (s_logp - log_m)
            grad = p_s * (g - torch.sum(p_s * g, dim=-1, keepdim=True))
        else:
            grad = None
    else:  # pragma: no cover - guarded by validate_objective
        raise ValueError(objective)
    return d, grad


def effective_objective(objective: str, jsd_beta: float) -> str:
    """The divergence actually computed: "jsd" with β = 0 is "forward_kl" and with β = 1
    "reverse_kl" (TRL GKD's convention; the JSD there is 0 with a zero gradient)."""
    if objective == "jsd" and jsd_beta <= 0.0:
        return "forward_kl"
    if objective == "jsd" and jsd_beta >= 1.0:
        return "reverse_kl"
    return objective


def _upcast(x: Tensor) -> Tensor:
    """At least fp32: bf16/fp16 logits are upcast, fp64 (tests) is kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def validate_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def _chunk_terms(
    s: Tensor,
    t: Tensor,
    inv_n: float,
    temperature: float,
    objective: str,
    jsd_beta: float,
    alpha_kl: float,
    beta_ce: float,
    want_grad: bool,
    labels: Tensor | None = None,
    lm_ce: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The vocabulary terms of one chunk of fp32 logits s: [c, V_S], t: [c, V_T] (both
    consumed).

    labels: [c] the data's next tokens, for the CE on the data weighted by lm_ce.
    D and CE(argmax t) use the shared prefix v = min(V_S, V_T) (the vocabularies are
    aligned for distillation only); CE(labels) is the student's NLL under its own full
    softmax over V_S, so padding rows beyond V_T get its gradient too.
    Returns (Σ D, Σ CE(argmax t), Σ CE(labels), dL/ds [c, V_S]) where dL/ds is already
    weighted and divided by the number of rows n of the whole batch (inv_n = 1/n). The
    CE terms come first so that the raw logits can be freed before the
    temperature-scaled log-probabilities exist.
    """
    v = min(s.shape[1], t.shape[1])
    t = t[:, :v]
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    kd_sum, ce_sum, lm_sum, g = zero, zero, zero, None
    if beta_ce != 0.0 or lm_ce != 0.0:
        ce_sum, lm_sum, g = _hard_ce(s, t, v, labels, beta_ce, lm_ce, want_grad)
        g = g.mul_(inv_n) if g is not None else None
    if alpha_kl != 0.0:
        inv_t = 1.0 / temperature
        t_logp = F.log_softmax(t.mul_(inv_t), dim=-1)
        del t
        s_logp = F.log_softmax(s[:, :v].mul_(inv_t), dim=-1)
        d, dd = _divergence_rows(s_logp, t_logp, objective, jsd_beta, want_grad)
        del s_logp, t_logp
        kd_sum = d.sum()
        if want_grad:
            # d(T² D)/dz = T² · dD/ds · (1/T) = T · dD/ds
            dd.mul_(alpha_kl * temperature * inv_n)
            if g is None and v == s.shape[1]:
                g = dd
            else:
                g = torch.zeros_like(s) if g is None else g
                g[:, :v].add_(dd)
    return kd_sum, ce_sum, lm_sum, g


def _hard_ce(
    s: Tensor,
    t: Tensor,
    v: int,
    labels: Tensor | None,
    beta_ce: float,
    lm_ce: float,
    want_grad: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(Σ CE(s[:, :v], argmax t), Σ CE(s, labels), their weighted gradient [c, V_S]).

    s: [c, V_S] student logits, t: [c, v] teacher logits on the shared prefix. The
    argmax CE is renormalised over the prefix (it is a distillation term), the data CE
    uses the full softmax. Gradient: Σ_k w_k (softmax_k(s) − onehot(y_k)), unscaled by 1/n.
    """
    rows = torch.arange(s.shape[0], device=s.device)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    logp = F.log_softmax(s, dim=-1)  # [c, V_S], the student's own softmax
    ce_sum, lm_sum, g = zero, zero, None
    padded = v < s.shape[1]
    # log of the prefix's share of the probability mass: renormalises to the prefix
    lse = torch.logsumexp(logp[:, :v], dim=-1) if padded and beta_ce != 0.0 else None
    target = t.argmax(dim=-1) if beta_ce != 0.0 else None
    if target is not None:
        picked = logp[rows, target]
        ce_sum = -(picked - lse).sum() if lse is not None else -picked.sum()
    if lm_ce != 0.0:
        lm_sum = -logp[rows, labels].sum()
    if want_grad:
        p = logp.exp_()  # softmax over V_S, in place: one [c, V_S] tensor
        q = p[:, :v] / lse.exp().unsqueeze(-1) if lse is not None else None
        g = p.mul_(lm_ce if q is not None else beta_ce + lm_ce)
        if q is not None:
            g[:, :v].add_(q, alpha=beta_ce)
        if target is not None:
            g[rows, target] -= beta_ce
        if lm_ce != 0.0:
            g[rows, labels] -= lm_ce
    return ce_sum, lm_sum, g
