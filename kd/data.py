"""Corpora, packing into fixed blocks, the held-out split, and deterministic order.

* `read_source` reads `Documents` from the embedded corpus, a local file or folder
  (.txt, .jsonl/.json, .csv, .parquet), a `datasets` save_to_disk folder or a Hugging
  Face dataset, grouped into the units a split holds out whole: records of a table,
  files of a folder, articles of a plain-text file ('= Title =' headings, as in
  wikitext), or, when the text marks no documents, its paragraphs in order.
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

import json
import logging
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from kd.config import EMBEDDED_DATASET, DistillConfig

CORPUS_DIR = Path(__file__).parent / "corpus"
PREFERRED_TEXT_COLUMNS = ("text", "content", "document", "body", "article", "story", "sentence")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
# A wikitext article title: '= Title =' with exactly one '=' on each side; '= = Section
# = =' lines are sub-headings inside an article.
HEADING_RE = re.compile(r"= (?!=)(.+?)(?<!=) =")
EVAL_NAMES_SHOWN = 20  # held-out document names kept in the split description

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The dataset could not be read; the message names what was found and the fix."""


# ---------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------
@dataclass
class Documents:
    """Text grouped into the units that a split holds out whole.

    groups[i] is one source document (an article, a file, a record, or one paragraph of
    a file without document marks) as its pieces; packing puts EOS after every piece,
    as it always has. names[i] says which document it is (a title, a path, an index).
    contiguous: the source marks no documents, so a split holds out one contiguous
    span of groups instead of a seeded sample.
    """

    groups: list[list[str]]
    names: list[str]
    unit: str  # "article" | "file" | "record" | "paragraph"
    contiguous: bool = False
    separator: str | None = None  # the document_separator a plain-text file resolved to

    @property
    def pieces(self) -> list[str]:
        return [p for g in self.groups for p in g]

    def take(self, idx: list[int]) -> list[str]:
        return [p for i in idx for p in self.groups[i]]

    def cleaned(self, max_groups: int | None = None) -> Documents:
        """Empty pieces and then empty groups dropped; at most max_groups kept."""
        pairs = zip(self.groups, self.names, strict=True)
        kept = [([p for p in g if p and p.strip()], n) for g, n in pairs]
        kept = [(g, n) for g, n in kept if g][:max_groups]
        return Documents(
            [g for g, _ in kept], [n for _, n in kept], self.unit, self.contiguous, self.separator
        )


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


def _records(texts: list[str]) -> Documents:
    return Documents([[t] for t in texts], [f"record {i}" for i in range(len(texts))], "record")


def _split_paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs."""
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


def heading_title(line: str) -> str | None:
    """The title of a top-level wikitext heading ('= Title =', one '=' on each side);
    None for any other line, '= = Section = =' sub-headings included."""
    m = HEADING_RE.fullmatch(line.strip())
    return m.group(1) if m else None


def _articles(text: str) -> tuple[list[list[str]], list[str], int]:
    """(groups of paragraphs, titles, number of headings): a new article starts at each
    top-level heading; text before the first heading is a group of its own."""
    chunks: list[tuple[str, list[str]]] = [("(text before the first heading)", [])]
    n_headings = 0
    for line in text.splitlines():
        title = heading_title(line)
        if title is not None:
            chunks.append((title, []))
            n_headings += 1
        chunks[-1][1].append(line)
    groups, names = [], []
    for name, lines in chunks:
        paras = _split_paragraphs("\n".join(lines))
        if paras:
            groups.append(paras)
            names.append(name)
    return groups, names, n_headings


def _read_text(path: Path, separator: str) -> Documents:
    """A plain-text file as articles (headings), paragraphs (blank_line) or a
    contiguous run of paragraphs (none); auto: articles if it has 2+ headings."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if separator in ("auto", "heading"):
        groups, names, n_headings = _articles(text)
        if n_headings >= 2:
            return Documents(groups, names, "article", separator="heading")
        if separator == "heading":
            raise DataError(
                f"{path}: document_separator='heading' but the file has {n_headings} top-level "
                "'= Title =' heading line(s), need at least 2; use 'blank_line' if every "
                "paragraph is a document of its own, or 'none' to hold out a contiguous span"
            )
    paras = _split_paragraphs(text)
    names = [f"paragraph {i + 1}" for i in range(len(paras))]
    if separator == "blank_line":
        return Documents([[p] for p in paras], names, "paragraph", separator="blank_line")
    return Documents([[p] for p in paras], names, "paragraph", contiguous=True, separator="none")


