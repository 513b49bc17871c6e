"""The held-out split holds out whole documents (issue 17) and says how it was made.

Every test checks what the split is about: which article, file or record a piece of
held-out text came from, never only how many blocks there are.
"""

import json
import re

import pytest

from kd.config import DistillConfig
from kd.data import DataError, build_datasets, heading_title, plan_split
from tests.conftest import tiny_cfg

MARK = re.compile(r"qz(\d+)x")  # one marker word per article, in every paragraph


def wikitext_sample(n_articles: int = 12) -> str:
    """Wikitext-shaped text: ' = Title = ' articles with ' = = Section = = ' inside,
    blank lines around headings, one paragraph per line (as in wikitext-2)."""
    parts = []
    for k in range(n_articles):
        m = f"qz{k}x"
        parts += ["", f" = Article {k} title = ", ""]
        parts += [f" The {m} article opens here , with words of its own . "]
        for s in ("History", "Legacy"):
            parts += ["", f" = = {s} of {m} = = ", ""]
            parts += [f" Paragraph one on {s} of {m} . ", f" Paragraph two on {s} of {m} . "]
            parts += ["", f" = = = Detail of {m} = = = ", "", f" A detail of {m} . "]
    return "\n".join(parts) + "\n"


def marks(pieces: list[str]) -> set[int]:
    return {int(m) for p in pieces for m in MARK.findall(p)}


def decoded_marks(packed, tokenizer) -> set[int]:
    """Markers in the text that the packed blocks actually hold."""
    ids = packed.input_ids.reshape(-1)[packed.attention_mask.reshape(-1).bool()]
    return {int(m) for m in MARK.findall(tokenizer.decode(ids.tolist()))}


@pytest.fixture
def wiki(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(wikitext_sample())
    return path


def test_heading_title_knows_titles_from_sub_headings():
    assert heading_title(" = Homarus gammarus = ") == "Homarus gammarus"
    assert heading_title("= E = mc2 =") == "E = mc2"
    assert heading_title(" = = Description = = ") is None
    assert heading_title(" = = = Detail = = = ") is None
    assert heading_title(" A sentence with = signs = inside . ") is None


def test_no_held_out_article_shares_text_with_training(wiki, tokenizer):
    cfg = DistillConfig(dataset=str(wiki), eval_fraction=0.25, max_seq_len=16, seed=3)
    split = plan_split(cfg)
    assert split.info["method"] == "held-out documents" and split.info["unit"] == "article"
    assert split.info["document_separator"] == "heading"
    assert set(split.held.names).isdisjoint(split.train.names)
    assert len(split.held.names) == 3  # ceil(0.25 * 12) whole articles
    held, train = marks(split.held.pieces), marks(split.train.pieces)
    assert held and train and held.isdisjoint(train)
    assert held | train == set(range(12))
    # each held-out article is there whole: its title, its sections and sub-sections
    for title in split.held.names:
        k = int(title.split()[1])
        text = "\n".join(split.held.take([split.held.names.index(title)]))
        assert f"= Article {k} title =" in text
        assert f"= = Legacy of qz{k}x = =" in text and f"= = = Detail of qz{k}x = = =" in text
        assert text.count(f"qz{k}x") == 11
    # and the packed blocks, decoded, hold the same articles on the same sides
    tr, ev = build_datasets(cfg, tokenizer)
    assert decoded_marks(ev, tokenizer) == held
    assert decoded_marks(tr, tokenizer) == train
    assert ev.split["eval_names"] == split.held.names
    assert ev.split["train_documents"] == 9 and ev.split["eval_documents"] == 3
    assert ev.split["train_tokens"] == tr.n_tokens and ev.split["eval_tokens"] == ev.n_tokens


def test_the_old_paragraph_split_leaks_articles(wiki):
    """What issue 17 found: blank-line paragraphs put one article on both sides."""
    cfg = DistillConfig(dataset=str(wiki), eval_fraction=0.25, document_separator="blank_line")
    split = plan_split(cfg)
    assert split.info["unit"] == "paragraph"
    assert marks(split.held.pieces) & marks(split.train.pieces)


def test_no_held_out_file_shares_text_with_training(tmp_path, tokenizer):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for k in range(6):
        rows = [{"text": f"Record {r} of file qz{k}x ."} for r in range(3)]
        (folder / f"f{k}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for k in range(6, 10):
        (folder / "sub" / f"t{k}.txt").write_text(wikitext_sample(2).replace("qz", f"qz{k}0"))
    (folder / "sub" / "t6.txt").write_text(f"One qz{6}x paragraph .\n\nAnother qz{6}x one .\n")
    cfg = DistillConfig(dataset=str(folder), eval_fraction=0.3, max_seq_len=16, seed=1)
    split = plan_split(cfg)
    assert split.info["unit"] == "file" and len(split.held.names) == 3
    assert set(split.held.names).isdisjoint(split.train.names)
    assert set(split.held.names) | set(split.train.names) == {
        *(f"f{k}.jsonl" for k in range(6)),
        *(f"sub/t{k}.txt" for k in range(6, 10)),
    }
    held, train = marks(split.held.pieces), marks(split.train.pieces)
    assert held and held.isdisjoint(train)
    tr, ev = build_datasets(cfg, tokenizer)
    assert decoded_marks(ev, tokenizer) == held and decoded_marks(tr, tokenizer) == train


def test_records_are_held_out_whole(tmp_path):
    rows = [{"text": f"Line one of qz{i}x .\n\nLine two of qz{i}x ."} for i in range(20)]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    split = plan_split(DistillConfig(dataset=str(path), eval_fraction=0.2))
    assert split.info["unit"] == "record" and len(split.held.groups) == 4
    assert marks(split.held.pieces).isdisjoint(marks(split.train.pieces))


def test_split_is_deterministic_by_seed(wiki):
    def held(seed):
        return plan_split(DistillConfig(dataset=str(wiki), seed=seed, eval_fraction=0.2)).held

    assert held(0).names == held(0).names and held(0).groups == held(0).groups
    assert len({tuple(held(s).names) for s in range(6)}) > 1  # the seed moves it


def test_contiguous_span_when_the_text_marks_no_documents(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("\n\n".join(f"Paragraph p{i}q of a long text ." for i in range(40)) + "\n")

    def split(**kw):
        return plan_split(DistillConfig(dataset=str(path), eval_fraction=0.1, **kw))

    for seed in range(4):
        s = split(seed=seed)
        assert s.info["method"] == "held-out span" and s.info["document_separator"] == "none"
        idx = [int(re.search(r"p(\d+)q", p).group(1)) for p in s.held.pieces]
        assert len(idx) == 4 and idx == list(range(idx[0], idx[0] + 4))  # one region
        assert f"paragraphs {idx[0] + 1}-{idx[-1] + 1}" in s.info["held_out_source"]
    assert split(document_separator="none").held.pieces == split().held.pieces
    # blank_line: every paragraph is a document of its own, sampled by seed
    s = split(document_separator="blank_line", seed=1)
    idx = [int(re.search(r"p(\d+)q", p).group(1)) for p in s.held.pieces]
    assert s.info["method"] == "held-out documents" and idx != list(range(idx[0], idx[0] + 4))
    with pytest.raises(DataError, match="0 top-level '= Title =' heading"):
        split(document_separator="heading")


def test_eval_dataset_evaluates_on_separate_data(tmp_path, wiki):
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"body": f"Unseen qz{100 + i}x ."}) for i in range(5)))
    s = plan_split(DistillConfig(dataset=str(wiki), eval_dataset=str(other)))
    assert s.info["method"] == "separate dataset" and s.info["held_out_source"] == str(other)
    assert marks(s.train.pieces) == set(range(12))  # all of dataset trains
    assert marks(s.held.pieces) == set(range(100, 105))
    with pytest.raises(DataError, match="is the training data itself"):
        plan_split(DistillConfig(dataset=str(wiki), eval_dataset=str(wiki)))
    with pytest.raises(DataError, match="has no named splits"):
        plan_split(DistillConfig(dataset=str(wiki), eval_dataset=str(other), eval_split="x"))
    with pytest.raises(DataError, match="has no named splits"):
        plan_split(DistillConfig(dataset=str(wiki), eval_split="test"))


