"""A scaled-down bench/load.py against a Serve deployment while a real job trains."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.service
BENCH = Path(__file__).resolve().parents[1] / "bench" / "load.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_load", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_concurrent_posts_and_polls_lose_nothing(ray_cluster, tmp_path_factory, tiny_teacher):
    import ray
    from ray import serve

    from serve_app.app import app_builder

    bench = _bench()
    root = tmp_path_factory.mktemp("load-storage")
    settings = {
        "storage_root": str(root),
        "allowed_local_roots": [str(tiny_teacher.parent)],
        "max_concurrent_jobs": 1,
        "poll_interval_s": 0.3,
        "registry_name": "load-registry",
        "namespace": "llm2slm-load",
        "ray_dashboard_address": ray_cluster["dashboard"],
    }
    serve.run(app_builder(settings), name="load", route_prefix="/load")
    url = ray_cluster["http"] + "/load"
    body = dict(teacher_model=str(tiny_teacher), max_seq_len=32, per_device_batch_size=2)
    body |= dict(max_eval_blocks=2, export_formats=["safetensors"])
    body |= dict(gen_eval_prompts=4, max_new_tokens=8)  # the defaults cost ~16 s a job
    try:
        t0 = time.time()
        result = asyncio.run(bench.with_training_job(url, body, posts=20, polls=100))
        wall = time.time() - t0
        assert bench.check(result) == [], result
        assert result["trainer_state"] == "running"  # training went on under the load
        assert result["post_ms"]["p99"] < 5000, result["post_ms"]  # never waits on training
        # Restarting the registry under 21 jobs loses none: it reloads state.json.
        registry = ray.get_actor("load-registry", namespace="llm2slm-load")
        ray.kill(registry, no_restart=False)
        time.sleep(0.5)
        jobs, total = ray.get(
            ray.get_actor("load-registry", namespace="llm2slm-load").list.remote(0, 1000)
        )
        assert total == 21 and {j["state"] for j in jobs} == {"cancelled"}
    finally:
        serve.delete("load")
    result.pop("ids")
    print(f"\n[load] {wall:.1f}s {json.dumps(result)}")
    (tmp_path_factory.getbasetemp() / "load.json").write_text(json.dumps(result))
