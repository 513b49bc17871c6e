"""The corpus pipeline (train_job.ingest, train_job.stream): shards equal kd.data.pack,
the cache key, the streamed order and its exact resume; then the same on Ray Data."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from jobs.storage import Storage
from kd.data import BlockSampler, build_datasets, pack, token_stream
from kd.state import load_state_dict, state_dict
from kd.train import setup, train
from tests.conftest import WORDS, tiny_cfg
from train_job import ingest as ing
from train_job import stream


def _docs(n: int = 37) -> list[str]:
    return [
        " ".join(WORDS[(i * 5 + j * (i % 3 + 2)) % len(WORDS)] for j in range(3 + (i * 7) % 29))
        for i in range(n)
    ]


def _side_manifest(writer: ing.ShardWriter, block_len: int) -> dict:
    side = {"blocks": writer.blocks, "tokens": writer.tokens, "shards": writer.shards}
    return {"max_seq_len": block_len, "split": {}, writer.side: side}


def _assert_same_blocks(got, ref) -> None:
    assert got.input_ids.dtype == ref.input_ids.dtype == torch.long
    assert torch.equal(got.input_ids, ref.input_ids)
    assert torch.equal(got.attention_mask, ref.attention_mask)


# ---------------------------------------------------------------------------------
# Shards equal kd.data.pack (no Ray)
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("block_len", [7, 16])
def test_shards_of_any_stream_cut_equal_pack(tmp_path, tokenizer, block_len):
    docs = _docs()
    ref = pack(docs, tokenizer, block_len)
    stream_ = np.array(token_stream(docs, tokenizer, tokenizer.eos_token_id), dtype=np.int32)
    rng = np.random.default_rng(0)
    cuts = {
        "whole": [stream_.size],
        "random": sorted(rng.integers(0, stream_.size, 9).tolist()) + [stream_.size],
        "tiny": list(range(1, stream_.size + 1, 3)) + [stream_.size],
    }
    for name, ends in cuts.items():
        storage = Storage(tmp_path / name)
        w = ing.ShardWriter(storage, "corpus/k", "train", block_len, 3, tokenizer.eos_token_id)
        start = 0
        for end in ends:  # pieces of any length, empty ones included
            w.add(stream_[start:end])
            start = end
        w.finish()
        got = ing.read_side(storage, "k", _side_manifest(w, block_len), "train")
        _assert_same_blocks(got, ref)
        assert all(s["blocks"] <= 3 for s in w.shards) and w.blocks == len(ref)
        assert w.tokens == ref.n_tokens == stream_.size, name


def test_tokenize_udf_and_in_process_pack_side_equal_pack(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(ing, "TEXT_BLOCK_BYTES", 200)  # many text blocks, each a batch
    docs = _docs(60)
    storage = Storage(tmp_path)
    w = ing.ShardWriter(storage, "corpus/k", "eval", 16, 4, tokenizer.eos_token_id)
    calls = ing.pack_side(docs, tokenizer, w, num_cpus=0)
    assert calls == len(ing._text_blocks(docs)) > 5
    _assert_same_blocks(ing.read_side(storage, "k", _side_manifest(w, 16), "eval"),
                        pack(docs, tokenizer, 16))  # fmt: skip
    out = ing._Tokenize(tokenizer)(pa.table({"text": ["a b", "c"]}))
    assert [ids[-1] for ids in out.column("ids").to_pylist()] == [tokenizer.eos_token_id] * 2


def test_in_process_ingest_equals_build_datasets(tmp_path, tokenizer, tiny_teacher, corpus):
    cfg = tiny_cfg(tiny_teacher, corpus, data_pipeline="ray_data")
    c = ing.ingest(cfg, Storage(tmp_path), tokenizer, num_cpus=0, shard_blocks=5)
    train_ref, eval_ref = build_datasets(cfg, tokenizer)
    storage, m = Storage(tmp_path), c["manifest"]
    _assert_same_blocks(ing.read_side(storage, c["key"], m, "train"), train_ref)
    _assert_same_blocks(ing.read_side(storage, c["key"], m, "eval"), eval_ref)
    assert m["split"] == json.loads(json.dumps(train_ref.split))
    assert len(m["train"]["shards"]) == -(-len(train_ref) // 5) > 1
    assert not c["reused"] and c["tokenizer_calls"] >= 2
    again = ing.ingest(cfg, storage, tokenizer, num_cpus=0, shard_blocks=5)
    assert again["reused"] and again["tokenizer_calls"] == 0 and again["key"] == c["key"]


# ---------------------------------------------------------------------------------
# The key
# ---------------------------------------------------------------------------------
def test_key_changes_with_everything_that_changes_the_blocks(tmp_path, tokenizer, tiny_teacher):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": d}) for d in _docs()) + "\n")
    cfg = tiny_cfg(tiny_teacher, data)
    key = ing.corpus_key(ing.fingerprint(cfg, tokenizer))
    assert key == ing.corpus_key(ing.fingerprint(cfg.model_copy(), tokenizer))
    for field, value in [("max_seq_len", 64), ("seed", 1), ("eval_fraction", 0.2),
                         ("document_separator", "none"), ("text_column", "text"),
                         ("max_texts", 10)]:  # fmt: skip
        other = cfg.model_copy(update={field: value})
        assert ing.corpus_key(ing.fingerprint(other, tokenizer)) != key, field
    # training settings that do not change the blocks keep the key
    same = cfg.model_copy(update={"lr": 0.5, "max_steps": 99, "per_device_batch_size": 2})
    assert ing.corpus_key(ing.fingerprint(same, tokenizer)) == key
    data.write_text(data.read_text() + json.dumps({"text": "one more"}) + "\n")
    assert ing.corpus_key(ing.fingerprint(cfg, tokenizer)) != key
    import copy

    tok2 = copy.deepcopy(tokenizer)
    tok2.add_tokens(["qzxnewtoken"])
    assert ing.tokenizer_hash(tok2) != ing.tokenizer_hash(tokenizer)
    assert ing.tokenizer_hash(tokenizer) == ing.tokenizer_hash(copy.deepcopy(tokenizer))


# ---------------------------------------------------------------------------------
# The streamed order (no Ray)
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2])
def test_one_shard_streams_block_samplers_order(world):
    n, bs, seed = 23, 3, 7
    for rank in range(world):
        ref = BlockSampler(n, bs, seed, rank, world)
        bpe = stream.batches_per_epoch(n, bs, world)
        for epoch in range(3):
            order = stream.rank_order(n, 64, seed, epoch, rank, world, bs)
            assert len(order) == bpe * bs
            for b in range(bpe):
                assert ref.next_indices().tolist() == order[b * bs : (b + 1) * bs].tolist()


def test_many_shards_are_permuted_whole_and_split_between_ranks():
    n, S, seed, bs, world = 50, 8, 3, 2, 2
    orders = [stream.epoch_order(n, S, seed, e) for e in range(3)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(n))
        shards = order // S
        runs = [s for i, s in enumerate(shards) if i == 0 or s != shards[i - 1]]
        assert sorted(runs) == list(range(7))  # each shard once, its blocks together
    assert not np.array_equal(orders[0], orders[1])
    a, b = (stream.rank_order(n, S, seed, 0, r, world, bs) for r in range(world))
    assert len(a) == len(b) == 24 and not set(a) & set(b)


def _local_stream(storage: Storage, corpus: dict, cfg, rank: int, world: int, pulls: list):
    """What the rank's Ray Dataset yields, read in this process by the same functions."""
    m = corpus["manifest"]
    epochs = stream.epochs_needed(cfg, m["train"]["blocks"], world)

    def open_stream():
        pulls.append(1)
        bs, buf = cfg.per_device_batch_size, None
        for item in stream.rank_items(m, cfg, rank, world, epochs):
            rows = stream._read_rows(
                {k: np.array([v]) for k, v in item.items()}, root=storage.root,
                key=corpus["key"], manifest=m, seed=cfg.seed, rank=rank, world=world,
                batch_size=bs,
            )  # fmt: skip
            buf = rows if buf is None else {k: np.concatenate([buf[k], rows[k]]) for k in rows}
            while len(buf["block"]) >= bs:  # batches span items, as iter_batches does
                yield {k: v[:bs] for k, v in buf.items()}
                buf = {k: v[bs:] for k, v in buf.items()}

    return open_stream


