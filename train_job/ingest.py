"""The corpus pipeline on Ray Data: tokenize and pack once, write shards, stream them.

`data_pipeline="ray_data"` jobs run `ingest(cfg, storage)` in the job driver before the
TorchTrainer starts. It decides the split exactly as `kd.data.plan_split` does (on the
same documents and seed), tokenizes both sides with `map_batches` over the cluster's
CPUs (one tokenizer per actor), cuts the EOS-separated token stream into
`max_seq_len` blocks in document order and writes them as Parquet shards. A later job
whose fingerprint is the same finds the manifest and tokenizes nothing.

Shard format (stable: the teacher-signal cache reads it)
--------------------------------------------------------
Everything lives under the job storage root (shared folder or S3, `jobs.storage`)::

    corpus/<key>/manifest.json           written last: its presence means complete
    corpus/<key>/train/shard-00000.parquet
    corpus/<key>/train/shard-00001.parquet ...
    corpus/<key>/eval/shard-00000.parquet ...

`<key>` is the first 20 hex digits of the sha256 of the canonical JSON of the
fingerprint (`manifest["fingerprint"]`): format version, dataset identity (name,
subset, split, text column, max_texts, document_separator, eval_dataset/subset/split/
text column; for local files every file's relative path, size and mtime_ns; for
'embedded' the sha256 of its text; for hub datasets the resolved revision when known),
tokenizer (sha256 of the files `save_pretrained` writes, plus its class and eos id),
max_seq_len, seed and eval_fraction.

Each shard is one Parquet file, rows in block order, with three columns:

* `block`      int64  the block's index on its side (train or eval), 0..blocks-1;
                      shard i holds blocks [i * shard_blocks, (i+1) * shard_blocks)
* `input_ids`  fixed_size_list<int32>[max_seq_len]  token ids; the tail of the last
                      block of a side is padded with eos_id (as `kd.data.pack`)
* `length`     int32  real tokens in the block: max_seq_len for every block but the
                      last of a side; attention_mask = (arange(max_seq_len) < length)

So the blocks of a side, concatenated in `block` order, equal `kd.data.pack` on that
side's documents bit for bit (input_ids, and attention_mask from `length`).

manifest.json::

    {"format": "llm2slm.corpus/1", "key": str, "created_at": float (unix s),
     "max_seq_len": int, "shard_blocks": int, "eos_id": int,
     "fingerprint": {...the inputs above...},
     "split": {...the description kd.data.build_datasets attaches (method, sources,
               train/eval documents, tokens, blocks, eval_names)...},
     "train": {"blocks": int, "tokens": int, "documents": int,
               "shards": [{"path": "train/shard-00000.parquet", "blocks": int,
                           "tokens": int, "bytes": int}, ...]},
     "eval":  {...same fields...},
     "counters": {"tokenizer_calls": int, "documents_tokenized": int, "ingest_s": float}}

Shard paths in the manifest are relative to `corpus/<key>/`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from jobs import caches
from jobs.caches import MANIFEST
from jobs.storage import Storage
from kd.config import EMBEDDED_DATASET, DistillConfig
from kd.data import EVAL_NAMES_SHOWN, LOCAL_SUFFIXES, DataError, Packed, check_enough_blocks
from train_job.cache_guard import CacheGuard

FORMAT = "llm2slm.corpus/1"
CORPUS_PREFIX = "corpus"  # storage key prefix of every corpus cache
SHARD_BLOCKS = 4096  # blocks per shard: 4 MiB of int32 ids at max_seq_len 256

log = logging.getLogger(__name__)

TEXT_BLOCK_BYTES = 1 << 20  # text per Ray Data input block: one tokenizer call each


# ---------------------------------------------------------------------------------
# The key: everything that changes the packed blocks
# ---------------------------------------------------------------------------------
def tokenizer_hash(tokenizer) -> str:
    """sha256 over the files `save_pretrained` writes (vocab, merges, special tokens)."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        for p in sorted(Path(d).rglob("*")):
            if p.is_file():
                h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _file_entries(path: Path) -> list[list]:
    if path.is_file():
        files, root = [path], path.parent
    else:  # folders: every readable file and the saved-dataset metadata
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and (p.suffix.lower() in LOCAL_SUFFIXES
            or p.suffix in (".arrow", ".json"))
        )  # fmt: skip
        root = path
    return [[str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def source_identity(name: str | None) -> dict | None:
    """What identifies a dataset's content: file sizes and mtimes for local data, the
    text's hash for 'embedded', the hub revision (when the hub answers) otherwise."""
    if name is None:
        return None
    if name == EMBEDDED_DATASET:
        from kd.sources import CORPUS_DIR

        h = hashlib.sha256()
        for path, _size, _mtime in _file_entries(Path(CORPUS_DIR)):
            h.update(path.encode() + (Path(CORPUS_DIR) / path).read_bytes())
        return {"embedded": h.hexdigest()}
    path = Path(name).expanduser()
    if path.exists():
        return {"path": str(path.resolve()), "files": _file_entries(path)}
    revision = None
    try:  # offline or unreachable hub: the name alone identifies it
        from huggingface_hub import HfApi

        revision = HfApi().dataset_info(name).sha
    except Exception:
        pass
    return {"hub": name, "revision": revision}


def fingerprint(cfg: DistillConfig, tokenizer) -> dict:
    """The inputs of the corpus key (see the module docstring)."""
    fields = (
        "dataset", "subset", "split", "text_column", "max_texts", "document_separator",
        "eval_dataset", "eval_subset", "eval_split", "eval_text_column", "eval_fraction",
        "seed", "max_seq_len",
    )  # fmt: skip
    return {
        "format": FORMAT,
        "config": {f: getattr(cfg, f) for f in fields},
        "dataset_identity": source_identity(cfg.dataset),
        "eval_dataset_identity": source_identity(cfg.eval_dataset),
        "tokenizer": {
            "sha256": tokenizer_hash(tokenizer),
            "class": type(tokenizer).__name__,
            "eos_id": tokenizer.eos_token_id,
        },
    }


def corpus_key(fp: dict) -> str:
    canon = json.dumps(fp, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------
# Cutting the token stream into blocks and shards
# ---------------------------------------------------------------------------------
class ShardWriter:
    """Cuts an ordered token stream into [block_len] blocks and writes full shards.

    `add(tokens)` takes the next piece of the stream (documents with their EOS, in
    order), whatever its length: blocks span pieces exactly as they span documents in
    `kd.data.pack`. `finish()` pads the last partial block with `pad_id`. Shards go to
    `<key_prefix>/<side>/`; their manifest paths are relative to key_prefix.
    """

    def __init__(self, storage: Storage, key_prefix: str, side: str, block_len: int,
                 shard_blocks: int, pad_id: int):  # fmt: skip
        self.storage, self.prefix, self.side = storage, key_prefix, side
        self.L, self.S = block_len, shard_blocks
        self.pad = pad_id
        self.rest = np.zeros(0, dtype=np.int32)  # < block_len tokens not yet in a block
        self.pending: list[np.ndarray] = []  # full [k, L] blocks not yet in a shard
        self.n_pending = 0
        self.shards: list[dict] = []
        self.blocks = self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        stream = np.concatenate([self.rest, tokens.astype(np.int32, copy=False)])
        n_full = stream.size // self.L
        if n_full:
            self.pending.append(stream[: n_full * self.L].reshape(n_full, self.L))
            self.n_pending += n_full
        self.rest = stream[n_full * self.L :].copy()
        while self.n_pending >= self.S:
            self._flush(self.S)

    def finish(self) -> None:
        if self.rest.size:
            last = np.full((1, self.L), self.pad, dtype=np.int32)
            last[0, : self.rest.size] = self.rest
            self.pending.append(last)
            self.n_pending += 1
        while self.n_pending:
            self._flush(min(self.S, self.n_pending), partial_len=int(self.rest.size))

    def _flush(self, n: int, partial_len: int = 0) -> None:
        blocks = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        rows, left = blocks[:n], blocks[n:]
        self.pending, self.n_pending = ([left] if len(left) else []), len(left)
        length = np.full(n, self.L, dtype=np.int32)
        if partial_len and not self.n_pending:  # this shard ends with the partial block
            length[-1] = partial_len
        table = pa.table({
            "block": pa.array(np.arange(self.blocks, self.blocks + n, dtype=np.int64)),
            "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), self.L),
            "length": pa.array(length),
        })  # fmt: skip
        buf = io.BytesIO()
        pq.write_table(table, buf)
        path = f"{self.side}/shard-{len(self.shards):05d}.parquet"
        self.storage.write_bytes(f"{self.prefix}/{path}", buf.getvalue())
        n_tokens = int(length.sum())
        self.shards.append({"path": path, "blocks": n, "tokens": n_tokens, "bytes": buf.tell()})
        self.blocks += n
        self.tokens += n_tokens


# ---------------------------------------------------------------------------------
# Tokenizing on Ray Data
# ---------------------------------------------------------------------------------
class _Tokenize:
    """map_batches UDF (an actor: one tokenizer per actor): text -> ids + EOS per doc."""

    def __init__(self, tokenizer):
        self.tok, self.eos = tokenizer, tokenizer.eos_token_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        enc = self.tok(texts, add_special_tokens=False)["input_ids"]
        ids = pa.array([e + [self.eos] for e in enc], type=pa.list_(pa.int32()))
        calls = np.zeros(len(texts), dtype=np.int64)
        calls[:1] = 1  # one tokenizer call per batch, counted by the driver
        return pa.table({"ids": ids, "calls": calls})


def _text_blocks(docs: list[str]) -> list[pa.Table]:
    """Documents in order, cut into ~TEXT_BLOCK_BYTES tables (Ray Data's input blocks)."""
    out, start, size = [], 0, 0
    for i, d in enumerate(docs):
        size += len(d)
        if size >= TEXT_BLOCK_BYTES:
            out.append(pa.table({"text": docs[start : i + 1]}))
            start, size = i + 1, 0
    if start < len(docs):
        out.append(pa.table({"text": docs[start:]}))
    return out


def pack_side(docs: list[str], tokenizer, writer: ShardWriter, num_cpus: int) -> int:
    """Tokenize `docs` on Ray Data (num_cpus actors; 0: in this process, without Ray)
    and feed the stream, in document order, to `writer`. Returns the tokenizer calls."""
    blocks = _text_blocks(docs)
    if num_cpus == 0:
        tokenize = _Tokenize(tokenizer)
        batches = (tokenize(b) for b in blocks)
    else:
        batches = _ray_tokenize(blocks, tokenizer, num_cpus) if blocks else iter(())
    calls = 0
    for batch in batches:
        writer.add(pc.list_flatten(batch.column("ids")).to_numpy())
        calls += int(pc.sum(batch.column("calls")).as_py() or 0)
    writer.finish()
    return calls


def _ray_tokenize(blocks: list[pa.Table], tokenizer, num_cpus: int):
    import ray.data

    ds = ray.data.from_arrow(blocks).map_batches(
        _Tokenize,
        fn_constructor_kwargs={"tokenizer": tokenizer},
        batch_size=None,  # one input block, one call
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=max(1, min(num_cpus, len(blocks)))),
        num_cpus=1,
    )
    ds.context.execution_options.preserve_order = True  # the stream's order is the result
    return ds.iter_batches(batch_size=None, batch_format="pyarrow")


# ---------------------------------------------------------------------------------
# Ingest: reuse the shards of this key, or build them
# ---------------------------------------------------------------------------------
def corpus_prefix(key: str) -> str:
    return f"{CORPUS_PREFIX}/{key}"


def _cpus() -> int:
    import ray

    return max(1, int(ray.available_resources().get("CPU", 1)))


def build(cfg: DistillConfig, storage: Storage, tokenizer, key: str, fp: dict,
          num_cpus: int | None = None, shard_blocks: int = SHARD_BLOCKS) -> dict:  # fmt: skip
    """Split, tokenize and pack both sides on Ray Data; write shards, then the manifest."""
    from kd.data import plan_split

    t0 = time.perf_counter()
    split = plan_split(cfg)  # the same documents and held-out choice as kd.data
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; set one so documents can be separated")
    cpus = _cpus() if num_cpus is None else num_cpus
    sides, calls = {}, 0
    for side, docs in (("train", split.train), ("eval", split.held)):
        writer = ShardWriter(storage, corpus_prefix(key), side, cfg.max_seq_len,
                             shard_blocks, tokenizer.eos_token_id)  # fmt: skip
        calls += pack_side(docs.pieces, tokenizer, writer, cpus)
        sides[side] = {"blocks": writer.blocks, "tokens": writer.tokens,
                       "documents": len(docs.groups), "shards": writer.shards}  # fmt: skip
    check_enough_blocks(sides["train"]["blocks"], sides["train"]["tokens"], cfg)
    info = {
        **split.info,
        "train_documents": sides["train"]["documents"],
        "eval_documents": sides["eval"]["documents"],
        "train_tokens": sides["train"]["tokens"],
        "eval_tokens": sides["eval"]["tokens"],
        "train_blocks": sides["train"]["blocks"],
        "eval_blocks": sides["eval"]["blocks"],
        "eval_names": split.held.names[:EVAL_NAMES_SHOWN],
    }
    n_docs = len(split.train.pieces) + len(split.held.pieces)
    manifest = {
        "format": FORMAT, "key": key, "created_at": time.time(),
        "max_seq_len": cfg.max_seq_len, "shard_blocks": shard_blocks,
        "eos_id": tokenizer.eos_token_id, "fingerprint": fp, "split": info, **sides,
        "counters": {"tokenizer_calls": calls, "documents_tokenized": n_docs,
                     "ingest_s": round(time.perf_counter() - t0, 3)},
    }  # fmt: skip
    storage.write_json(f"{corpus_prefix(key)}/{MANIFEST}", manifest)  # last: marks it complete
    return manifest


def ingest(cfg: DistillConfig, storage: Storage, tokenizer, num_cpus: int | None = None,
           shard_blocks: int = SHARD_BLOCKS, guard: CacheGuard | None = None) -> dict:  # fmt: skip
    """The corpus cache for this job: reused when its key exists, else built.

    Returns {"key", "manifest", "reused", "tokenizer_calls", "ingest_s"}: this job's
    counters (0 tokenizer calls when reused), which the job puts in metrics.json.
    """
    t0 = time.perf_counter()
    fp = fingerprint(cfg, tokenizer)
    key = corpus_key(fp)
    manifest, built = (guard or CacheGuard(storage, None)).get(
        CORPUS_PREFIX,
        key,
        lambda: caches.read_manifest(storage, CORPUS_PREFIX, key),
        lambda: build(cfg, storage, tokenizer, key, fp, num_cpus, shard_blocks),
    )
    reused = not built
    if reused:  # the cache was built for this data; the job's batch size may differ
        check_enough_blocks(manifest["train"]["blocks"], manifest["train"]["tokens"], cfg)
    calls = 0 if reused else manifest["counters"]["tokenizer_calls"]
    log.info("corpus %s: %s", key, "reused" if reused else "built")
    return {
        "key": key,
        "uri": storage.uri(corpus_prefix(key)),
        "manifest": manifest,
        "reused": reused,
        "tokenizer_calls": calls,
        "ingest_s": round(time.perf_counter() - t0, 3),
    }


# ---------------------------------------------------------------------------------
# Reading shards back
# ---------------------------------------------------------------------------------
def read_shard(storage: Storage, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(block [n] int64, input_ids [n, L] int32, length [n] int32) of one shard file."""
    table = pq.read_table(pa.BufferReader(storage.read_bytes(path)))
    ids = table.column("input_ids").combine_chunks()
    width = ids.type.list_size
    flat = ids.flatten().to_numpy()
    return (
        table.column("block").to_numpy(),
        flat.reshape(-1, width),
        table.column("length").to_numpy(),
    )


def to_packed(input_ids: np.ndarray, length: np.ndarray) -> Packed:
    """Blocks in kd's form: long input_ids [n, L] and attention_mask [n, L]."""
    ids = torch.from_numpy(input_ids.astype(np.int64))
    mask = torch.arange(ids.shape[1]) < torch.from_numpy(length.astype(np.int64))[:, None]
    return Packed(ids, mask.long())


def read_side(storage: Storage, key: str, manifest: dict, side: str,
              max_blocks: int | None = None) -> Packed:  # fmt: skip
    """The first `max_blocks` (default all) blocks of a side as a kd.data.Packed."""
    ids, lengths, n = [], [], 0
    for shard in manifest[side]["shards"]:
        if max_blocks is not None and n >= max_blocks:
            break
        _, x, length = read_shard(storage, f"{corpus_prefix(key)}/{shard['path']}")
        ids.append(x)
        lengths.append(length)
        n += len(x)
    L = manifest["max_seq_len"]
    x = np.concatenate(ids) if ids else np.zeros((0, L), dtype=np.int32)
    length = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32)
    packed = to_packed(x[:max_blocks], length[:max_blocks])
    packed.split = manifest["split"]
    return packed


def prepare(cfg: DistillConfig, storage: Storage, trust_remote_code: bool = False,
            guard: CacheGuard | None = None) -> dict | None:  # fmt: skip
    """The job driver's step: the corpus cache on data_pipeline='ray_data', else None."""
    if cfg.data_pipeline != "ray_data":
        return None
    from transformers import AutoTokenizer

    from kd.models import local_folder

    where = local_folder(cfg.teacher_model)
    tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    return ingest(cfg, storage, tok, guard=guard)


def summary(corpus: dict) -> dict:
    """What metrics.json says about the corpus cache a job used."""
    m = corpus["manifest"]
    out = {k: corpus[k] for k in ("key", "uri", "reused", "tokenizer_calls", "ingest_s")}
    out.update(
        train_blocks=m["train"]["blocks"],
        train_tokens=m["train"]["tokens"],
        shards=len(m["train"]["shards"]) + len(m["eval"]["shards"]),
        shard_bytes=sum(s["bytes"] for side in ("train", "eval") for s in m[side]["shards"]),
    )
    return out
