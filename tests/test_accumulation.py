"""Gradient accumulation and DDP train on the global batch, token-weighted.

One optimizer step over micro-batches (and ranks) must give the gradient and the logged
losses of one big batch: every term a mean over the real target (or real) tokens of
all micro-batches on all ranks, so a short tail block weighs per token what a full one
does. References: `hybrid_loss` on the whole batch in one call.
"""

import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kd.config import DistillConfig
from kd.losses import LossWeights, hybrid_loss
from kd.models import DistillForward
from kd.train import Run, _Window, train_step

L, VOCAB = 12, 40
# Every kind of term: vocabulary terms over target tokens, cos/mse over real tokens.
LOSS = dict(alpha_kl=1.0, beta_ce=0.2, lm_ce=1.0, delta_cos=0.3, gamma_mse=0.5)


def tiny_lm(seed: int, layers: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(cfg).float()


def blocks() -> tuple[torch.Tensor, torch.Tensor]:
    """4 blocks [4, L]: full, tail (3 real tokens), full, short (7 real tokens)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (4, L), generator=g)
    mask = torch.ones(4, L, dtype=torch.long)
    mask[1, 3:] = 0
    mask[3, 7:] = 0
    ids[mask == 0] = 0
    return ids, mask


class ListSource:
    """The loop's batch source over fixed micro-batches: next_batch(step, micro)."""

    def __init__(self, ids, mask):
        self.ids, self.mask = ids, mask

    def next_batch(self, step: int, micro: int = 0) -> dict:
        sl = slice(micro, micro + 1)
        return {"input_ids": self.ids[sl], "attention_mask": self.mask[sl], "on_policy": False}


def make_run(accum: int, fused: bool, wrap=None, rank: int = 0, world: int = 1) -> Run:
    cfg = DistillConfig(
        teacher_model="t",
        dataset="d",
        grad_accum_steps=accum,
        per_device_batch_size=1,
        max_seq_len=L,
        fused_lm_head=fused,
        max_grad_norm=1e6,  # no clipping: the raw accumulated gradient is compared
        **LOSS,
    )
    teacher, student = tiny_lm(0, 2).eval(), tiny_lm(1, 1).train()
    teacher.requires_grad_(False)
    fwd = DistillForward(student)
    fwd = wrap(fwd) if wrap is not None else fwd
    opt = torch.optim.SGD(student.parameters(), lr=0.0)  # the step leaves .grad intact
    return Run(
        cfg=cfg,
        device=torch.device("cpu"),
        tokenizer=None,
        teacher=teacher,
        teacher_fwd=DistillForward(teacher),
        student=student,
        student_fwd=fwd,
        train_data=None,
        eval_data=None,
        sampler=type("S", (), {"epoch": 0})(),
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        kept_layers=None,
        rank=rank,
        world=world,
    )


def reference(ids, mask, fused: bool) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Gradients and loss parts of the whole batch in one `hybrid_loss` call."""
    run = make_run(1, fused)
    kw = dict(fused_lm_head=fused)
    with torch.no_grad():
        t_logits, t_hidden, _ = run.teacher_fwd(ids, mask, **kw)
    s_logits, s_hidden, _ = run.student_fwd(ids, mask, **kw)
    loss, parts = hybrid_loss(
        s_logits,
        t_logits,
        mask,
        LossWeights(**LOSS),
        input_ids=ids,
        student_hidden=s_hidden,
        teacher_hidden=t_hidden,
    )
    loss.backward()
    grads = [p.grad.clone() for p in run.student.parameters()]
    return grads, {k: float(v) for k, v in parts.items()}


def step_and_log(run: Run, source) -> tuple[list[torch.Tensor], dict[str, float]]:
    window = _Window()
    window.add(train_step(run, LossWeights.from_config(run.cfg), source))
    grads = [p.grad.clone() for p in run.student.parameters()]
    return grads, window.flush(run)


def assert_same(grads, ref_grads, logged, ref_parts):
    """Gradients and logged losses equal the whole batch's; lists every difference."""
    bad = [
        f"grad {i}: max |diff| {float((g - r).abs().max()):.3g}, |ref| {float(r.norm()):.3g}"
        for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True))
        if not torch.allclose(g, r, rtol=1e-4, atol=1e-6)
    ]
    bad += [  # loss, kd, ce, lm, mse, cos
        f"logged {k}: {logged[k]:.6g}, whole batch {v:.6g}"
        for k, v in ref_parts.items()
        if logged[k] != pytest.approx(v, rel=1e-5)
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("fused", [True, False])
def test_accumulation_full_and_tail_block_equals_one_batch(fused):
    """grad_accum_steps=2 over a full block and a 3-token tail block: the gradient and
    the logged losses of the 2-block batch, not the mean of two per-block means (which
    weighs each tail token ~4× a full-block token)."""
    ids, mask = blocks()
    ids, mask = ids[:2], mask[:2]
    ref_grads, ref_parts = reference(ids, mask, fused)
    grads, logged = step_and_log(make_run(2, fused), ListSource(ids, mask))
    assert_same(grads, ref_grads, logged, ref_parts)
    assert logged["grad_norm"] == pytest.approx(
        float(torch.linalg.vector_norm(torch.stack([g.norm() for g in ref_grads]))), rel=1e-4
    )


def _rank_main(rank: int, world: int, rdzv: str, out: str) -> None:
    """One DDP rank (gloo): 2 micro-batches of its own (rank 0: blocks 0, 2; rank 1:
    blocks 1, 3), one step; saves its gradients and logged metrics."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdzv, rank=rank, world_size=world)
    try:
        ids, mask = blocks()
        mine = [rank, rank + 2]
        ddp = functools.partial(nn.parallel.DistributedDataParallel)
        run = make_run(2, True, wrap=ddp, rank=rank, world=world)
        grads, logged = step_and_log(run, ListSource(ids[mine], mask[mine]))
        torch.save({"grads": grads, "logged": logged}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_equal_one_batch(tmp_path):
    """2 gloo ranks × 2 micro-batches with a tail and a short block: every rank ends
    with the gradient of the 4-block batch, and logs its token-weighted losses (the
    same numbers on both ranks, not rank 0's own window); grad_norm is global too,
    because DDP all-reduces the gradients before clipping."""
    ids, mask = blocks()
    ref_grads, ref_parts = reference(ids, mask, True)
    rdzv = f"file://{tmp_path / 'rdzv'}"
    mp.start_processes(_rank_main, args=(2, rdzv, str(tmp_path)), nprocs=2, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for res in results:
        assert_same(res["grads"], ref_grads, res["logged"], ref_parts)
    assert results[0]["logged"]["grad_norm"] == results[1]["logged"]["grad_norm"]
