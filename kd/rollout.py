"""Generated continuations for on-policy (GKD) and sequence-level distillation.

`generate` samples continuations of a batch of prompts: batched, with the KV cache,
the model in eval mode and without grad (its train mode restored after), each sequence
stopping at its own EOS. It runs `model.generate` (seeded through a forked global RNG):
on CPU it was 4x faster than our own loop over the model with past_key_values
(`_decode`, kept for comparison; bench/rollout_speed.py: 47.7 vs 11.8 tokens/s, derived
15-layer student, batch 8, 32 new tokens, 2 threads on a busy machine).
`BatchSource.next_batch` is the loop's one call: it returns the off-policy data batch
or a generated one, as

    input_ids [B, L], attention_mask [B, L], loss_mask [B, L] (1 on continuation tokens)

Padding. Prompts are padded on the LEFT while decoding: every row appends its next
token in the same column, so each prompt must end in the last column (prompts taken
from packed blocks all have `prompt_tokens` real tokens and need none). The returned
batch is RIGHT-padded (prompt, continuation, padding), only as far as the longest
sequence of the batch: the training forward then sees positions 0.. for every row,
exactly like the packed data, whatever the model's position embedding.

Masking. loss_mask is 1 on the generated tokens up to and including the first EOS and
0 on the prompt, the padding and everything after EOS; the loss shifts it (position t
counts when token t+1 is a continuation token: `kd.losses.target_mask`).

Seeds. Each micro-batch's sampling uses a torch.Generator seeded from (seed, global
micro-batch index, rank), so every worker draws its own samples and a resumed run
draws the same ones. Which batches are on-policy is a deterministic stride: batch k is
on-policy when floor((k+1)·λ) > floor(k·λ), i.e. exactly a λ share of batches, the same
on every rank (TRL flips a coin per step; the expected share is the same).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.data import BlockSampler
from kd.prompts import PromptSet, block_prompts, left_pad, load_prompt_set


@dataclass(frozen=True)
class GenSettings:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False

    @classmethod
    def from_config(cls, cfg, greedy: bool = False) -> GenSettings:
        return cls(cfg.max_new_tokens, cfg.gen_temperature, cfg.gen_top_p, greedy)


def rollout_seed(seed: int, k: int, rank: int) -> int:
    """A generator seed for micro-batch k of rank `rank` (distinct for every triple)."""
    return ((seed * 1_000_003 + k) * 8191 + rank) % (2**63 - 1)


def on_policy_at(lmbda: float, k: int) -> bool:
    """Whether micro-batch k is on-policy: exactly a λ share, spread evenly."""
    return math.floor((k + 1) * lmbda + 1e-9) > math.floor(k * lmbda + 1e-9)


# ---------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------
def pick_next(logits: Tensor, gen: GenSettings, generator: torch.Generator | None) -> Tensor:
    """[B, V] logits -> [B] next tokens (greedy, or temperature + top-p sampling)."""
    if gen.greedy:
        return logits.argmax(dim=-1)
    probs = F.softmax(logits.float() / gen.temperature, dim=-1)
    if gen.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens before it already cover top_p (keeps >= 1)
        sorted_p[(sorted_p.cumsum(dim=-1) - sorted_p) > gen.top_p] = 0.0
        choice = torch.multinomial(sorted_p, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def _decode(model, ids, mask, gen, eos_id, pad_id, generator) -> tuple[Tensor, Tensor]:
    """Our own loop over the HF model with past_key_values: ([B, T] new ids, [B] lengths).

    Slower than `model.generate` on CPU (see the module doc); kept as the reference."""
    bsz = ids.shape[0]
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: real tokens start at 0
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1
    )
    new = torch.full((bsz, gen.max_new_tokens), pad_id, dtype=torch.long, device=ids.device)
    lengths = torch.zeros(bsz, dtype=torch.long, device=ids.device)
    done = torch.zeros(bsz, dtype=torch.bool, device=ids.device)
    next_pos = pos[:, -1:] + 1
    ones = torch.ones((bsz, 1), dtype=mask.dtype, device=mask.device)
    for i in range(gen.max_new_tokens):
        tok = pick_next(out.logits[:, -1], gen, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        new[:, i] = tok
        lengths += (~done).long()
        done |= tok == eos_id
        # note: a CPU-GPU sync per token; it lets the whole batch stop at its last EOS
        if i == gen.max_new_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, ones], dim=1)
        out = model(
            input_ids=tok[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        next_pos = next_pos + 1
    return new[:, : int(lengths.max())], lengths


@torch.no_grad()
def _decode_hf(model, ids, mask, gen, eos_id, pad_id, generator) -> tuple[Tensor, Tensor]:
    """`model.generate`, seeded from `generator` through a forked global RNG."""
    seed = None
    if generator is not None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    devices = [ids.device] if ids.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=gen.max_new_tokens,
            do_sample=not gen.greedy,
            temperature=gen.temperature if not gen.greedy else None,
            top_p=gen.top_p if not gen.greedy else None,
            top_k=0 if not gen.greedy else None,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
    new = out[:, ids.shape[1] :]
    is_eos = new == eos_id
    first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, new.shape[1])
    return new[:, : int(first.max()) if new.numel() else 0], first


def generate(
    model: nn.Module,
    prompts: list[list[int]],
    gen: GenSettings,
    *,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    use_hf_generate: bool = True,
) -> dict[str, Tensor]:
    """Continue each prompt; returns a right-padded training batch (see module doc).

    Returns input_ids, attention_mask, loss_mask [B, L] and gen_lengths [B] (generated
    tokens up to and including EOS), with L = longest prompt + continuation.
    """
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    was_training = model.training
    model.eval()
    try:
        decode = _decode_hf if use_hf_generate else _decode
        new, lengths = decode(model, ids, mask, gen, eos_id, pad_id, generator)
    finally:
        model.train(was_training)
    return right_padded(prompts, new.cpu(), lengths.cpu(), pad_id)


def right_padded(
    prompts: list[list[int]], new: Tensor, lengths: Tensor, pad_id: int
) -> dict[str, Tensor]:
    """prompt + the first lengths[b] new tokens per row, right-padded to the longest."""
    rows = [len(p) + int(n) for p, n in zip(prompts, lengths, strict=True)]
    width = max(rows)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    loss = torch.zeros_like(ids)
    for b, (p, n) in enumerate(zip(prompts, lengths.tolist(), strict=True)):
        ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        ids[b, len(p) : len(p) + n] = new[b, :n]
        attn[b, : len(p) + n] = 1
        loss[b, len(p) : len(p) + n] = 1
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "loss_mask": loss,
        "gen_lengths": lengths.clone(),
    }


def with_responses(prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Off-policy batch of instruction data: prompt + the data's response, right-padded."""
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    width = max(1, int(lengths.max()))
    new = torch.full((len(responses), width), pad_id, dtype=torch.long)
    for b, r in enumerate(responses):
        new[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    batch = right_padded(prompts, new, lengths, pad_id)
    del batch["gen_lengths"]
    return batch


# ---------------------------------------------------------------------------------
# The loop's batch source
# ---------------------------------------------------------------------------------
class BatchSource:
    """Serves the training loop one micro-batch at a time: `next_batch(step, micro)`.

    Off-policy batches are the packed data blocks (plain corpora; no loss_mask: every
    real token counts, as before) or prompt + the data's response (`prompt_column`).
    With seq_kd the teacher writes the off-policy continuations; a λ share of batches
    have continuations that the student writes. Generated and instruction batches carry
    `loss_mask`; every batch carries `on_policy` (bool) and `rollout_tokens` (int).
    """

    def __init__(self, run):
        cfg = run.cfg
        self.run, self.cfg = run, cfg
        tok = run.tokenizer
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos
        self.gen = GenSettings.from_config(cfg)
        # What this rank generated: a count and a digest of the continuation tokens, so a
        # job can show that every worker wrote its own samples (train_job gathers them).
        self.generated, self.digest = 0, hashlib.sha256()
        self.prompts: PromptSet | None = None
        self.sampler: BlockSampler | None = None
        if cfg.prompt_column is not None:
            self.prompts = load_prompt_set(cfg, tok, "train")
            bs, world = cfg.per_device_batch_size, run.world
            self.sampler = BlockSampler(len(self.prompts), bs, cfg.seed, run.rank, world)

    def _prompt_indices(self, k: int) -> list[int]:
        """Micro-batch k of this rank, without state: a resumed run recomputes it."""
        s = self.sampler
        epoch, pos = divmod(k, s.batches_per_epoch)
        s.load_state({"epoch": epoch, "pos": pos})
        return s.next_indices().tolist()

    def next_batch(self, step: int, micro: int = 0) -> dict:
        cfg, run = self.cfg, self.run
        k = step * cfg.grad_accum_steps + micro
        on_policy = on_policy_at(cfg.lmbda, k)
        writer = run.student if on_policy else (run.teacher if cfg.seq_kd else None)
        if self.prompts is not None:
            idx = self._prompt_indices(k)
            prompts = [self.prompts.prompts[i] for i in idx]
            if writer is None:
                responses = [self.prompts.responses[i] for i in idx]
                batch = with_responses(prompts, responses, self.pad)
                return batch | {"on_policy": False, "rollout_tokens": 0}
        else:
            data = run.train_data.batch(run.sampler.next_indices())
            if writer is None:
                return data | {"on_policy": False, "rollout_tokens": 0}
            prompts = block_prompts(
                data["input_ids"], data["attention_mask"], cfg.prompt_tokens
            ).prompts
        g = torch.Generator(device=run.device)
        g.manual_seed(rollout_seed(cfg.seed, k, run.rank))
        with run.autocast:
            batch = generate(
                writer,
                prompts,
                self.gen,
                eos_id=self.eos,
                pad_id=self.pad,
                generator=g,
                device=run.device,
            )
        tokens = int(batch.pop("gen_lengths").sum())
        self.generated += 1
        self.digest.update(batch["input_ids"][batch["loss_mask"].bool()].cpu().numpy().tobytes())
        return batch | {"on_policy": on_policy, "rollout_tokens": tokens}
