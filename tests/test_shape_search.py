"""The shape search: trial configs pin each candidate; two candidates run as Tune trials."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

from jobs.paths import JobPaths
from jobs.resume import resume_changes
from kd.report import shape_search_lines
from kd.shapes import Shape, candidate_shapes, requested_shape, shape_params
from serve_app import report_page
from tests.conftest import tiny_cfg
from train_job.registry_client import RegistryClient
from train_job.shape_search import (
    SEARCH_FILE,
    resolve_budget,
    trial_config,
    winner_config,
)


def test_trial_and_winner_configs_pin_the_shape(tiny_teacher, corpus):
    t_cfg = AutoConfig.from_pretrained(tiny_teacher)
    # the tiny model is mostly its 49k-token embedding: few shapes fit a budget
    budget = int(0.88 * shape_params(t_cfg, Shape.of(t_cfg)))
    cfg = tiny_cfg(tiny_teacher, corpus, student_layers=None, student_params=budget)
    shapes = candidate_shapes(t_cfg, budget)
    assert len(shapes) >= 2, shapes
    for s in shapes:
        short = trial_config(cfg, s, steps=3)
        assert short.max_steps == 3 and short.student_params is None
        assert (
            requested_shape(short, t_cfg) is None
            or requested_shape(short, t_cfg).sizes()[1:] == s.sizes()[1:]
        )
        assert short.student_layers == s.layers
        full = winner_config(cfg, s)
        assert full.max_steps == cfg.max_steps and full.student_hidden == s.hidden


@pytest.fixture
def ray_local():
    """A small local Ray whose workers import this checkout (not an installed copy)."""
    import ray

    if ray.is_initialized():  # the session's service cluster, when the suite runs whole
        yield
        return
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


@pytest.mark.service
def test_a_budget_job_runs_its_candidates_as_tune_trials(tmp_path, tiny_teacher, corpus, ray_local):
    """The driver's path: candidates from the budget, one Tune trial each, the winner's
    config for the workers, the record in the artifacts and the phase in the status."""
    import ray

    @ray.remote(num_cpus=0)
    class Status:  # stands in for the registry: keeps what the job reported
        def __init__(self):
            self.updates = []

        def update(self, job_id, fields):
            self.updates.append(fields)

        def get(self):
            return self.updates

    t_cfg = AutoConfig.from_pretrained(tiny_teacher)
    budget = _budget(tiny_teacher, 0.88)
    shapes = candidate_shapes(t_cfg, budget)
    assert len(shapes) >= 2, shapes
    cfg = tiny_cfg(
        tiny_teacher,
        corpus,
        student_layers=None,
        student_params=budget,
        search_steps=2,
        max_eval_blocks=2,
    )
    status = Status.remote()
    paths = JobPaths(tmp_path, "search-job")
    resolved, report = resolve_budget(cfg, paths, RegistryClient(status))
    rows = {r["name"]: r for r in report["candidates"]}
    assert set(rows) == {s.name for s in shapes}
    assert all("error" not in r and r["eval_ppl"] > 1 for r in rows.values()), rows
    assert report["winner"] == min(rows, key=lambda n: rows[n]["eval_ppl"])
    winner = next(s for s in shapes if s.name == report["winner"])
    assert rows[winner.name]["params"] == shape_params(t_cfg, winner)
    assert (resolved.student_layers, resolved.student_hidden) == (winner.layers, winner.hidden)
    assert resolved.student_params is None and resolved.max_steps == cfg.max_steps
    assert Path(report["experiment_path"]).is_dir()
    assert json.loads((paths.artifacts / SEARCH_FILE).read_text())["winner"] == winner.name
    phases = [u["metrics"]["phase"] for u in ray.get(status.get.remote())]
    assert phases == ["shape_search", "training"], phases


def _budget(teacher, share: float) -> int:
    t_cfg = AutoConfig.from_pretrained(teacher)
    return int(share * shape_params(t_cfg, Shape.of(t_cfg)))


def test_a_budget_is_resolved_once_and_kept_on_resume(tmp_path, tiny_teacher, corpus):
    # 90% of the tiny teacher admits exactly one shape: resolved without a trial
    cfg = tiny_cfg(
        tiny_teacher, corpus, student_layers=None, student_params=_budget(tiny_teacher, 0.9)
    )
    paths, registry = JobPaths(tmp_path, "budget-job"), RegistryClient(None)
    resolved, search = resolve_budget(cfg, paths, registry)
    assert search["steps"] == 0 and len(search["candidates"]) == 1
    assert resolved.student_params is None
    shape = Shape(**search["winner_shape"])
    assert (resolved.student_layers, resolved.student_hidden, resolved.student_ffn) == (
        shape.layers,
        shape.hidden,
        shape.ffn,
    )
    stored = paths.artifacts / SEARCH_FILE
    assert stored.is_file()
    # A resumed job keeps the stored winner (its checkpoints have that shape), even
    # where a fresh enumeration would choose differently.
    kept = Shape(2, 56, 64, 4, 2, name="kept")
    record = json.loads(stored.read_text()) | {"winner": "kept", "winner_shape": kept.to_dict()}
    stored.write_text(json.dumps(record))
    again, _ = resolve_budget(cfg, paths, registry)
    assert (again.student_layers, again.student_ffn) == (2, 64)
    # Resubmitting the same budget resumes the searched shape; another budget is refused
    ckpt = paths.storage.local_path("ray/budget-job/checkpoint_2026-11-30_00-00-00.000000")
    ckpt.mkdir(parents=True)
    (ckpt / "distill_config.json").write_text(again.model_dump_json())
    assert resume_changes(paths, cfg.model_dump(mode="json")) == ([], [])
    other = cfg.model_copy(update={"student_params": cfg.student_params - 1000})
    refused, _ = resume_changes(paths, other.model_dump(mode="json"))
    assert any(line.startswith("student_params:") for line in refused), refused
    # no budget, or search_steps 0: the config goes to the workers unchanged
    off = cfg.model_copy(update={"search_steps": 0})
    assert resolve_budget(off, JobPaths(tmp_path, "off"), registry) == (off, None)
    assert "## Shape search" in "\n".join(shape_search_lines(search))


def test_shape_search_lines_mark_the_winner():
    search = {
        "budget": 1000,
        "steps": 5,
        "winner": "b",
        "candidates": [
            {
                "name": "b",
                "shape": Shape(2, 8, 16, 2, 1).to_dict(),
                "params": 990,
                "eval_ppl": 10.0,
                "eval_ppl_before": 50.0,
            },
            {"name": "a", "shape": Shape(4, 4, 8, 2, 1).to_dict(), "params": 1010, "error": "boom"},
        ],
    }
    text = "\n".join(shape_search_lines(search))
    assert "| **b** | 2 | 8 | 16 | 2/1 | 990 | 50 | 10 |" in text, text
    assert "| a | 4 | 4 | 8 | 2/1 | 1,010 | n/a | failed |" in text, text
    page = "".join(report_page._shape_search(search))
    assert "<td>b (winner)</td>" in page and "<td>failed</td>" in page, page
