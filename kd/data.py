"""Corpora, packing into fixed blocks, the held-out split, and deterministic order.

* `load_documents(cfg)` reads documents from the embedded corpus, a local file or
  folder (.txt, .jsonl/.json, .csv, .parquet) or a Hugging Face dataset.
* `split_documents` holds out whole documents (by seed), so no block that training
  sees shares text with an evaluation block.
* `pack` tokenizes, appends EOS after every document, concatenates and cuts into
  [max_seq_len] blocks. Only the final block may be partial; its tail is padding with
  attention_mask 0, so no token is lost and at most one block carries padding.
* `BlockSampler` yields a seeded permutation of blocks per epoch, sharded by rank, and
  can resume from any (epoch, position).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kd.config import EMBEDDED_DATASET, DistillConfig

CORPUS_DIR = Path(__file__).parent / "corpus"
PREFERRED_TEXT_COLUMNS = ("text", "content", "document", "body", "article", "story", "sentence")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """The dataset could not be read; the message names what was found and the fix."""


# ---------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------
def detect_text_column(columns: list[str], sample: dict, wanted: str | None) -> str:
    """The column to read text from: `wanted` if given, else a likely text column."""
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"text_column '{wanted}' not found; the dataset has columns {columns}")
        return wanted
    for c in PREFERRED_TEXT_COLUMNS:
        if c in columns and isinstance(sample.get(c), str):
            return c
    for c in columns:
        if isinstance(sample.get(c), str):
            return c
    raise DataError(
        f"no column holds text; the dataset has columns {columns}. Set text_column to the "
        "column with the documents"
    )


def _records_to_texts(records: list[dict], wanted: str | None) -> list[str]:
    if not records:
        return []
    col = detect_text_column(list(records[0].keys()), records[0], wanted)
    return [r[col] for r in records if isinstance(r.get(col), str)]


def _split_paragraphs(text: str) -> list[str]:
    """Plain text: one document per blank-line separated paragraph."""
    paras, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            paras.append("\n".join(cur))
            cur = []
    if cur:
        paras.append("\n".join(cur))
    return paras


def _read_local_file(path: Path, wanted: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _split_paragraphs(path.read_text(encoding="utf-8", errors="replace"))
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        return _records_to_texts(records, wanted)
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # {"data": [...]} or column-oriented {"text": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) == 1 and lists[0] and isinstance(lists[0][0], dict):
                data = lists[0]
            elif lists:
                keys = [k for k, v in data.items() if isinstance(v, list)]
                rows = zip(*(data[k] for k in keys), strict=False)
                data = [dict(zip(keys, row, strict=True)) for row in rows]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a list of records")
        return _records_to_texts(data, wanted)
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        df = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
        records = df.to_dict(orient="records")
        return _records_to_texts(records, wanted)
    raise DataError(f"{path}: unsupported file type; use one of {LOCAL_SUFFIXES}")


def _read_local(path: Path, wanted: str | None) -> list[str]:
    if path.is_file():
        return _read_local_file(path, wanted)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in LOCAL_SUFFIXES)
    if not files:
        raise DataError(f"folder '{path}' holds no {', '.join(LOCAL_SUFFIXES)} files")
    texts: list[str] = []
    for f in files:
        texts.extend(_read_local_file(f, wanted))
    return texts


def _read_hub(cfg: DistillConfig) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split)
    except Exception as e:  # the hub raises many types; the message is what matters
        raise DataError(
            f"cannot load dataset '{cfg.dataset}' (subset={cfg.subset!r}, split={cfg.split!r}):"
            f" {type(e).__name__}: {e}"
        ) from e
    if cfg.max_texts is not None:
        ds = ds.select(range(min(cfg.max_texts, len(ds))))
    sample = ds[0] if len(ds) else {}
    col = detect_text_column(list(ds.column_names), sample, cfg.text_column)
    return [t for t in ds[col] if isinstance(t, str)]


def load_documents(cfg: DistillConfig) -> list[str]:
    """Non-empty documents of the configured dataset, in source order."""
    if cfg.dataset == EMBEDDED_DATASET:
        texts = _read_local(CORPUS_DIR, cfg.text_column)
    elif Path(cfg.dataset).expanduser().exists():
        texts = _read_local(Path(cfg.dataset).expanduser(), cfg.text_column)
    elif cfg.dataset.startswith(("/", "./", "../", "~")) or cfg.dataset.endswith(LOCAL_SUFFIXES):
        raise DataError(f"dataset path '{cfg.dataset}' does not exist")
    else:
        texts = _read_hub(cfg)
    texts = [t for t in texts if t and t.strip()]
    if cfg.max_texts is not None:
        texts = texts[: cfg.max_texts]
    if not texts:
        raise DataError(f"dataset '{cfg.dataset}' holds no non-empty text")
    return texts


def split_documents(
    docs: list[str], eval_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(train, held_out): a seeded shuffle of whole documents, at least one held out."""
    if len(docs) < 2:
        raise DataError(
            f"need at least 2 documents to hold one out for evaluation, got {len(docs)}; "
            "split the text into paragraphs (blank lines) or add documents"
        )
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, math.ceil(eval_fraction * len(docs))), len(docs) - 1)
    held = sorted(order[:n_eval])
    train = sorted(order[n_eval:])
    return [docs[i] for i in train], [docs[i] for i in held]


