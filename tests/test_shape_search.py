"""The shape search: trial configs pin each candidate; two candidates run as Tune trials."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

from kd.shapes import Shape, candidate_shapes, requested_shape, shape_params
from tests.conftest import tiny_cfg
from train_job.shape_search import search_shapes, trial_config, winner_config


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
def test_two_candidates_run_as_tune_trials(tmp_path, tiny_teacher, corpus, ray_local):
    t_cfg = AutoConfig.from_pretrained(tiny_teacher)
    shapes = [
        Shape(2, 64, 128, 4, 2, name="depth"),
        Shape(4, 32, 64, 2, 1, name="width_all"),
    ]
    cfg = tiny_cfg(tiny_teacher, corpus, student_layers=None, max_eval_blocks=2)
    report = search_shapes(
        cfg, steps=2, shapes=shapes, storage_path=str(tmp_path), name="search", max_concurrent=2
    )
    rows = {r["name"]: r for r in report["candidates"]}
    assert set(rows) == {"depth", "width_all"}
    assert all("error" not in r and r["eval_ppl"] > 1 for r in rows.values()), rows
    assert report["winner"] == min(rows, key=lambda n: rows[n]["eval_ppl"])
    assert rows["width_all"]["params"] == shape_params(t_cfg, shapes[1])
    assert Path(report["experiment_path"]).is_dir()