def _read_local_file(path: Path, wanted: str | None, separator: str = "auto") -> Documents:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_text(path, separator)
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        return _records(_records_to_texts(records, wanted))
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
        return _records(_records_to_texts(data, wanted))
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        df = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
        return _records(_records_to_texts(df.to_dict(orient="records"), wanted))
    raise DataError(f"{path}: unsupported file type; use one of {LOCAL_SUFFIXES}")


def _read_files(files: list[Path], root: Path, wanted: str | None, separator: str) -> Documents:
    """One file: its own documents. Several: one group per file (held out whole)."""
    if len(files) == 1:
        return _read_local_file(files[0], wanted, separator)
    groups, names = [], []
    for f in files:
        groups.append(_read_local_file(f, wanted, separator).pieces)
        names.append(str(f.relative_to(root)) if f.is_relative_to(root) else str(f))
    return Documents(groups, names, "file")


def _folder_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in LOCAL_SUFFIXES)
    if not files:
        raise DataError(f"folder '{path}' holds no {', '.join(LOCAL_SUFFIXES)} files")
    return files


def _read_local(path: Path, wanted: str | None, separator: str = "auto") -> Documents:
    if path.is_file():
        return _read_local_file(path, wanted, separator)
    if _is_saved_dataset(path):  # datasets' save_to_disk folder of one Dataset
        import datasets

        return _records(_dataset_texts(datasets.load_from_disk(str(path)), wanted, None))
    return _read_files(_folder_files(path), path, wanted, separator)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _dataset_texts(ds, wanted: str | None, max_texts: int | None) -> list[str]:
    if max_texts is not None:
        ds = ds.select(range(min(max_texts, len(ds))))
    sample = ds[0] if len(ds) else {}
    col = detect_text_column(list(ds.column_names), sample, wanted)
    return [t for t in ds[col] if isinstance(t, str)]


def _hub_error(name: str, subset: str | None, split: str | None, e: Exception) -> DataError:
    return DataError(
        f"cannot load dataset '{name}' (subset={subset!r}, split={split!r}): "
        f"{type(e).__name__}: {e}"
    )


def _read_hub_split(name: str, subset: str | None, split: str, wanted, max_texts) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # the hub raises many types; the message is what matters
        raise _hub_error(name, subset, split, e) from e
    return _dataset_texts(ds, wanted, max_texts)


def _read_hub(cfg: DistillConfig) -> list[str]:
    return _read_hub_split(cfg.dataset, cfg.subset, cfg.split, cfg.text_column, cfg.max_texts)


# ---- named splits -----------------------------------------------------------------
def _split_files(folder: Path) -> dict[str, list[Path]] | None:
    """{split: files} of a folder laid out the way `datasets` reads splits from file
    names (train.jsonl, validation.jsonl, data/test-00000.parquet, ...); None when
    the folder has no split other than train."""
    names = " ".join(str(p.relative_to(folder)).lower() for p in _folder_files(folder))
    if not any(k in names for k in ("valid", "val", "dev", "test", "eval")):
        return None  # datasets is slow to import; most folders are not split layouts
    from datasets.data_files import get_data_patterns, resolve_pattern

    out: dict[str, list[Path]] = {}
    for split, patterns in get_data_patterns(str(folder)).items():
        found: set[Path] = set()
        for pattern in patterns:
            try:
                found.update(Path(f) for f in resolve_pattern(pattern, str(folder)))
            except FileNotFoundError:
                continue
        files = sorted(f for f in found if f.suffix.lower() in LOCAL_SUFFIXES)
        if files:
            out[str(split)] = files
    return out if set(out) - {"train"} else None


