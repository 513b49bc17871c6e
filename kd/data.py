"""The held-out split, packing into fixed blocks, and deterministic order.

* `kd.sources` reads `Documents` (re-exported here with `load_documents`, `DataError`):
  text grouped into the units a split holds out whole, i.e. records of a table or
  dataset, files of a folder, articles of a plain-text file ('= Title =' headings, as
  in wikitext), or, when the text marks no documents, its paragraphs in order.
* `plan_split` chooses the held-out data, so no block that training sees shares a
  document with an evaluation block: `eval_dataset` if set; else the validation/test
  split of a dataset that has one; else whole documents held out by seed (a seeded
  sample, or one contiguous span when the text marks no documents).
* `pack` tokenizes, appends EOS after every piece (record, paragraph), concatenates and
  cuts into [max_seq_len] blocks. Only the final block may be partial; its tail is
  padding with attention_mask 0, so no token is lost and at most one block carries
  padding. `build_datasets` packs both sides and attaches the split's description.
* `BlockSampler` yields a seeded permutation of blocks per epoch, sharded by rank, and
  can resume from any (epoch, position).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kd.config import DistillConfig
from kd.sources import (  # noqa: F401  (re-exported: kd.data is where callers look)
    LOCAL_SUFFIXES,
    DataError,
    Documents,
    _read_hub,
    available_splits,
    base_split,
    check_split,
    heading_title,
    load_documents,
    load_train_documents,
    read_source,
)

EVAL_NAMES_SHOWN = 20  # held-out document names kept in the split description

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------
# The held-out split
# ---------------------------------------------------------------------------------
def held_out_indices(n: int, eval_fraction: float, seed: int, contiguous: bool) -> list[int]:
    """Indices of the held-out groups: ceil(eval_fraction * n), at least 1 and at most
    n - 1; a seeded sample, or one contiguous run at a seeded offset."""
    if n < 2:
        raise DataError(
            f"need at least 2 documents to hold one out for evaluation, got {n}; add "
            "documents, or set eval_dataset to a separate evaluation set"
        )
    n_eval = min(max(1, math.ceil(eval_fraction * n)), n - 1)
    rng = random.Random(seed)
    if contiguous:
        start = rng.randrange(n - n_eval + 1)
        return list(range(start, start + n_eval))
    order = list(range(n))
    rng.shuffle(order)
    return sorted(order[:n_eval])


def split_documents(
    docs: list[str], eval_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(train, held_out): a seeded sample of whole documents, at least one held out."""
    held = set(held_out_indices(len(docs), eval_fraction, seed, contiguous=False))
    return [d for i, d in enumerate(docs) if i not in held], [docs[i] for i in sorted(held)]


@dataclass
class Split:
    """The documents on each side of the split and how it was made."""

    train: Documents
    held: Documents
    info: dict


def _plural(unit: str, n: int) -> str:
    return unit if n == 1 else unit + "s"


def _hold_out(cfg: DistillConfig, docs: Documents) -> Split:
    n = len(docs.groups)
    held = held_out_indices(n, cfg.eval_fraction, cfg.seed, docs.contiguous)
    keep = sorted(set(range(n)) - set(held))
    train = Documents([docs.groups[i] for i in keep], [docs.names[i] for i in keep], docs.unit)
    ev = Documents([docs.groups[i] for i in held], [docs.names[i] for i in held], docs.unit)
    how = f"seed {cfg.seed}, eval_fraction {cfg.eval_fraction}"
    if docs.contiguous:
        method = "held-out span"
        source = (
            f"one contiguous span of {len(held)} of {n} paragraphs of {cfg.dataset} "
            f"(paragraphs {held[0] + 1}-{held[-1] + 1}; {how}); the text marks no documents, "
            "so only the text at the span's two edges borders training text"
        )
    else:
        method = "held-out documents"
        source = (
            f"{len(held)} of {n} {_plural(docs.unit, n)} of {cfg.dataset}, held out whole ({how})"
        )
    info = {"method": method, "unit": docs.unit, "held_out_source": source}
    info.update(seed=cfg.seed, eval_fraction=cfg.eval_fraction)
    return Split(train, ev, info)


def _default_eval_split(splits: list[str], train_split: str) -> str | None:
    for name in ("validation", "valid", "val", "dev", "test"):
        if name in splits and name != base_split(train_split):
            return name
    return None


def _eval_from(cfg: DistillConfig, name: str, subset, splits, split) -> Documents:
    if splits is None and split is not None:
        raise DataError(
            f"eval_split: '{name}' has no named splits (a file or a plain folder); drop "
            "eval_split, or set eval_dataset to a dataset with splits"
        )
    if splits is not None:
        check_split(name, split, splits, "eval_split")
    column = cfg.eval_text_column or cfg.text_column
    return read_source(name, subset, split, column, cfg.document_separator)