def _rows(prefix, n):
    return [{"text": f"{prefix} qz{i}x ."} for i in range(n)]


def test_a_saved_datasetdict_uses_its_validation_split_and_says_so(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(_rows("train", 10)),
        validation=datasets.Dataset.from_list(_rows("valid", 3)),
        test=datasets.Dataset.from_list(_rows("test", 2)),
    )
    dd.save_to_disk(tmp_path / "dd")
    s = plan_split(DistillConfig(dataset=str(tmp_path / "dd")))
    assert s.info["method"] == "dataset split"
    assert s.info["held_out_source"].startswith(f"the 'validation' split of {tmp_path / 'dd'}")
    assert "used by default" in s.info["held_out_source"]
    assert all(p.startswith("valid") for p in s.held.pieces) and len(s.held.pieces) == 3
    assert all(p.startswith("train") for p in s.train.pieces) and len(s.train.pieces) == 10
    s = plan_split(DistillConfig(dataset=str(tmp_path / "dd"), eval_split="test"))
    assert all(p.startswith("test") for p in s.held.pieces) and "eval_split" in str(s.info)
    with pytest.raises(DataError, match=r"'dev' is not a split .* \['train', 'validation'"):
        plan_split(DistillConfig(dataset=str(tmp_path / "dd"), eval_split="dev"))


def test_a_folder_of_split_files_uses_its_validation_split(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in _rows("train", 8)))
    (d / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in _rows("valid", 2)))
    s = plan_split(DistillConfig(dataset=str(d)))
    assert s.info["method"] == "dataset split" and "'validation' split" in s.info["held_out_source"]
    assert [p.split()[0] for p in s.held.pieces] == ["valid", "valid"]
    assert {p.split()[0] for p in s.train.pieces} == {"train"}
    # the same folder as eval_dataset of another training set
    other = tmp_path / "train.txt"
    other.write_text(wikitext_sample(3))
    s = plan_split(DistillConfig(dataset=str(other), eval_dataset=str(d)))
    assert s.info["held_out_source"] == f"{d} (split 'validation')"


