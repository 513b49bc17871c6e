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


def test_on_policy_job_with_two_workers(ray_cluster, tiny_job, tmp_path):
    """lmbda=1 as a Ray Train job with 2 workers: every step's batch is written by the
    student, each rank writes its own (different continuations), and the report has the
    rollout timing and the generation-quality section."""
    import json

    from train_job.cli import build_trainer

    body = tiny_job(
        num_workers=2, lmbda=1.0, max_steps=3, save_every=0, prompt_tokens=8,
        max_new_tokens=8, gen_eval_prompts=2, lm_ce=0.0,
    )  # fmt: skip
    paths = JobPaths(tmp_path, "kd-onpolicy-2w")
    build_trainer(DistillConfig.model_validate(body), paths, None, False).fit()
    metrics = json.loads((paths.artifacts / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    (n0, digest0), (n1, digest1) = metrics["rollouts_by_rank"]
    assert n0 == n1 == 3  # one generated micro-batch per step on each rank
    assert digest0 != digest1  # each worker generated its own batch
    last = metrics["history"][-1]
    assert last["on_policy"] == 1.0 and last["rollout_s"] > 0 and last["train_s"] > 0
    rep = json.loads((paths.artifacts / "report.json").read_text())
    assert set(rep["generation_quality"]["rows"]) == {"teacher", "untrained_student", "student"}
