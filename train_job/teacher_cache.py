"""The teacher signal cache: built once by a Ray Data actor pool, read by every job.

The job driver calls `prepare(cfg, storage, blocks)` before the TorchTrainer starts.
It keys the cache by the teacher's identity and the corpus (`cache_key`); when the
manifest is there the job reuses it, otherwise (teacher_signal=cache, or auto when the
job runs more than one epoch over its blocks) `build` runs `kd.teacher_signal.
compute_signal` over the packed training blocks with `map_batches` on a pool of
actors: one teacher load per actor, a GPU each when the job uses GPUs. Each actor
writes the signal of its batch straight to storage, so nothing large passes through
the driver. Workers read it with `load` and hand it to `kd.train.setup(signal=...)`.

Layout (shared folder or S3, `jobs.storage`)::

    teacher_signal/<key>/manifest.json        written last: its presence means complete
    teacher_signal/<key>/train/part-<first block:09d>.npz   one per actor batch

Each part holds `block` (int64 [n], the training blocks it covers, in the order of
`kd.data.pack` / the corpus shards of train_job.ingest) and the arrays of
`compute_signal` for them: exact mode `hidden` fp16 [n, L, H]; top-k mode `topk_logp`
fp32 [n, L, k], `topk_ids` int32 [n, L, k], `tail_logp` fp32 [n, L].

`<key>` = sha256 (first 20 hex digits) of: format, teacher identity (name; a local
folder's or GGUF file's files with size and mtime_ns; a hub id as named), the corpus
key, the mode, and for top-k k and the temperature (the log-probs are stored at it).
The corpus key is the ingest fingerprint when the job has one, else the sha256 of the
packed training blocks themselves (`blocks_key`).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import torch

from jobs import caches
from jobs.caches import MANIFEST
from jobs.storage import Storage
from kd.config import DistillConfig
from kd.data import Packed
from kd.run import resolve_precision
from kd.teacher_signal import TeacherSignal, compute_signal
from train_job.cache_guard import CacheGuard

FORMAT = "llm2slm.teacher_signal/1"
PREFIX = "teacher_signal"


# ---------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------
def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def teacher_identity(name: str) -> dict:
    """What makes the teacher's outputs what they are: its name and, for local sources,
    every file's relative path, size and mtime_ns (a replaced file changes the key)."""
    from kd.models import resolve_source

    src = resolve_source(name)
    out: dict = {"name": name, "kind": src.kind}
    if src.kind == "hub":
        return out
    root = Path(src.location)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    out["files"] = [
        [str(p.relative_to(root)) if p != root else p.name, p.stat().st_size, p.stat().st_mtime_ns]
        for p in files
    ]
    return out


def blocks_key(blocks: Packed) -> str:
    """The corpus key of packed blocks: the sha256 of their ids and mask."""
    h = hashlib.sha256()
    h.update(str(tuple(blocks.input_ids.shape)).encode())
    h.update(blocks.input_ids.to(torch.int32).numpy().tobytes())
    h.update(blocks.attention_mask.to(torch.int8).numpy().tobytes())
    return h.hexdigest()[:20]


def cache_key(cfg: DistillConfig, corpus_key: str) -> tuple[str, dict]:
    """(key, the fingerprint it hashes) of this job's teacher signal."""
    fp: dict = {
        "format": FORMAT,
        "teacher": teacher_identity(cfg.teacher_model),
        "corpus": corpus_key,
        "mode": cfg.teacher_cache_mode,
    }
    if cfg.teacher_cache_mode == "topk":
        fp |= {"k": cfg.teacher_topk, "temperature": cfg.temperature}
    return _digest(fp), fp


