"""scripts/multinode.py in a subprocess: it starts its own three-node Ray cluster, which
must not meet the test session's Ray (see that script for its four scenarios)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.service
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "multinode.py"


def test_two_nodes_stream_cache_placement_node_loss_resume_and_exhaustion(
    tiny_teacher, corpus, tmp_path
):
    out = tmp_path / "multinode.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    cmd = [sys.executable, str(SCRIPT), "--teacher", str(tiny_teacher)]
    cmd += ["--dataset", str(corpus), "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=840)
    assert r.returncode == 0 and out.is_file(), (r.stdout[-3000:], r.stderr[-6000:])
    res = json.loads(out.read_text())
    print(f"\n[multinode] {json.dumps(res)}")
    # Each worker node has one CPU and a training worker takes it: the shard reads that
    # feed them need none (with any, the stream job hung at its first batch).
    stream, cache = res["stream"], res["cache"]
    for job in (stream, cache):
        assert job["rc"] == 0 and job["steps"] == 6 and job["world_size"] == 2, res
        assert job["nodes_by_actor_or_task"]["RayTrainWorker"] == 2, res
    assert stream["tokenizer_calls"] > 0 and stream["blocks_seen_by_rank"] == [12, 12], res
    # (where the shard reads ran is recorded, not asserted: task events reach the state
    # API asynchronously, and [12, 12] blocks by rank already prove the stream)
    # the teacher signal: one actor per node (each takes its node's CPU), then training
    assert cache["nodes_by_actor_or_task"]["MapWorker(MapBatches(SignalActor))"] == 2, res
    assert cache["cache_built_on_nodes"] >= 1, res
    assert cache["teacher_forwards"] == cache["cache_build_forwards"] > 0, res  # none live
    assert res["placed_on_both_worker_nodes"]
    resume = res["resume"]
    assert resume["rc"] == 0 and resume["steps"] == 12 and resume["world_size"] == 2, res
    assert resume["resumed_from_step"] and resume["resumed_from_step"] % 3 == 0, res
    exhausted = res["exhausted"]
    assert exhausted["rc"] == 1 and exhausted["checkpoints_left"] >= 1, res
    reason = exhausted["reason"] or ""
    assert any(w in reason.lower() for w in ("died", "node", "worker", "unexpectedly")), reason
