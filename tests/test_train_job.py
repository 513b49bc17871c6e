"""train_job pieces that need no cluster: paths, preflight, failure reasons."""

import pytest

from jobs.paths import JobPaths, valid_job_id
from kd.config import DistillConfig
from kd.data import DataError
from kd.models import ModelLoadError
from train_job.cli import _short_reason, preflight


def test_job_ids_are_validated():
    assert valid_job_id("kd-abc_123")
    for bad in ["", "../x", "a/b", "-x", "a" * 65, "x y", "%2e%2e"]:
        assert not valid_job_id(bad)
        with pytest.raises(ValueError, match="invalid"):
            JobPaths("/tmp", bad)


def test_artifact_listing_skips_symlinks_and_temp_files(tmp_path):
    p = JobPaths(tmp_path, "j1")
    (p.artifacts / "student").mkdir(parents=True)
    (p.artifacts / "student" / "model.safetensors").write_bytes(b"123")
    (p.artifacts / "x.tmp").write_text("partial")
    (p.artifacts / "link").symlink_to(tmp_path)
    assert p.list_artifacts() == [{"path": "student/model.safetensors", "size": 3}]


def test_preflight_fails_fast_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="nobody/no-such-model"):
        preflight(DistillConfig(teacher_model="nobody/no-such-model"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        preflight(DistillConfig(teacher_model=str(tmp_path / "missing")))
    with pytest.raises(DataError, match="does not exist"):
        preflight(DistillConfig(dataset=str(tmp_path / "none.jsonl")))
    preflight(DistillConfig())  # the embedded defaults are fine


def test_short_reason_finds_the_root_cause():
    try:
        try:
            raise DataError("dataset path 'x' does not exist")
        except DataError as e:
            raise RuntimeError("training failed") from e
    except RuntimeError as outer:
        assert _short_reason(outer) == "DataError: dataset path 'x' does not exist"