# ---------------------------------------------------------------------------------
# Building: a Ray Data actor pool
# ---------------------------------------------------------------------------------
class SignalActor:
    """One teacher per actor; each call computes and writes one batch of blocks."""

    def __init__(self, cfg_json: dict, root: str, prefix: str, trust: bool, threads: int):
        from kd.models import DistillForward, load_model_and_tokenizer

        torch.set_num_threads(max(1, threads))
        self.cfg = DistillConfig.model_validate(cfg_json)
        teacher, _ = load_model_and_tokenizer(self.cfg.teacher_model, trust_remote_code=trust)
        self.device = "cuda" if self.cfg.use_gpu and torch.cuda.is_available() else "cpu"
        # the job's own precision: the stored signal is what the live teacher would give
        self.autocast = resolve_precision(self.cfg, torch.device(self.device))
        self.fwd = DistillForward(teacher.eval().requires_grad_(False).to(self.device))
        self.storage, self.prefix = Storage(root), prefix
        import ray

        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg, blocks = self.cfg, batch["block"].astype(np.int64)
        ids = torch.as_tensor(np.stack(batch["input_ids"]), dtype=torch.long, device=self.device)
        mask = torch.as_tensor(np.stack(batch["attention_mask"]), dtype=torch.long)
        t0 = time.perf_counter()
        with torch.autocast(self.device, self.autocast, enabled=self.autocast is not None):
            arrays = compute_signal(
                self.fwd, ids, mask.to(self.device), cfg.teacher_cache_mode,
                cfg.teacher_topk, cfg.temperature,
            )  # fmt: skip
        forward_s = time.perf_counter() - t0
        buf = io.BytesIO()
        np.savez(buf, block=blocks, **arrays)
        rel = f"train/part-{int(blocks[0]):09d}.npz"
        self.storage.write_bytes(f"{self.prefix}/{rel}", buf.getvalue())
        return {
            "path": np.array([rel]),
            "node": np.array([self.node]),
            "blocks": np.array([len(blocks)]),
            "tokens": np.array([int(mask.sum())]),
            "bytes": np.array([buf.getbuffer().nbytes]),
            "forward_s": np.array([forward_s]),
        }