def _separate_dataset(cfg: DistillConfig, docs: Documents, splits, train_name: str) -> Split:
    ev_splits = available_splits(cfg.eval_dataset, cfg.eval_subset)
    ev_split = cfg.eval_split
    if ev_splits is not None and ev_split is None:
        ev_split = _default_eval_split(ev_splits, "") or ev_splits[0]
    same_split = ev_split is None or splits is None or base_split(ev_split) == cfg.split
    if cfg.eval_dataset == cfg.dataset and cfg.eval_subset == cfg.subset and same_split:
        raise DataError(
            f"eval_dataset: '{cfg.eval_dataset}' is the training data itself; point it at "
            "other data, or drop it to hold out documents of dataset"
        )
    held = _eval_from(cfg, cfg.eval_dataset, cfg.eval_subset, ev_splits, ev_split)
    where = cfg.eval_dataset if ev_split is None else f"{cfg.eval_dataset} (split '{ev_split}')"
    info = {"method": "separate dataset", "unit": held.unit, "held_out_source": where}
    return Split(docs, held, {**info, "train_source": train_name})


def plan_split(cfg: DistillConfig) -> Split:
    """Training and held-out documents, from the first that applies: eval_dataset; the
    eval_split (or else the validation/test split) of a dataset with named splits;
    whole documents of the training source held out by seed."""
    docs, splits = load_train_documents(cfg)
    train_name = cfg.dataset if splits is None else f"{cfg.dataset} (split '{cfg.split}')"
    if cfg.eval_dataset is not None:
        return _separate_dataset(cfg, docs, splits, train_name)
    ev_split = cfg.eval_split
    if ev_split is None and splits is not None:
        ev_split = _default_eval_split(splits, cfg.split)
    if ev_split is None:
        split = _hold_out(cfg, docs)
        split.info["train_source"] = train_name
        if docs.separator is not None:
            split.info["document_separator"] = docs.separator
        return split
    if splits is not None and base_split(ev_split) == base_split(cfg.split):
        raise DataError(
            f"eval_split: '{ev_split}' is the training split too; choose another of {splits}"
        )
    held = _eval_from(cfg, cfg.dataset, cfg.subset, splits, ev_split)
    chosen = "set by eval_split" if cfg.eval_split else "the dataset's own, used by default"
    source = f"the '{ev_split}' split of {cfg.dataset} ({chosen})"
    info = {"method": "dataset split", "unit": held.unit, "held_out_source": source}
    return Split(docs, held, {**info, "train_source": train_name})


# ---------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------
@dataclass
class Packed:
    input_ids: Tensor  # [N, L] long
    attention_mask: Tensor  # [N, L] long, 0 only in the tail of the last block
    split: dict = field(default_factory=dict)  # how the split was made (build_datasets)

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


# A derived student calibrates its layer selection (kd.student.build_student) on two
# batches, blocks 0-1 and 2-3: with fewer than 3 blocks the second one is empty.
MIN_BLOCKS_DERIVED = 3


def check_enough_blocks(n_blocks: int, n_tokens: int, cfg: DistillConfig) -> None:
    """Fail in data building, with the counts, when training could not run."""
    need = {
        "one micro-batch per worker (per_device_batch_size x num_workers)": (
            cfg.per_device_batch_size * cfg.num_workers
        )
    }
    if cfg.derives_student:
        need["the layer selection of a derived student"] = MIN_BLOCKS_DERIVED
    n_need = max(need.values())
    if n_blocks >= n_need:
        return
    why = "; ".join(f"{v} for {k}" for k, v in need.items())
    raise DataError(
        f"the training split packs into {n_blocks} block(s) of max_seq_len={cfg.max_seq_len} "
        f"tokens ({n_tokens} tokens); need at least {n_need} ({why}). Add data, lower "
        "max_seq_len or per_device_batch_size, or hold out less (eval_fraction)"
    )


def build_datasets(cfg: DistillConfig, tokenizer) -> tuple[Packed, Packed]:
    """(train, held_out) packed blocks for a job; both carry `split`, the description of
    how the held-out data was chosen and how much is on each side."""
    split = plan_split(cfg)
    train = pack(split.train.pieces, tokenizer, cfg.max_seq_len)
    held = pack(split.held.pieces, tokenizer, cfg.max_seq_len)
    check_enough_blocks(len(train), train.n_tokens, cfg)
    info = {
        **split.info,
        "train_documents": len(split.train.groups),
        "eval_documents": len(split.held.groups),
        "train_tokens": train.n_tokens,
        "eval_tokens": held.n_tokens,
        "train_blocks": len(train),
        "eval_blocks": len(held),
        "eval_names": split.held.names[:EVAL_NAMES_SHOWN],
    }
    train.split = held.split = info
    log.info("held-out data: %s", info["held_out_source"])
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
