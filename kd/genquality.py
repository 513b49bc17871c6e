"""Generation quality: what the student writes, scored by the teacher.

For N held-out prompts (fixed by seed) each model writes a sampled and a greedy
continuation. The sampled ones are scored token by token, over the continuation only
(prompt and padding excluded, the EOS that ends a continuation included):

* teacher NLL per token: −log p_T(y_t | x, y_<t), the teacher's surprise at the text;
* reverse KL per token: KL(p_M ‖ p_T) = Σ_v p_M(v) (log p_M(v) − log p_T(v)) at T = 1,
  where M is the model that wrote the text. This and the NLL are what on-policy
  distillation optimises: lower means the model writes what the teacher would.

Rows: the teacher's own samples (the floor: its reverse KL is 0 by definition), the
untrained student's (the ceiling) and the trained student's. Degeneration, on the
sampled and on the greedy text: the repeated-4-gram rate (share of 4-grams that already
occurred earlier in the same continuation) and distinct-2 (distinct bigrams / bigrams,
pooled over all continuations). `section` puts rows and 3 side-by-side greedy samples
into a dict for report.json; `render_markdown` turns it into report.md's section.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from kd.data import Packed
from kd.losses import align_vocab, target_mask
from kd.prompts import PromptSet, block_prompts, embedded_heldout, load_prompt_set
from kd.rollout import GenSettings, generate, right_padded
from kd.spec import EMBEDDED_DATASET

ROWS = ("teacher", "untrained_student", "student")


# ---------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------
def heldout_prompts(cfg, tokenizer, eval_data: Packed, n: int = 32, seed: int = 0) -> PromptSet:
    """N held-out prompts fixed by seed: the prompt column's held-out split, the embedded
    held-out prompt set, or the first prompt_tokens of held-out blocks."""
    if cfg.prompt_column is not None:
        pool = load_prompt_set(cfg, tokenizer, "heldout")
    elif cfg.dataset == EMBEDDED_DATASET:
        pool = embedded_heldout(tokenizer)
    else:
        pool = block_prompts(eval_data.input_ids, eval_data.attention_mask, cfg.prompt_tokens)
        pool = PromptSet([p for p in pool.prompts if p])
    return select(pool, n, seed)


def select(pool: PromptSet, n: int, seed: int) -> PromptSet:
    """n prompts drawn without replacement by a seeded shuffle (all of them if fewer)."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    keep = sorted(order[: min(n, len(pool))])
    texts = [pool.texts[i] for i in keep] if pool.texts else None
    return PromptSet([pool.prompts[i] for i in keep], None, texts)


# ---------------------------------------------------------------------------------
# Degeneration
# ---------------------------------------------------------------------------------
def repeat_ngram_rate(seqs: list[list[int]], n: int = 4) -> float:
    """Share of n-grams that already occurred earlier in the same sequence (pooled)."""
    repeated = total = 0
    for s in seqs:
        seen: set[tuple[int, ...]] = set()
        for i in range(len(s) - n + 1):
            g = tuple(s[i : i + n])
            repeated += g in seen
            total += 1
            seen.add(g)
    return repeated / total if total else 0.0