def build(
    cfg: DistillConfig,
    storage: Storage,
    key: str,
    fingerprint: dict,
    blocks: Packed,
    *,
    trust_remote_code: bool = False,
    actors: int | None = None,
) -> dict:
    """Compute the signal of every block with `map_batches` on an actor pool and write
    the manifest last. Returns the manifest."""
    import ray

    prefix = f"{PREFIX}/{key}"
    n = len(blocks)
    rows = [
        {
            "block": i,
            "input_ids": blocks.input_ids[i].numpy(),
            "attention_mask": blocks.attention_mask[i].numpy(),
        }
        for i in range(n)
    ]
    pool = max(1, actors or cfg.num_workers)
    bs = cfg.per_device_batch_size
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(n // bs, 4 * pool)))
    t0 = time.time()
    out = ds.map_batches(
        SignalActor,
        fn_constructor_args=(
            cfg.model_dump(mode="json"),
            storage.root,
            prefix,
            trust_remote_code,
            cfg.cpus_per_worker,
        ),  # fmt: skip
        batch_size=bs,
        concurrency=pool,
        num_cpus=cfg.cpus_per_worker,
        num_gpus=1 if cfg.use_gpu else 0,
    ).take_all()
    build_s = time.time() - t0
    parts = sorted(
        (
            {"path": str(r["path"]), "blocks": int(r["blocks"]), "bytes": int(r["bytes"])}
            for r in out
        ),
        key=lambda p: p["path"],
    )
    tokens = sum(int(r["tokens"]) for r in out)
    size = sum(p["bytes"] for p in parts)
    forward_s = sum(float(r["forward_s"]) for r in out)
    manifest = {
        "format": FORMAT,
        "key": key,
        "created_at": time.time(),
        "mode": cfg.teacher_cache_mode,
        "fingerprint": fingerprint,
        "blocks": n,
        "max_seq_len": int(blocks.input_ids.shape[1]),
        "tokens": tokens,
        "bytes": size,
        "bytes_per_token": size / max(tokens, 1),
        "parts": parts,
        "counters": {
            "teacher_forwards": len(out),
            "actors": pool,
            # where the pool's actors ran: Ray Data spreads them over the cluster's nodes
            "nodes": sorted({str(r["node"]) for r in out}),
            "build_s": build_s,
            "teacher_tokens_per_s": tokens / max(forward_s / pool, 1e-9),
        },
    }
    storage.write_json(f"{prefix}/{MANIFEST}", manifest)
    return manifest


# ---------------------------------------------------------------------------------
# Deciding and reading
# ---------------------------------------------------------------------------------
def training_blocks(cfg: DistillConfig, trust_remote_code: bool = False) -> Packed:
    """The job's packed training blocks, as its workers build them (tokenizer only)."""
    from transformers import AutoTokenizer

    from kd.data import build_datasets
    from kd.models import local_folder

    where = local_folder(cfg.teacher_model)
    tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return build_datasets(cfg, tok)[0]


def epochs(cfg: DistillConfig, blocks: int) -> float:
    """Passes the job makes over its training blocks."""
    return (
        cfg.max_steps
        * cfg.per_device_batch_size
        * cfg.grad_accum_steps
        * cfg.num_workers
        / max(blocks, 1)
    )


def prepare(
    cfg: DistillConfig,
    storage: Storage,
    blocks: Packed,
    *,
    corpus_key: str | None = None,
    trust_remote_code: bool = False,
    guard: CacheGuard | None = None,
) -> dict | None:
    """What the job's workers read: {"key", "built", "teacher_forwards", ...} or None
    when this job runs the live teacher (teacher_signal=live, or auto with no cache and
    a single epoch). `guard` (the job's registry) makes two jobs that need the same
    missing cache build it once."""
    if cfg.teacher_signal == "live" or cfg.data_pipeline == "ray_data":
        return None  # the streamed corpus carries no signal yet (config refuses 'cache')
    key, fp = cache_key(cfg, corpus_key or blocks_key(blocks))
    one_pass = cfg.teacher_signal == "auto" and epochs(cfg, len(blocks)) <= 1.0
    if one_pass and caches.read_manifest(storage, PREFIX, key) is None:
        return None  # one pass: building costs as much as running the teacher live
    guard = guard or CacheGuard(storage, None)
    m, built = guard.get(
        PREFIX,
        key,
        lambda: caches.read_manifest(storage, PREFIX, key),
        lambda: build(cfg, storage, key, fp, blocks, trust_remote_code=trust_remote_code),
    )
    if not built:
        return {"key": key, "built": False, "teacher_forwards": 0, "bytes": m["bytes"]}
    return {
        "key": key,
        "built": True,
        "teacher_forwards": m["counters"]["teacher_forwards"],
        "bytes": m["bytes"],
        "bytes_per_token": m["bytes_per_token"],
        "teacher_tokens_per_s": m["counters"]["teacher_tokens_per_s"],
        "built_on_nodes": len(m["counters"].get("nodes", [])),
    }


def load(storage: Storage, key: str) -> TeacherSignal:
    """The whole cached signal, rows in block order (each worker samples every block)."""
    prefix = f"{PREFIX}/{key}"
    m = storage.read_json(f"{prefix}/{MANIFEST}")
    arrays: dict[str, np.ndarray] = {}
    covered = 0
    for part in m["parts"]:
        with np.load(io.BytesIO(storage.read_bytes(f"{prefix}/{part['path']}"))) as z:
            rows = z["block"]
            for name in z.files:
                if name == "block":
                    continue
                a = z[name]
                if name not in arrays:
                    arrays[name] = np.empty((m["blocks"],) + a.shape[1:], a.dtype)
                arrays[name][rows] = a
            covered += len(rows)
    if covered != m["blocks"]:
        raise ValueError(
            f"teacher signal cache {key}: its parts cover {covered} of {m['blocks']} blocks; "
            f"delete {storage.uri(prefix)} so the next job rebuilds it"
        )
    return TeacherSignal(m["mode"], arrays)
