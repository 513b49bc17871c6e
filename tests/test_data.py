"""Reading, packing and splitting data."""

import json

import pytest
import torch

from kd.config import DistillConfig
from kd.data import (
    BlockSampler,
    DataError,
    load_documents,
    pack,
    split_documents,
    token_stream,
)

DOCS = [f"Document number {i} says {'word ' * (i % 17)}and ends." for i in range(50)]


def test_pack_loses_and_duplicates_nothing(tokenizer):
    packed = pack(DOCS, tokenizer, block_len=16)
    stream = token_stream(DOCS, tokenizer, tokenizer.eos_token_id)
    flat = packed.input_ids.reshape(-1)[packed.attention_mask.reshape(-1).bool()]
    assert flat.tolist() == stream  # same tokens, same order, EOS after each document
    assert stream.count(tokenizer.eos_token_id) >= len(DOCS)
    # only the last block may carry padding
    assert packed.attention_mask[:-1].all()
    assert packed.n_tokens == len(stream)


def test_split_is_disjoint_deterministic_and_covers_everything():
    train, held = split_documents(DOCS, 0.2, seed=3)
    assert set(train).isdisjoint(held) and len(held) == 10
    assert sorted(train + held) == sorted(DOCS)
    assert split_documents(DOCS, 0.2, seed=3) == (train, held)
    assert split_documents(DOCS, 0.2, seed=4) != (train, held)
    with pytest.raises(DataError, match="at least 2 documents"):
        split_documents(["only one"], 0.1, 0)


def test_held_out_blocks_share_no_text_with_training(tokenizer):
    train, held = split_documents(DOCS, 0.2, seed=0)
    tr = pack(train, tokenizer, 8)
    ev = pack(held, tokenizer, 8)
    tr_docs = {d for d in train}
    for d in held:
        assert d not in tr_docs
    assert len(tr) > len(ev) > 0


def test_sampler_is_seeded_sharded_and_resumable():
    a = BlockSampler(40, batch_size=4, seed=1, rank=0, world=2)
    b = BlockSampler(40, batch_size=4, seed=1, rank=1, world=2)
    ea = torch.cat([a.next_indices() for _ in range(a.batches_per_epoch)])
    eb = torch.cat([b.next_indices() for _ in range(b.batches_per_epoch)])
    assert set(ea.tolist()).isdisjoint(eb.tolist())  # ranks see different blocks
    assert len(set(ea.tolist()) | set(eb.tolist())) == 40
    # resume mid-epoch gives exactly the same continuation
    c = BlockSampler(40, batch_size=4, seed=1)
    seq = [c.next_indices() for _ in range(7)]
    d = BlockSampler(40, batch_size=4, seed=1)
    for _ in range(3):
        d.next_indices()
    e = BlockSampler(40, batch_size=4, seed=1)
    e.load_state(d.state())
    for want in seq[3:]:
        assert torch.equal(e.next_indices(), want)
    with pytest.raises(DataError, match="training blocks"):
        BlockSampler(3, batch_size=4, seed=0)


def test_local_formats_and_column_detection(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond one\n")
    assert load_documents(DistillConfig(dataset=str(tmp_path / "a.txt"))) == [
        "first paragraph\nstill first",
        "second one",
    ]
    rows = [{"id": i, "body": f"text {i}"} for i in range(3)]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_documents(DistillConfig(dataset=str(tmp_path / "b.jsonl"))) == [
        "text 0",
        "text 1",
        "text 2",
    ]
    (tmp_path / "c.json").write_text(json.dumps({"content": ["x", "y"]}))
    assert load_documents(DistillConfig(dataset=str(tmp_path / "c.json"))) == ["x", "y"]
    import pandas as pd

    pd.DataFrame({"n": [1, 2], "story": ["once", "upon"]}).to_csv(tmp_path / "d.csv", index=False)
    assert load_documents(DistillConfig(dataset=str(tmp_path / "d.csv"))) == ["once", "upon"]
    pd.DataFrame({"story": ["p1", "p2"]}).to_parquet(tmp_path / "e.parquet")
    assert load_documents(DistillConfig(dataset=str(tmp_path / "e.parquet"))) == ["p1", "p2"]
    # a folder reads every supported file in order
    assert len(load_documents(DistillConfig(dataset=str(tmp_path)))) == 2 + 3 + 2 + 2 + 2


def test_no_text_column_names_the_columns(tmp_path):
    (tmp_path / "n.jsonl").write_text(json.dumps({"a": 1, "b": 2.5}) + "\n")
    with pytest.raises(DataError, match=r"columns \['a', 'b'\]"):
        load_documents(DistillConfig(dataset=str(tmp_path / "n.jsonl")))
    (tmp_path / "t.jsonl").write_text(json.dumps({"x": "hi"}) + "\n")
    with pytest.raises(DataError, match="text_column 'text' not found"):
        load_documents(DistillConfig(dataset=str(tmp_path / "t.jsonl"), text_column="text"))


def test_missing_local_path_and_unreachable_hub_give_clear_errors(monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_documents(DistillConfig(dataset="./no/such/file.jsonl"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load dataset 'nobody/nothing-here'"):
        load_documents(DistillConfig(dataset="nobody/nothing-here"))


def test_hub_path_reads_a_local_dataset_script_folder(tmp_path):
    """The real datasets.load_dataset path, pointed at a local folder of parquet files."""
    import pandas as pd

    d = tmp_path / "hubdata" / "data"
    d.mkdir(parents=True)
    pd.DataFrame({"label": [0, 1, 0], "sentence": ["a b", "c d", "e f"]}).to_parquet(
        d / "train-00000-of-00001.parquet"
    )
    from kd.data import _read_hub

    cfg = DistillConfig(dataset=str(tmp_path / "hubdata"), split="train")
    assert _read_hub(cfg) == ["a b", "c d", "e f"]


def test_embedded_corpus_is_there_and_large_enough():
    docs = load_documents(DistillConfig())
    assert len(docs) > 100
    assert sum(len(d) for d in docs) > 200_000
