"""Prompts for generated continuations: instruction records and the embedded prompt set.

Two sources of prompts feed on-policy distillation (`kd.rollout`) and the
generation-quality evaluation (`kd.genquality`):

* plain corpora: the first `prompt_tokens` of each packed block (`block_prompts`);
* instruction data (`prompt_column`): each record's prompt, wrapped in the tokenizer's
  chat template when it has one, with the response column as the off-policy
  continuation (`load_prompt_set`).

The embedded corpus is itself such data: every line of kd/corpus/smollm2_generated.jsonl
holds the `prompt` that made its `text`. Its split is fixed, not seeded, so every job
reports generation quality on the same prompts: the 4 prompts (one per style) of every
topic whose index is 4 mod 10 are held out (10 topics, 40 prompts), the other 352 train.
Grouping by topic keeps a held-out topic out of the training prompts entirely.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kd.config import EMBEDDED_DATASET, DistillConfig
from kd.data import DataError, split_documents
from kd.sources import CORPUS_DIR, detect_text_column

EMBEDDED_FILE = CORPUS_DIR / "smollm2_generated.jsonl"
STYLES_PER_TOPIC = 4  # scripts/make_corpus.py writes every topic's 4 styles in a row


@dataclass
class PromptSet:
    """Tokenized prompts and, for instruction data, their responses (EOS appended)."""

    prompts: list[list[int]]
    responses: list[list[int]] | None = None
    texts: list[str] | None = None  # the raw prompts, for reports

    def __len__(self) -> int:
        return len(self.prompts)


# ---------------------------------------------------------------------------------
# Reading records
# ---------------------------------------------------------------------------------
def embedded_records(split: str) -> list[dict[str, str]]:
    """The embedded prompt set: {'prompt', 'text'} records of the 'train' or 'heldout' split."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    with EMBEDDED_FILE.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    held = [(i // STYLES_PER_TOPIC) % 10 == 4 for i in range(len(rows))]
    want_held = split == "heldout"
    return [r for r, h in zip(rows, held, strict=True) if h == want_held]


def _read_records(cfg: DistillConfig) -> list[dict]:
    path = Path(cfg.dataset).expanduser()
    if path.is_file() and path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.is_file() and path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, list):
            return data
    if path.is_file() and path.suffix.lower() in (".csv", ".parquet"):
        import pandas as pd

        df = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
        return df.to_dict(orient="records")
    if path.exists():
        raise DataError(
            f"prompt_column needs a .jsonl, .json (a list of records), .csv or .parquet "
            f"file; '{cfg.dataset}' is not one"
        )
    import datasets

    try:
        ds = datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split)
    except Exception as e:  # the hub raises many types; the message is what matters
        raise DataError(f"cannot load dataset '{cfg.dataset}': {type(e).__name__}: {e}") from e
    return [dict(r) for r in ds]


def prompt_records(cfg: DistillConfig) -> tuple[list[dict], list[dict], str, str]:
    """(train, held_out, prompt column, response column) of an instruction dataset."""
    if cfg.prompt_column is None:
        raise ValueError("prompt_records needs prompt_column")
    if cfg.dataset == EMBEDDED_DATASET:
        train, held = embedded_records("train"), embedded_records("heldout")
        rows = train
    else:
        rows = _read_records(cfg)
        if cfg.max_texts is not None:
            rows = rows[: cfg.max_texts]
        train = held = []
    if not rows:
        raise DataError(f"dataset '{cfg.dataset}' holds no records")
    columns = list(rows[0].keys())
    if cfg.prompt_column not in columns:
        raise DataError(
            f"prompt_column '{cfg.prompt_column}' not found; the dataset has columns {columns}"
        )
    others = [c for c in columns if c != cfg.prompt_column]
    response = detect_text_column(others, rows[0], cfg.text_column)
    rows = [r for r in rows if isinstance(r.get(cfg.prompt_column), str)]
    if cfg.dataset != EMBEDDED_DATASET:
        train, held = split_documents(rows, cfg.eval_fraction, cfg.seed)
    return train, held, cfg.prompt_column, response


# ---------------------------------------------------------------------------------
# Tokenizing
# ---------------------------------------------------------------------------------
def format_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of one prompt: the chat template's user turn + generation prompt when
    the tokenizer has a template, else the plain text."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_records(
    tokenizer,
    records: list[dict],
    prompt_col: str,
    response_col: str | None,
    max_prompt: int,
    max_len: int,
) -> PromptSet:
    """Prompts truncated to their last `max_prompt` tokens; responses + EOS truncated so
    that prompt + response fit in `max_len`."""
    eos = tokenizer.eos_token_id
    prompts, responses, texts = [], [], []
    for r in records:
        p = format_prompt(tokenizer, r[prompt_col])[-max_prompt:]
        prompts.append(p)
        texts.append(r[prompt_col])
        if response_col is not None:
            body = str(r.get(response_col) or "")
            ids = list(tokenizer(body, add_special_tokens=False)["input_ids"]) + [eos]
            responses.append(ids[: max_len - len(p)])
    return PromptSet(prompts, responses if response_col is not None else None, texts)


def load_prompt_set(cfg: DistillConfig, tokenizer, split: str = "train") -> PromptSet:
    """The tokenized 'train' or 'heldout' prompt set of a `prompt_column` job."""
    train, held, pcol, rcol = prompt_records(cfg)
    rows = train if split == "train" else held
    if not rows:
        raise DataError(f"the {split} split of '{cfg.dataset}' has no prompts")
    max_prompt = cfg.max_seq_len - cfg.max_new_tokens
    return tokenize_records(tokenizer, rows, pcol, rcol, max_prompt, cfg.max_seq_len)


def embedded_heldout(tokenizer, max_prompt: int = 192) -> PromptSet:
    """The embedded held-out prompts (chat-formatted), for any job's generation report."""
    rows = embedded_records("heldout")
    return tokenize_records(tokenizer, rows, "prompt", None, max_prompt, max_prompt)


def block_prompts(input_ids: Tensor, attention_mask: Tensor, n_tokens: int) -> PromptSet:
    """The first `n_tokens` real tokens of each packed block, as prompts."""
    out = []
    for ids, m in zip(input_ids, attention_mask, strict=True):
        out.append(ids[:n_tokens][m[:n_tokens].bool()].tolist())
    return PromptSet(out)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """[B, P] ids and mask, padded on the left to the longest prompt.

    Batched decoding appends every row's next token in the same column, so each
    prompt's last token must sit in the last column: padding goes on the left.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask
