"""Held-out evaluation: perplexity, teacher–student agreement and KL.

All numbers are token-weighted over real targets of the held-out blocks (position t
predicts token t+1; the last position of a block and padding are excluded).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.data import Packed
from kd.losses import align_vocab, target_mask

# A callable mapping (input_ids [B, L], attention_mask [B, L]) -> logits [B, L, V].
LogitsFn = Callable[[Tensor, Tensor], Tensor]


def logits_fn(model: nn.Module) -> LogitsFn:
    def fn(ids: Tensor, mask: Tensor) -> Tensor:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    return fn


def _batches(data: Packed, batch_size: int, max_blocks: int | None, device):
    n = len(data) if max_blocks is None else min(len(data), max_blocks)
    for i in range(0, n, batch_size):
        b = data.batch(list(range(i, min(i + batch_size, n))))
        yield b["input_ids"].to(device), b["attention_mask"].to(device)


@torch.no_grad()
def perplexity(
    model: nn.Module | LogitsFn,
    data: Packed,
    *,
    batch_size: int = 4,
    max_blocks: int | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """exp(mean next-token NLL over real targets) of `model` on `data`."""
    fn = logits_fn(model) if isinstance(model, nn.Module) else model
    nll, count = 0.0, 0
    for ids, mask in _batches(data, batch_size, max_blocks, device):
        logits = fn(ids, mask)[:, :-1].float()
        tm = target_mask(mask)[:, :-1]
        tok_nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view_as(tm)
        nll += float(tok_nll[tm].sum())
        count += int(tm.sum())
    if count == 0:
        raise ValueError("no held-out targets to evaluate on")
    return math.exp(min(nll / count, 700.0))


@torch.no_grad()
def compare(
    teacher: nn.Module | LogitsFn,
    student: nn.Module | LogitsFn,
    data: Packed,
    *,
    batch_size: int = 4,
    max_blocks: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Perplexities of both, top-1 next-token agreement and mean KL(teacher‖student).

    Each perplexity is the model's own full softmax (equal to `perplexity`); only the
    agreement and the KL use the shared vocabulary prefix when the sizes differ by
    padding rows.
    """
    t_fn = logits_fn(teacher) if isinstance(teacher, nn.Module) else teacher
    s_fn = logits_fn(student) if isinstance(student, nn.Module) else student
    sums = {"t_nll": 0.0, "s_nll": 0.0, "agree": 0.0, "kl": 0.0}
    count = 0
    for ids, mask in _batches(data, batch_size, max_blocks, device):
        tm = target_mask(mask)[:, :-1]
        tgt = ids[:, 1:][tm]
        s_logits, t_logits = (
            s_fn(ids, mask)[:, :-1].float()[tm],
            t_fn(ids, mask)[:, :-1].float()[tm],
        )
        # NLL: each model's own full softmax [n, V_S] / [n, V_T]
        sums["s_nll"] -= float(F.log_softmax(s_logits, -1).gather(1, tgt[:, None]).sum())
        sums["t_nll"] -= float(F.log_softmax(t_logits, -1).gather(1, tgt[:, None]).sum())
        s_logits, t_logits = align_vocab(s_logits, t_logits)
        s_lp = F.log_softmax(s_logits, -1)  # [n, V], the shared prefix
        t_lp = F.log_softmax(t_logits, -1)
        sums["agree"] += float((s_lp.argmax(-1) == t_lp.argmax(-1)).sum())
        sums["kl"] += float((t_lp.exp() * (t_lp - s_lp)).sum())
        count += int(tm.sum())
    if count == 0:
        raise ValueError("no held-out targets to evaluate on")
    return {
        "teacher_ppl": math.exp(min(sums["t_nll"] / count, 700.0)),
        "student_ppl": math.exp(min(sums["s_nll"] / count, 700.0)),
        "top1_agreement": sums["agree"] / count,
        "kl_teacher_student": sums["kl"] / count,
        "eval_tokens": count,
    }


@torch.no_grad()
def logits_parity(reference, candidate, batches) -> dict[str, float]:
    """Max |Δlogit| over real tokens and top-1 agreement of two logits functions."""
    max_diff, agree, count = 0.0, 0, 0
    for ids, mask in batches:
        a, b = reference(ids, mask).float(), candidate(ids, mask).float()
        real = mask.bool()
        max_diff = max(max_diff, float((a - b).abs()[real].max()))
        agree += int((a.argmax(-1) == b.argmax(-1))[real].sum())
        count += int(real.sum())
    return {"max_abs_logit_diff": max_diff, "top1_agreement": agree / max(count, 1)}
