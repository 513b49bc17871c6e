"""Reading text sources into `Documents`: the units a held-out split keeps whole.

* Records of a .jsonl/.json/.csv/.parquet file, a `datasets` save_to_disk folder or a
  Hugging Face dataset (text column auto-detected or named).
* Files of a folder (a folder with one data file: that file's documents).
* Plain .txt, by `document_separator`: articles at top-level '= Title =' headings
  (wikitext), blank-line paragraphs, or paragraphs in order for a contiguous split.
* Named splits: a hub dataset's, a DatasetDict folder's, or a folder of split-named
  files (train.jsonl, validation.jsonl, ...) as `datasets` recognises them.

`kd.data` splits and packs what this reads; it re-exports the public names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from kd.config import DistillConfig
from kd.names import DATA_SUFFIXES, Source, readable

CORPUS_DIR = Path(__file__).parent / "corpus"
PREFERRED_TEXT_COLUMNS = ("text", "content", "document", "body", "article", "story", "sentence")
LOCAL_SUFFIXES = DATA_SUFFIXES
# A wikitext article title: '= Title =' with exactly one '=' on each side; '= = Section
# = =' lines are sub-headings inside an article.
HEADING_RE = re.compile(r"= (?!=)(.+?)(?<!=) =")


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


def dataset_source(name: str, field: str = "dataset") -> Source:
    """What the dataset `name` (the config's `field`) is (`kd.names.classify`), with the
    job's rule on relative paths applied: refused in a job submitted through the API,
    logged on the command line."""
    src = readable(name, "dataset", DataError)
    if src.kind == "s3":
        raise DataError(
            f"{field} '{name}': S3 datasets are not supported; copy the files to a folder "
            "the workers can read, or use a Hugging Face dataset id"
        )
    if src.kind == "local" and not Path(src.location).exists():
        raise DataError(f"{field} path '{name}' does not exist")
    return src


def available_splits(name: str, subset: str | None) -> list[str] | None:
    """The named splits of a dataset: a hub dataset, a save_to_disk DatasetDict folder or
    a folder of split-named files. None for a file, a plain folder or 'embedded'."""
    src = dataset_source(name)
    if src.kind == "embedded":
        return None
    if src.kind == "local":
        path = Path(src.location)
        if path.is_file() or _is_saved_dataset(path):
            return None
        if (path / "dataset_dict.json").is_file():
            return json.loads((path / "dataset_dict.json").read_text())["splits"]
        files = _split_files(path)
        return None if files is None else list(files)
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
    src = dataset_source(name)
    path = Path(src.location)
    if src.kind == "embedded":
        docs = _read_local(CORPUS_DIR, wanted, separator)
    elif src.kind == "hub":
        docs = _records(_read_hub_split(name, subset, split or "train", wanted, max_texts))
    elif split is None:  # a local file or folder without named splits
        docs = _read_local(path, wanted, separator)
    elif (path / "dataset_dict.json").is_file():
        import datasets

        saved = datasets.load_from_disk(str(path))[base_split(split)]
        docs = _records(_dataset_texts(saved, wanted, None))
    else:  # slicing ('train[:10%]') is for hub datasets; here: the whole split
        files = (_split_files(path) or {})[base_split(split)]
        docs = _read_files(files, path, wanted, separator)
    docs = docs.cleaned(max_texts)
    if not docs.groups:
        where = name if split is None else f"{name} (split '{split}')"
        raise DataError(f"dataset '{where}' holds no non-empty text")
    return docs


def base_split(split: str) -> str:
    """'train[:10%]' -> 'train' (the datasets slicing syntax)."""
    return re.split(r"[\[+]", split, maxsplit=1)[0].strip()


def check_split(name: str, split: str, splits: list[str], field: str) -> None:
    if base_split(split) not in splits:
        raise DataError(f"{field}: '{split}' is not a split of '{name}'; it has {splits}")


def load_train_documents(cfg: DistillConfig) -> tuple[Documents, list[str] | None]:
    """(documents of the training source, its named splits or None)."""
    splits = available_splits(cfg.dataset, cfg.subset)
    if splits is not None:
        check_split(cfg.dataset, cfg.split, splits, "split")
    split = cfg.split if splits is not None else None
    docs = read_source(
        cfg.dataset, cfg.subset, split, cfg.text_column, cfg.document_separator, cfg.max_texts
    )
    return docs, splits


def load_documents(cfg: DistillConfig) -> list[str]:
    """Non-empty documents (pieces) of the configured training source, in source order."""
    return load_train_documents(cfg)[0].pieces