def test_streamed_batches_are_the_blocks_and_resume_at_the_same_block(
    tmp_path, tokenizer, tiny_teacher, corpus
):
    cfg = tiny_cfg(tiny_teacher, corpus, per_device_batch_size=3, max_steps=200)
    storage = Storage(tmp_path)
    c = ing.ingest(cfg, storage, tokenizer, num_cpus=0, shard_blocks=4)
    full = ing.read_side(storage, c["key"], c["manifest"], "train")
    world, pulls = 2, []
    open_stream = _local_stream(storage, c, cfg, 1, world, pulls)
    straight = stream.stream_data(storage, c, 3, world, open_stream)["sampler"]
    seen = []
    for _ in range(straight.batches_per_epoch * 2 + 3):  # across two epoch boundaries
        ids = straight.next_indices()
        got = straight.blocks.batch(ids)
        assert torch.equal(got["input_ids"], full.input_ids[ids])
        assert torch.equal(got["attention_mask"], full.attention_mask[ids])
        seen.append(ids.tolist())
    for stop in (1, straight.batches_per_epoch, straight.batches_per_epoch + 2):
        first = stream.stream_data(storage, c, 3, world, open_stream)["sampler"]
        for _ in range(stop):
            first.next_indices()
        resumed = stream.stream_data(storage, c, 3, world, open_stream)["sampler"]
        resumed.load_state(json.loads(json.dumps(first.state())))
        rest = [resumed.next_indices().tolist() for _ in range(len(seen) - stop)]
        assert rest == seen[stop:], stop
        assert resumed.served == straight.served
    head = stream.stream_data(storage, c, 3, world, open_stream)["data"][0]
    assert torch.equal(head.batch([0, 1])["input_ids"], full.input_ids[:2])  # calibration
    with pytest.raises(ValueError, match="not streamed"):
        head.batch([len(full) - 1])
    # the held-out side: a worker holds its first held_blocks blocks, never more, so its
    # memory does not grow with the corpus (evaluation scores the first max_eval_blocks)
    all_held = ing.read_side(storage, c["key"], c["manifest"], "eval")
    assert len(all_held) > 3
    held = stream.stream_data(storage, c, 3, world, open_stream, held_blocks=3)["data"][1]
    assert torch.equal(held.input_ids, all_held.input_ids[:3]) and held.split == all_held.split
    everything = stream.stream_data(storage, c, 3, world, open_stream)["data"][1]
    assert torch.equal(everything.input_ids, all_held.input_ids)  # fewer than HELD_BLOCKS


