"""train_job/worker.py without Ray: `ray.train`'s few calls replaced by recorders.

`ray.train.report` is a collective in Train V2: every rank must call it the same number
of times. The worker calls it once per `kd.train.Event` and the schedule lives only in
`kd.train.schedule`, so the reports are exactly the steps that log or save, and a
checkpoint rides on exactly the save steps.
"""

from __future__ import annotations

from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from kd.state import load as load_checkpoint
from kd.train import schedule
from train_job import worker


class _Ctx:
    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1


def test_one_report_per_event_and_a_checkpoint_on_each_save(
    monkeypatch, tmp_path, tiny_job, capsys
):
    reports: list[tuple[dict, int | None]] = []  # (metrics, the checkpoint's step)

    def report(metrics, checkpoint=None):
        step = None
        if checkpoint is not None:
            folder = Path(checkpoint.path)
            assert sorted(p.name for p in folder.iterdir()) == [
                "distill_config.json",
                "state.safetensors",
            ]
            step = load_checkpoint(folder)["step"]
        reports.append((dict(metrics), step))

    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "get_context", lambda: _Ctx())
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda m: m)
    body = tiny_job(max_steps=7, logging_steps=2, save_every=3, student_layers=1)
    loop_config = {"config": body, "storage": str(tmp_path), "job_id": "kd-worker-test"}
    ray_before = ray.is_initialized()  # the session's Ray may run (the full suite)

    worker.train_loop_per_worker(loop_config)

    from kd.config import DistillConfig

    cfg = DistillConfig.model_validate(body)
    due = {s: schedule(cfg, s) for s in range(1, cfg.max_steps + 1)}
    events = [s for s, d in due.items() if d.log or d.save]
    assert events == [2, 3, 4, 6, 7] and len(reports) == len(events)
    saved = [step for _, step in reports if step is not None]
    assert saved == [s for s, d in due.items() if d.save] == [3, 6, 7]
    # a save-only step (3) reports the metrics of the last logging step (2)
    assert [int(m["step"]) for m, _ in reports] == [2, 2, 4, 6, 7]
    artifacts = tmp_path / "jobs" / "kd-worker-test" / "artifacts"
    assert (artifacts / "metrics.json").is_file() and (artifacts / "student").is_dir()
    assert '"final"' in capsys.readouterr().out
    assert ray.is_initialized() == ray_before  # the worker started no Ray of its own