def available_splits(name: str, subset: str | None) -> list[str] | None:
    """The named splits of a dataset: a hub dataset, a save_to_disk DatasetDict folder or
    a folder of split-named files. None for a file, a plain folder or 'embedded'."""
    if name == EMBEDDED_DATASET:
        return None
    path = Path(name).expanduser()
    if path.is_file() or (path.is_dir() and _is_saved_dataset(path)):
        return None
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            return json.loads((path / "dataset_dict.json").read_text())["splits"]
        files = _split_files(path)
        return None if files is None else list(files)
    if name.startswith(("/", "./", "../", "~")) or name.endswith(LOCAL_SUFFIXES):
        raise DataError(f"dataset path '{name}' does not exist")
    import datasets

    try:
        return list(datasets.get_dataset_split_names(name, subset))
    except Exception as e:  # the hub raises many types; the message is what matters
        raise _hub_error(name, subset, None, e) from e


def read_source(
    name: str,
    subset: str | None,
    split: str | None,
    wanted: str | None,
    separator: str = "auto",
    max_texts: int | None = None,
) -> Documents:
    """Non-empty documents of a dataset; `split` names a split when available_splits()
    lists some, and is None otherwise."""
    path = Path(name).expanduser()
    if name == EMBEDDED_DATASET:
        docs = _read_local(CORPUS_DIR, wanted, separator)
    elif split is None:
        docs = _read_local(path, wanted, separator)
    elif path.is_dir() and (path / "dataset_dict.json").is_file():
        import datasets

        saved = datasets.load_from_disk(str(path))[_base_split(split)]
        docs = _records(_dataset_texts(saved, wanted, None))
    elif path.is_dir():  # slicing ('train[:10%]') is for hub datasets; here: the whole split
        files = (_split_files(path) or {})[_base_split(split)]
        docs = _read_files(files, path, wanted, separator)
    else:
        docs = _records(_read_hub_split(name, subset, split, wanted, max_texts))
    docs = docs.cleaned(max_texts)
    if not docs.groups:
        where = name if split is None else f"{name} (split '{split}')"
        raise DataError(f"dataset '{where}' holds no non-empty text")
    return docs


def _base_split(split: str) -> str:
    """'train[:10%]' -> 'train' (the datasets slicing syntax)."""
    return re.split(r"[\[+]", split, maxsplit=1)[0].strip()


def _check_split(name: str, split: str, splits: list[str], field: str) -> None:
    if _base_split(split) not in splits:
        raise DataError(f"{field}: '{split}' is not a split of '{name}'; it has {splits}")


def load_train_documents(cfg: DistillConfig) -> tuple[Documents, list[str] | None]:
    """(documents of the training source, its named splits or None)."""
    splits = available_splits(cfg.dataset, cfg.subset)
    if splits is not None:
        _check_split(cfg.dataset, cfg.split, splits, "split")
    split = cfg.split if splits is not None else None
    docs = read_source(
        cfg.dataset, cfg.subset, split, cfg.text_column, cfg.document_separator, cfg.max_texts
    )
    return docs, splits


def load_documents(cfg: DistillConfig) -> list[str]:
    """Non-empty documents (pieces) of the configured training source, in source order."""
    return load_train_documents(cfg)[0].pieces


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
        if name in splits and name != _base_split(train_split):
            return name
    return None


def _eval_from(cfg: DistillConfig, name: str, subset, splits, split) -> Documents:
    if splits is None and split is not None:
        raise DataError(
            f"eval_split: '{name}' has no named splits (a file or a plain folder); drop "
            "eval_split, or set eval_dataset to a dataset with splits"
        )
    if splits is not None:
        _check_split(name, split, splits, "eval_split")
    column = cfg.eval_text_column or cfg.text_column
    return read_source(name, subset, split, column, cfg.document_separator)


def _separate_dataset(cfg: DistillConfig, docs: Documents, splits, train_name: str) -> Split:
    ev_splits = available_splits(cfg.eval_dataset, cfg.eval_subset)
    ev_split = cfg.eval_split
    if ev_splits is not None and ev_split is None:
        ev_split = _default_eval_split(ev_splits, "") or ev_splits[0]
    same_split = ev_split is None or splits is None or _base_split(ev_split) == cfg.split
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
    if splits is not None and _base_split(ev_split) == _base_split(cfg.split):
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


# A derived student calibrates its layer selection (kd.train.build_student) on two
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