# ---------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------
@dataclass
class Packed:
    input_ids: Tensor  # [N, L] long
    attention_mask: Tensor  # [N, L] long, 0 only in the tail of the last block

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def batch(self, idx: list[int] | Tensor) -> dict[str, Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx]}


def token_stream(docs: list[str], tokenizer, eos_id: int) -> list[int]:
    """Every document's tokens followed by EOS, concatenated."""
    enc = tokenizer(docs, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for ids in enc:
        stream.extend(ids)
        stream.append(eos_id)
    return stream


def pack(docs: list[str], tokenizer, block_len: int, pad_id: int | None = None) -> Packed:
    """Tokenize and pack documents into [N, block_len] blocks with EOS between them."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token; set one so documents can be separated")
    pad = eos if pad_id is None else pad_id
    stream = torch.tensor(token_stream(docs, tokenizer, eos), dtype=torch.long)
    n_full = stream.numel() // block_len
    rest = stream.numel() - n_full * block_len
    n = n_full + (1 if rest else 0)
    ids = torch.full((n, block_len), pad, dtype=torch.long)
    mask = torch.zeros((n, block_len), dtype=torch.long)
    ids.view(-1)[: stream.numel()] = stream
    mask.view(-1)[: stream.numel()] = 1
    return Packed(ids, mask)


def build_datasets(cfg: DistillConfig, tokenizer) -> tuple[Packed, Packed]:
    """(train, held_out) packed blocks for a job."""
    train_docs, eval_docs = split_documents(load_documents(cfg), cfg.eval_fraction, cfg.seed)
    train = pack(train_docs, tokenizer, cfg.max_seq_len)
    held = pack(eval_docs, tokenizer, cfg.max_seq_len)
    if len(train) == 0:
        raise DataError("the training split is empty after packing; add data")
    return train, held


# ---------------------------------------------------------------------------------
# Order
# ---------------------------------------------------------------------------------
class BlockSampler:
    """Seeded per-epoch permutation of block indices, sharded across ranks.

    Rank r of w takes positions r, r+w, r+2w, ... of each epoch's permutation (the tail
    that does not divide evenly is dropped so every rank runs the same number of
    steps). `state()` / `load_state()` give the exact data position for resuming.
    """

    def __init__(self, n_blocks: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n_blocks < batch_size * world:
            raise DataError(
                f"only {n_blocks} training blocks for per_device_batch_size={batch_size} on "
                f"{world} worker(s); add data, lower max_seq_len or the batch size"
            )
        self.n, self.bs, self.seed, self.rank, self.world = n_blocks, batch_size, seed, rank, world
        self.per_rank = n_blocks // world
        self.batches_per_epoch = self.per_rank // batch_size
        self.epoch, self.pos, self.served = 0, 0, 0
        self._perm = self._make_perm()

    def _make_perm(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        return perm[self.rank : self.per_rank * self.world : self.world]

    def next_indices(self) -> Tensor:
        if self.pos >= self.batches_per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._make_perm()
        idx = self._perm[self.pos * self.bs : (self.pos + 1) * self.bs]
        self.pos += 1
        self.served += int(idx.numel())
        return idx

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "served": self.served}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self.served = int(state.get("served", 0))
        self._perm = self._make_perm()