def test_too_few_training_blocks_fail_in_data_building(tmp_path, tokenizer):
    """Issue 16 item 11: 2 blocks crashed in layer selection ('cannot reshape ...')."""
    path = tmp_path / "small.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i} has a few words ."}) for i in range(4)))
    cfg = DistillConfig(dataset=str(path), max_seq_len=16, per_device_batch_size=1)
    with pytest.raises(DataError, match=r"packs into 2 block\(s\).*need at least 3 \(1 for"):
        build_datasets(cfg, tokenizer)
    cfg = DistillConfig(dataset=str(path), max_seq_len=8, per_device_batch_size=1)
    assert len(build_datasets(cfg, tokenizer)[0]) >= 3  # enough blocks: it builds
    # a student given as a model needs no calibration: 2 blocks train at batch size 1
    cfg = DistillConfig(
        dataset=str(path), max_seq_len=16, per_device_batch_size=1, student_model="/x"
    )
    assert len(build_datasets(cfg, tokenizer)[0]) == 2


def test_setup_fails_early_with_the_data_error(tmp_path, tiny_teacher):
    from kd.train import setup

    path = tmp_path / "small.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i} has a few words ."}) for i in range(4)))
    cfg = tiny_cfg(tiny_teacher, path, max_seq_len=16, per_device_batch_size=1)
    with pytest.raises(DataError, match="packs into 2 block"):
        setup(cfg)


@pytest.mark.slow
def test_every_artifact_says_how_the_split_was_made(tmp_path, tiny_teacher, wiki):
    """before.json, metrics.json, report.json and report.md of a `python -m kd` run."""
    from kd import cli

    cfg = tiny_cfg(tiny_teacher, wiki, eval_fraction=0.25, max_steps=3, max_eval_blocks=2)
    (tmp_path / "job.json").write_text(cfg.model_dump_json())
    out = tmp_path / "run"
    assert cli.main(["--config", str(tmp_path / "job.json"), "--out", str(out)]) == 0
    split = json.loads((out / "before.json").read_text())["split"]
    assert split["method"] == "held-out documents" and split["unit"] == "article"
    assert split["train_documents"] == 9 and split["eval_documents"] == 3
    assert len(split["eval_names"]) == 3 and split["eval_tokens"] > 0
    assert json.loads((out / "metrics.json").read_text())["split"] == split
    assert json.loads((out / "report.json").read_text())["split"] == split
    md = (out / "report.md").read_text()
    assert f"Held-out data: 3 of 12 articles of {wiki}, held out whole" in md
    assert f"{split['eval_tokens']:,} tokens (held-out documents)" in md


def test_eval_dataset_is_held_to_the_servers_source_policy(tmp_path, wiki):
    """eval_dataset is read like dataset, so the service checks it the same way."""
    from serve_app.security import policy_problems
    from serve_app.settings import Settings
    from train_job.cli import preflight

    settings = Settings(allowed_local_roots=[str(wiki.parent)], allow_hub_datasets=False)
    ok = DistillConfig(dataset=str(wiki), eval_dataset=str(wiki.parent / "other.jsonl"))
    assert policy_problems(ok, settings) == []
    for value, words in (
        ("/etc/passwd.txt", "outside the allowed roots"),
        ("someone/dataset", "Hub sources are disabled"),
    ):
        cfg = DistillConfig(dataset=str(wiki), eval_dataset=value)
        assert [(f, words in m) for f, m in policy_problems(cfg, settings)] == [
            ("eval_dataset", True)
        ]
    with pytest.raises(DataError, match="eval_dataset path '/no/such.jsonl' does not exist"):
        preflight(DistillConfig(dataset=str(wiki), eval_dataset="/no/such.jsonl"))


def test_a_hub_dataset_uses_its_validation_split(monkeypatch):
    """The hub branch, with datasets' two hub calls stood in for (no network here)."""
    import datasets

    hub = {
        "train": datasets.Dataset.from_list(_rows("train", 6)),
        "validation": datasets.Dataset.from_list([{"note": f"valid qz{i}x ."} for i in range(2)]),
    }
    calls = []
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name, subset: list(hub))

    def load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return hub[split]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = DistillConfig(dataset="org/corpus", subset="en", eval_text_column="note")
    s = plan_split(cfg)
    assert calls == [("org/corpus", "en", "train"), ("org/corpus", "en", "validation")]
    assert s.info["held_out_source"] == (
        "the 'validation' split of org/corpus (the dataset's own, used by default)"
    )
    assert s.info["train_source"] == "org/corpus (split 'train')"
    assert s.held.pieces == ["valid qz0x .", "valid qz1x ."] and len(s.train.pieces) == 6
    with pytest.raises(DataError, match=r"split: 'dev' is not a split of 'org/corpus'"):
        plan_split(DistillConfig(dataset="org/corpus", split="dev"))
