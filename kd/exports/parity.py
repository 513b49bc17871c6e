"""Parity of an exported artifact against the PyTorch student on held-out blocks.

Both sides are logits functions `ids [B, L] -> logits [B, L, V]` over full blocks
(every token real, no padding), so one helper serves GGUF, ONNX and GenAI artifacts.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BlockLogits = Callable[[Tensor], Tensor]


def torch_logits(model: nn.Module) -> BlockLogits:
    """A logits function for a Hugging Face causal LM (no cache, full attention mask)."""

    @torch.no_grad()
    def fn(ids: Tensor) -> Tensor:
        return model(input_ids=ids, use_cache=False).logits.float()

    return fn


def reference_logits(student: nn.Module | BlockLogits) -> BlockLogits:
    """The PyTorch student as a logits function (a callable is passed through, e.g. a
    `memoized` one shared by several checks)."""
    if isinstance(student, nn.Module):
        return torch_logits(student.eval())
    return student


def memoized(fn: BlockLogits) -> BlockLogits:
    """`fn` with its outputs kept per input, so the reference runs once for many artifacts
    (N·L·V·4 bytes: 8 blocks of 256 tokens over a 49k vocabulary hold 400 MB)."""
    cache: dict[bytes, Tensor] = {}

    def wrapped(ids: Tensor) -> Tensor:  # kept per row, so any batching hits the cache
        keys = [row.cpu().numpy().tobytes() for row in ids]
        missing = [i for i, k in enumerate(keys) if k not in cache]
        if missing:
            for i, out in zip(missing, fn(ids[missing]), strict=True):
                cache[keys[i]] = out
        return torch.stack([cache[k] for k in keys])

    return wrapped


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def parity(
    reference: BlockLogits, candidate: BlockLogits, blocks: Tensor, batch_size: int = 4
) -> dict[str, float]:
    """Compare two logits functions on `blocks` [N, L] of token ids.

    Returns max |Δlogit| over all positions, top-1 agreement of the candidate with the
    reference, and both perplexities (position t predicts token t+1).
    """
    if blocks.ndim != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [N, L>=2] token ids, got shape {tuple(blocks.shape)}")
    max_diff, agree, n_pos = 0.0, 0, 0
    nll_ref, nll_cand, n_tgt = 0.0, 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i : i + batch_size].long()
        a, b = reference(ids).float(), candidate(ids).float()
        if a.shape != b.shape:
            raise ValueError(f"logits shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        max_diff = max(max_diff, float((a - b).abs().max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n_pos += a.shape[0] * a.shape[1]
        tgt = ids[:, 1:].reshape(-1)
        nll_ref += float(F.cross_entropy(a[:, :-1].reshape(-1, a.shape[-1]), tgt, reduction="sum"))
        nll_cand += float(F.cross_entropy(b[:, :-1].reshape(-1, b.shape[-1]), tgt, reduction="sum"))
        n_tgt += tgt.numel()
    ppl_ref = math.exp(min(nll_ref / n_tgt, 700.0))
    ppl = math.exp(min(nll_cand / n_tgt, 700.0))
    return {
        "max_abs_logit_diff": max_diff,
        "top1_agreement": agree / n_pos,
        "ppl": ppl,
        "ppl_reference": ppl_ref,
        "ppl_ratio": ppl / ppl_ref,
        "eval_tokens": n_tgt,
    }


def artifact_row(path: str | Path, fp32_bytes: int | None = None) -> dict[str, object]:
    """Size and sha256 of an artifact file (or the sum over a folder's files)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    size = sum(f.stat().st_size for f in files)
    row: dict[str, object] = {"path": str(p), "bytes": size}
    if p.is_file():
        row["sha256"] = sha256_file(p)
    else:
        row["sha256"] = {f.relative_to(p).as_posix(): sha256_file(f) for f in files}
    if fp32_bytes:
        row["size_ratio_fp32"] = size / fp32_bytes
    return row
