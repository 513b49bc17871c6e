"""The teacher signal cache on Ray: built once by a Ray Data actor pool, reused by the
next job, whose metrics then show zero teacher forward passes."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from jobs.storage import Storage
from kd import models
from kd.config import DistillConfig
from kd.teacher_signal import build_in_process
from tests.conftest import train_job_command
from train_job import teacher_cache


def _train_job(root: Path, body: dict, job_id: str) -> dict:
    """`python -m train_job` on the session's Ray; returns the job's metrics.json."""
    cfg_file = root / f"{job_id}.json"
    cfg_file.write_text(json.dumps(body))
    cmd, env = train_job_command(cfg_file, job_id, root)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((root / "jobs" / job_id / "artifacts" / "metrics.json").read_text())


@pytest.mark.slow
def test_cache_built_by_actors_once_then_a_second_job_makes_no_teacher_forward(
    ray_cluster, tmp_path, tiny_job
):
    body = tiny_job(max_steps=2, save_every=0, teacher_signal="cache", delta_cos=0.1)
    cfg = DistillConfig.model_validate(body)
    storage = Storage(tmp_path)
    blocks = teacher_cache.training_blocks(cfg)
    first = teacher_cache.prepare(cfg, storage, blocks)
    batches = math.ceil(len(blocks) / cfg.per_device_batch_size)
    assert first["built"] and first["teacher_forwards"] >= batches
    key = first["key"]
    manifest = storage.read_json(f"teacher_signal/{key}/manifest.json")
    assert manifest["fingerprint"]["corpus"] == teacher_cache.blocks_key(blocks)
    assert manifest["bytes_per_token"] >= 64 * 2  # fp16 hidden of the 64-wide teacher
    # what the actors wrote equals the signal computed here, block for block
    stored = teacher_cache.load(storage, key)
    teacher, _ = models.load_model_and_tokenizer(cfg.teacher_model)
    here = build_in_process(models.DistillForward(teacher.eval()), blocks, "exact", 0, 1.0, 4)
    assert stored.arrays["hidden"].dtype == np.float16
    np.testing.assert_allclose(
        stored.arrays["hidden"].astype(np.float32), here.arrays["hidden"].astype(np.float32),
        rtol=2e-3, atol=2e-3,
    )  # fmt: skip
    # a second job with the same teacher and corpus reuses it: no build, no forward
    again = teacher_cache.prepare(cfg, storage, blocks)
    assert again == {"key": key, "built": False, "teacher_forwards": 0, "bytes": first["bytes"]}
    # the whole job (driver, Ray Train worker) on that cache: its metrics say so
    metrics = _train_job(tmp_path, body, "kd-cache-reuse")
    assert metrics["teacher_forwards"] == 0 and metrics["teacher_cache"]["key"] == key
    assert metrics["teacher_cache"]["built"] is False
    assert all(math.isfinite(h["loss"]) for h in metrics["history"])
    # another teacher-side setting is another cache
    topk = cfg.model_copy(update={"teacher_cache_mode": "topk", "delta_cos": 0.0})
    assert teacher_cache.cache_key(topk, "c")[0] != teacher_cache.cache_key(cfg, "c")[0]


def test_auto_runs_live_for_a_single_epoch_and_builds_nothing(tmp_path, tiny_job):
    cfg = DistillConfig.model_validate(tiny_job(teacher_signal="auto", max_steps=2))
    blocks = teacher_cache.training_blocks(cfg)
    assert teacher_cache.epochs(cfg, len(blocks)) <= 1.0
    assert teacher_cache.prepare(cfg, Storage(tmp_path), blocks) is None
    assert not any(tmp_path.iterdir())
    many = cfg.model_copy(update={"max_steps": len(blocks)})  # 4 blocks a step: 4 epochs
    assert teacher_cache.epochs(many, len(blocks)) == pytest.approx(4.0)
