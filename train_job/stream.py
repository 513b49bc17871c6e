"""Streaming the corpus shards (train_job.ingest) to the Ray Train workers.

The order: each epoch draws, from a generator seeded like `kd.data.BlockSampler`'s
(seed * 1_000_003 + epoch), a permutation of the blocks inside every shard (shard 0
first), then a permutation of the shards; the epoch's order is the shards in that order,
each in its own permuted order. Rank r of w takes positions r, r+w, ... of it, the tail
that does not divide evenly dropped, in batches of per_device_batch_size. With one shard
this is exactly BlockSampler's order, so small corpora train on the same batches on both
pipelines; with many, a worker holds one shard at a time, never the corpus.

Each rank gets its own Ray Dataset (`train_<rank>`, not split by Ray Train, order
preserved): one row per (epoch, shard) that the rank reads, mapped to the blocks it
takes from that shard. `StreamSampler` pulls batches from `get_dataset_shard` and keeps
BlockSampler's state ({epoch, pos, served}); resuming skips the batches already served
(re-read from the shards, never re-tokenized).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from jobs.storage import Storage
from kd.config import DistillConfig
from kd.data import DataError, Packed
from train_job.ingest import corpus_prefix, read_shard, read_side, to_packed

HEAD_BLOCKS = 16  # first train blocks every worker holds: a derived student's calibration
# Held-out blocks a worker holds, at most: evaluation scores the first max_eval_blocks,
# generation prompts sample from these. The held-out side grows with the corpus (5% of
# a billion tokens is 16 GB as kd's int64 ids + mask), so a worker never loads all of it.
HELD_BLOCKS = 256


def batches_per_epoch(n_blocks: int, batch_size: int, world: int) -> int:
    return (n_blocks // world) // batch_size


@functools.lru_cache(maxsize=4)
def epoch_order(n_blocks: int, shard_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """All block ids of one epoch in training order (see the module docstring)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    n_shards = math.ceil(n_blocks / shard_blocks)
    inner = []
    for s in range(n_shards):
        lo = s * shard_blocks
        inner.append(lo + torch.randperm(min(n_blocks, lo + shard_blocks) - lo, generator=g))
    shard_order = torch.randperm(n_shards, generator=g)
    return torch.cat([inner[s] for s in shard_order.tolist()]).numpy()


def rank_order(n_blocks: int, shard_blocks: int, seed: int, epoch: int, rank: int, world: int,
               batch_size: int) -> np.ndarray:  # fmt: skip
    """The block ids rank `rank` trains on in `epoch`, in order."""
    keep = batches_per_epoch(n_blocks, batch_size, world) * batch_size
    return epoch_order(n_blocks, shard_blocks, seed, epoch)[rank::world][:keep]


def rank_items(manifest: dict, cfg: DistillConfig, rank: int, world: int, epochs: int) -> list:
    """One row per (epoch, shard) the rank reads: [start, stop) of its epoch order."""
    n, S = manifest["train"]["blocks"], manifest["shard_blocks"]
    items = []
    for e in range(epochs):
        order = rank_order(n, S, cfg.seed, e, rank, world, cfg.per_device_batch_size)
        shard = order // S
        cuts = np.flatnonzero(np.diff(shard)) + 1  # each shard's blocks are contiguous
        for start, stop in zip(np.r_[0, cuts], np.r_[cuts, len(order)], strict=True):
            items.append({"epoch": e, "shard": int(shard[start]), "start": int(start),
                          "stop": int(stop)})  # fmt: skip
    return items


def _read_rows(batch: dict, root: str, key: str, manifest: dict, seed: int, rank: int,
               world: int, batch_size: int) -> dict:  # fmt: skip
    """map_batches fn: (epoch, shard, start, stop) rows -> the blocks, in order."""
    storage = Storage(root)
    n, S = manifest["train"]["blocks"], manifest["shard_blocks"]
    out: dict[str, list] = {"block": [], "input_ids": [], "length": [], "epoch": []}
    cols = (batch["epoch"], batch["shard"], batch["start"], batch["stop"])
    for e, s, start, stop in zip(*cols, strict=True):
        ids = rank_order(n, S, seed, int(e), rank, world, batch_size)[start:stop]
        path = manifest["train"]["shards"][int(s)]["path"]
        block, x, length = read_shard(storage, f"{corpus_prefix(key)}/{path}")
        rows = ids - s * S
        assert (block[rows] == ids).all(), "shard rows out of block order"
        out["block"].append(ids)
        out["input_ids"].append(x[rows])
        out["length"].append(length[rows])
        out["epoch"].append(np.full(len(ids), e, dtype=np.int64))
    return {k: np.concatenate(v) for k, v in out.items()}


def epochs_needed(cfg: DistillConfig, n_blocks: int, world: int) -> int:
    bpe = batches_per_epoch(n_blocks, cfg.per_device_batch_size, world)
    return max(1, math.ceil(cfg.max_steps * cfg.grad_accum_steps / max(bpe, 1)))