def test_training_on_the_stream_resumes_exactly(tmp_path, tokenizer, tiny_teacher, corpus):
    """kd.train on the streamed corpus: 2 steps, state_dict, a fresh setup resumed from
    it, 2 more steps equal 4 straight steps (the same blocks in the same order)."""
    cfg = tiny_cfg(tiny_teacher, corpus, max_steps=4, warmup_steps=1, layer_selection="uniform")
    storage = Storage(tmp_path)
    c = ing.ingest(cfg, storage, tokenizer, num_cpus=0, shard_blocks=4)
    pulls: list = []

    def data():
        open_stream = _local_stream(storage, c, cfg, 0, 1, pulls)
        return stream.stream_data(storage, c, cfg.per_device_batch_size, 1, open_stream)

    straight = setup(cfg, **data())
    train(straight)
    first = setup(cfg, **data())
    first.cfg = cfg.model_copy(update={"max_steps": 2})
    train(first)
    state = state_dict(first)
    resumed = setup(cfg, kept_layers=state["kept_layers"], **data())
    load_state_dict(resumed, state)
    train(resumed)
    assert resumed.sampler.state() == straight.sampler.state()
    a, b = straight.student.state_dict(), resumed.student.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ---------------------------------------------------------------------------------
# On Ray Data
# ---------------------------------------------------------------------------------
def test_ray_data_ingest_equals_pack_and_rank_datasets_stream_in_order(
    ray_cluster, tmp_path, tokenizer, tiny_teacher, corpus, monkeypatch
):
    monkeypatch.setattr(ing, "TEXT_BLOCK_BYTES", 2000)  # blocks span map batches
    cfg = tiny_cfg(tiny_teacher, corpus, num_workers=2, max_steps=8, data_pipeline="ray_data")
    storage = Storage(tmp_path)
    c = ing.ingest(cfg, storage, tokenizer, num_cpus=2, shard_blocks=16)
    train_ref, eval_ref = build_datasets(cfg, tokenizer)
    m = c["manifest"]
    _assert_same_blocks(ing.read_side(storage, c["key"], m, "train"), train_ref)
    _assert_same_blocks(ing.read_side(storage, c["key"], m, "eval"), eval_ref)
    blocks = sum(len(ing._text_blocks(p)) for p in _train_and_eval_pieces(cfg))
    assert c["tokenizer_calls"] == blocks > 4  # one call per text block, on 2 actors
    again = ing.ingest(cfg, storage, tokenizer, num_cpus=2, shard_blocks=16)
    assert again["reused"] and again["tokenizer_calls"] == 0
    kwargs = stream.trainer_datasets(cfg, storage.root, c)
    for rank in range(2):
        ds = kwargs["datasets"][f"train_{rank}"]
        ds.context.execution_options.preserve_order = True
        got = [b["block"].tolist() for b in ds.iter_batches(batch_size=4, batch_format="numpy")]
        pulls: list = []
        local = _local_stream(storage, c, cfg, rank, 2, pulls)()
        want = [b["block"].tolist() for b in local]
        assert got == want and len(got) >= 8, rank