def distinct_n(seqs: list[list[int]], n: int = 2) -> float:
    """Distinct n-grams / all n-grams, pooled over every sequence (1: no repetition)."""
    grams = [tuple(s[i : i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ---------------------------------------------------------------------------------
# Writing and scoring
# ---------------------------------------------------------------------------------
def continuations(
    model: nn.Module,
    prompts: list[list[int]],
    gen: GenSettings,
    *,
    eos_id: int,
    pad_id: int,
    seed: int = 0,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> list[list[int]]:
    """Each prompt's continuation (up to and including EOS), in prompt order."""
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + start)
        b = generate(model, chunk, gen, eos_id=eos_id, pad_id=pad_id, generator=g, device=device)
        for ids, lm in zip(b["input_ids"], b["loss_mask"], strict=True):
            out.append(ids[lm.bool()].tolist())
    return out


@torch.no_grad()
def score(
    writer: nn.Module,
    teacher: nn.Module,
    prompts: list[list[int]],
    conts: list[list[int]],
    *,
    pad_id: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Teacher NLL and KL(p_writer ‖ p_T) per continuation token (T = 1)."""
    nll = rkl = 0.0
    count = 0
    was = writer.training, teacher.training
    writer.eval(), teacher.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            ps, cs = prompts[start : start + batch_size], conts[start : start + batch_size]
            lengths = torch.tensor([len(c) for c in cs])
            if int(lengths.sum()) == 0:
                continue
            width = max(1, int(lengths.max()))
            new = torch.full((len(cs), width), pad_id, dtype=torch.long)
            for i, c in enumerate(cs):
                new[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            b = {k: v.to(device) for k, v in right_padded(ps, new, lengths, pad_id).items()}
            ids, mask = b["input_ids"], b["attention_mask"]
            tm = target_mask(mask, b["loss_mask"])  # position t predicts continuation t+1
            s_logits = writer(input_ids=ids, attention_mask=mask, use_cache=False).logits[tm]
            t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits[tm]
            s_logits, t_logits = align_vocab(s_logits.float(), t_logits.float())
            target = ids[:, 1:][tm[:, :-1]]
            t_logp = F.log_softmax(t_logits, dim=-1)
            s_logp = F.log_softmax(s_logits, dim=-1)
            nll -= float(t_logp.gather(-1, target[:, None]).sum())
            rkl += float((s_logp.exp() * (s_logp - t_logp)).sum())
            count += int(tm.sum())
    finally:
        writer.train(was[0]), teacher.train(was[1])
    return {
        "teacher_nll": nll / max(count, 1),
        "reverse_kl": rkl / max(count, 1),
        "tokens": count,
    }


def evaluate_model(
    model: nn.Module,
    teacher: nn.Module,
    prompts: PromptSet,
    gen: GenSettings,
    *,
    eos_id: int,
    pad_id: int,
    seed: int = 0,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> dict:
    """One row: sampled continuations scored by the teacher, degeneration of sampled and
    greedy text, and the greedy continuations themselves (token ids)."""
    kw = dict(eos_id=eos_id, pad_id=pad_id, batch_size=batch_size, device=device)
    sampled = continuations(model, prompts.prompts, gen, seed=seed, **kw)
    greedy_gen = GenSettings(gen.max_new_tokens, 1.0, 1.0, greedy=True)
    greedy = continuations(model, prompts.prompts, greedy_gen, **kw)
    row = score(
        model,
        teacher,
        prompts.prompts,
        sampled,
        pad_id=pad_id,
        batch_size=batch_size,
        device=device,
    )
    row.update(
        mean_len=sum(map(len, sampled)) / max(len(sampled), 1),
        repeat_4gram=repeat_ngram_rate(sampled, 4),
        distinct_2=distinct_n(sampled, 2),
        greedy_repeat_4gram=repeat_ngram_rate(greedy, 4),
        greedy_distinct_2=distinct_n(greedy, 2),
        greedy_ids=greedy,
    )
    return row


# ---------------------------------------------------------------------------------
# Report section
# ---------------------------------------------------------------------------------
def section(
    rows: dict[str, dict], prompts: PromptSet, tokenizer, gen: GenSettings, n_show: int = 3
) -> dict:
    """report.json's generation-quality section: metrics per row and side-by-side
    greedy continuations of the first n_show prompts (rows: teacher, untrained_student,
    student; any may be missing)."""
    metrics = {
        name: {
            k: round(v, 5) if isinstance(v, float) else v for k, v in r.items() if k != "greedy_ids"
        }
        for name, r in rows.items()
    }
    shown = []
    for i in range(min(n_show, len(prompts))):
        prompt = prompts.texts[i] if prompts.texts else tokenizer.decode(prompts.prompts[i])
        item = {"prompt": prompt}
        for name, r in rows.items():
            item[name] = tokenizer.decode(r["greedy_ids"][i], skip_special_tokens=True).strip()
        shown.append(item)
    return {
        "n_prompts": len(prompts),
        "max_new_tokens": gen.max_new_tokens,
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "rows": metrics,
        "side_by_side": shown,
    }


_LABELS = {
    "teacher": "teacher (floor)",
    "untrained_student": "untrained student (ceiling)",
    "student": "trained student",
}


def render_markdown(sec: dict) -> str:
    """report.md's '## Generation quality' section."""
    lines = [
        "## Generation quality",
        "",
        f"{sec['n_prompts']} held-out prompts, up to {sec['max_new_tokens']} new tokens, "
        f"sampled at temperature {sec['temperature']}, top-p {sec['top_p']}. Teacher NLL and "
        "reverse KL (writer ‖ teacher) are per continuation token of the sampled text; "
        "lower means the model writes what the teacher would.",
        "",
        "| writer | teacher NLL | reverse KL | mean length | repeated 4-grams | distinct-2 | "
        "greedy repeated 4-grams | greedy distinct-2 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in sec["rows"].items():
        lines.append(
            f"| {_LABELS.get(name, name)} | {r['teacher_nll']:.3f} | {r['reverse_kl']:.3f} | "
            f"{r['mean_len']:.1f} | {r['repeat_4gram']:.3f} | {r['distinct_2']:.3f} | "
            f"{r['greedy_repeat_4gram']:.3f} | {r['greedy_distinct_2']:.3f} |"
        )
    for i, item in enumerate(sec["side_by_side"], 1):
        lines += ["", f"### Prompt {i}", "", _quote(item["prompt"])]
        for name in ROWS:
            if name in item:
                lines += ["", f"**{_LABELS[name]}** (greedy):", "", _quote(item[name] or "(empty)")]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in text.splitlines() or [""])