def trainer_datasets(cfg: DistillConfig, root: str, corpus: dict | None) -> dict:
    """TorchTrainer kwargs for the ray_data pipeline: one ordered dataset per rank."""
    if corpus is None:
        return {}
    import ray.data
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    manifest, world = corpus["manifest"], cfg.num_workers
    epochs = epochs_needed(cfg, manifest["train"]["blocks"], world)
    datasets = {}
    for rank in range(world):
        items = rank_items(manifest, cfg, rank, world, epochs)
        datasets[f"train_{rank}"] = ray.data.from_items(items).map_batches(
            _read_rows,
            batch_size=1,  # one shard read per task call
            fn_kwargs={
                "root": root,
                "key": corpus["key"],
                "manifest": manifest,
                "seed": cfg.seed,
                "rank": rank,
                "world": world,
                "batch_size": cfg.per_device_batch_size,
            },  # fmt: skip
            # No CPU: the reads are I/O, and the training workers usually hold every CPU
            # of the cluster (Ray Train then leaves Ray Data a budget of 0 CPUs): a read
            # that asked for any CPU would never start, and the job hung at its first batch.
            num_cpus=0,
            concurrency=2,  # without a CPU to bound them: one shard being read, one ahead
        )
    return {
        "datasets": datasets,
        "dataset_config": DataConfig(
            datasets_to_split=[],  # each rank reads its own dataset, whole and in order
            execution_options=ExecutionOptions(preserve_order=True),
        ),
    }


class StreamedBlocks:
    """The training blocks a worker sees on the ray_data pipeline, in `kd.data.Packed`'s
    interface: `batch(ids)` returns the batch `StreamSampler` just pulled (blocks are
    served in stream order only) or, for the first HEAD_BLOCKS ids, the head that a
    derived student calibrates on."""

    def __init__(self, head: Packed, n_blocks: int, n_tokens: int, split: dict):
        self.head, self._n, self._tokens, self.split = head, n_blocks, n_tokens, split
        self._last: tuple[Tensor, dict[str, Tensor]] | None = None

    def __len__(self) -> int:
        return self._n

    @property
    def n_tokens(self) -> int:
        return self._tokens

    def put(self, ids: Tensor, batch: dict[str, Tensor]) -> None:
        self._last = (ids, batch)

    def batch(self, idx: list[int] | Tensor) -> dict[str, Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        if self._last is not None and torch.equal(idx, self._last[0]):
            return self._last[1]
        if idx.numel() and int(idx.max()) < len(self.head):
            return self.head.batch(idx)
        raise DataError(
            f"blocks {idx.tolist()[:8]} were not streamed: with data_pipeline='ray_data' a "
            "worker reads the blocks StreamSampler pulls, in order; use data_pipeline='local' "
            "for random access"
        )


class StreamSampler:
    """BlockSampler's interface and state over the rank's streamed dataset.

    `open_stream()` returns an iterator of numpy batches (block, input_ids, length,
    epoch) of `batch_size` rows; it is called on the first pull, after any
    `load_state`, and the batches before (epoch, pos) are skipped.
    """

    def __init__(self, blocks: StreamedBlocks, open_stream, batch_size: int, world: int):
        self.blocks, self.open_stream, self.bs = blocks, open_stream, batch_size
        self.n = len(blocks)
        self.batches_per_epoch = batches_per_epoch(self.n, batch_size, world)
        self.epoch, self.pos, self.served = 0, 0, 0
        self._it = None

    def _pull(self) -> dict:
        try:
            return next(self._it)
        except StopIteration:
            raise DataError(
                f"the streamed corpus ended at epoch {self.epoch}, batch {self.pos}; the job "
                "needs more batches than its datasets were built for (max_steps changed?)"
            ) from None

    def next_indices(self) -> Tensor:
        if self.pos >= self.batches_per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
        if self._it is None:
            self._it = iter(self.open_stream())
            for _ in range(self.epoch * self.batches_per_epoch + self.pos):
                self._pull()  # resuming: skip what was served, without tokenizing
        b = self._pull()
        if not (b["epoch"] == self.epoch).all() or len(b["block"]) != self.bs:
            raise DataError(f"stream out of step: expected epoch {self.epoch} batch {self.pos}")
        ids = torch.from_numpy(b["block"].astype(np.int64))
        packed = to_packed(b["input_ids"], b["length"])
        self.blocks.put(
            ids, {"input_ids": packed.input_ids, "attention_mask": packed.attention_mask}
        )
        self.pos += 1
        self.served += self.bs
        return ids

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "served": self.served}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self.served = int(state.get("served", 0))
        self._it = None  # reopened (and skipped to here) on the next pull


def stream_data(storage: Storage, corpus: dict, batch_size: int, world: int,
                open_stream, held_blocks: int = HELD_BLOCKS) -> dict:  # fmt: skip
    """kd.train.setup kwargs for a streamed corpus: the training blocks (the head held,
    the rest streamed by `open_stream`), their sampler and the first `held_blocks`
    held-out blocks (all of them when there are fewer)."""
    key, manifest = corpus["key"], corpus["manifest"]
    head = read_side(storage, key, manifest, "train", max_blocks=HEAD_BLOCKS)
    train = StreamedBlocks(head, manifest["train"]["blocks"], manifest["train"]["tokens"],
                           manifest["split"])  # fmt: skip
    held = read_side(storage, key, manifest, "eval", max_blocks=held_blocks)
    sampler = StreamSampler(train, open_stream, batch_size, world)
    return {"data": (train, held), "sampler": sampler}


def worker_data(loop_config: dict, cfg: DistillConfig, rank: int, world: int) -> dict:
    """stream_data from `get_dataset_shard` on the ray_data pipeline; {} on the local one."""
    corpus = loop_config.get("corpus")
    if corpus is None:
        return {}
    import ray.train

    def open_stream():
        it = ray.train.get_dataset_shard(f"train_{rank}")
        return it.iter_batches(batch_size=cfg.per_device_batch_size, batch_format="numpy")

    storage = Storage(loop_config["storage"])
    held = max(HELD_BLOCKS, cfg.max_eval_blocks)
    return stream_data(storage, corpus, cfg.per_device_batch_size, world, open_stream, held)