def _train_and_eval_pieces(cfg):
    from kd.data import plan_split

    split = plan_split(cfg)
    return split.train.pieces, split.held.pieces


@pytest.mark.slow
def test_ray_data_job_resumes_at_the_same_block_and_reuses_the_corpus(
    ray_cluster, tmp_path, tokenizer, tiny_teacher, corpus
):
    """Two TorchTrainer runs on the session Ray: job A to step 4, then A again to step 6
    (Ray Train resumes it from its step-4 checkpoint) on the corpus A wrote: the second
    run tokenizes nothing, and its steps 5-6 equal 6 straight steps of kd.train in this
    process on the same shards, read the way the rank's Ray Dataset yields them
    (`_local_stream`, which the test above holds equal to the Ray Dataset). A third fit
    for the straight run would cost ~40 s of Ray Train start-up for the same fact."""
    from jobs.paths import JobPaths
    from train_job.cli import build_trainer

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    body = dict(max_steps=6, save_every=2, logging_steps=1, lr_schedule="constant",
                warmup_steps=1, data_pipeline="ray_data", student_layers=1)  # fmt: skip
    cfg = tiny_cfg(tiny_teacher, corpus, **body)
    storage = Storage(tmp_path)

    def run(job_id: str, max_steps: int) -> dict:
        c = cfg.model_copy(update={"max_steps": max_steps})
        paths = JobPaths(str(tmp_path), job_id)
        corpus_ = ing.prepare(c, storage)
        build_trainer(c, paths, None, False, corpus=corpus_).fit()
        return storage.read_json(paths.artifact_key("metrics.json"))

    a4 = run("kd-ingest-a", 4)
    a6 = run("kd-ingest-a", 6)
    assert a4["ingest"]["reused"] is False and a4["ingest"]["tokenizer_calls"] > 0
    assert a6["ingest"]["reused"] is True and a6["ingest"]["tokenizer_calls"] == 0
    assert a6["ingest"]["key"] == a4["ingest"]["key"]
    assert a6["resumed_from_step"] == 4 and a6["steps"] == 6
    assert a6["blocks_seen_by_rank"] == [24]  # 6 steps x 4 blocks, none twice

    c = ing.prepare(cfg, storage)  # A's shards
    data = stream.stream_data(storage, c, cfg.per_device_batch_size, 1,
                              _local_stream(storage, c, cfg, 0, 1, []))  # fmt: skip
    straight = setup(cfg, **data)
    losses: dict[float, float] = {}
    train(straight, lambda e: losses.update({float(e.step): e.metrics["loss"]}))
    resumed = {h["step"]: h["loss"] for h in a6["history"]}
    assert [resumed[s] for s in (5.0, 6.0)] == pytest.approx([losses[5.0], losses[6.0]], rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_data_job_trains_when_its_workers_hold_every_cpu(
    ray_cluster, tmp_path, tiny_teacher, corpus
):
    """The shard reads must not wait for a CPU: on a cluster whose CPUs the training
    workers hold (the usual case: a node per worker, sized to it), Ray Train leaves Ray
    Data a budget of 0 CPUs, and reads that ask for any CPU are never started (the job
    hung at its first batch, on two nodes, until this was fixed)."""
    import ray

    from jobs.paths import JobPaths
    from train_job.cli import build_trainer

    free = int(ray.available_resources().get("CPU", 0))
    if free < 2:
        pytest.skip(f"needs 2 free CPUs on the session Ray, it has {free}")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    # Two workers take every free CPU; an odd one left over is held by a placement group.
    spare = ray.util.placement_group([{"CPU": 1}]) if free % 2 else None
    if spare is not None:
        ray.get(spare.ready())
    body = dict(max_steps=2, warmup_steps=1, save_every=0, logging_steps=1, data_pipeline="ray_data",
                student_layers=1, num_workers=2, cpus_per_worker=free // 2)  # fmt: skip
    cfg = tiny_cfg(tiny_teacher, corpus, **body)
    paths = JobPaths(str(tmp_path), "kd-all-cpus")
    try:
        build_trainer(cfg, paths, None, False, corpus=ing.prepare(cfg, Storage(tmp_path))).fit()
    finally:
        if spare is not None:
            ray.util.remove_placement_group(spare)
    metrics = Storage(tmp_path).read_json(paths.artifact_key("metrics.json"))
    assert metrics["steps"] == 2 and metrics["blocks_seen_by_rank"] == [8, 8]
