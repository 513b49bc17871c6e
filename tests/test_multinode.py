"""scripts/multinode.py in a subprocess: it starts its own three-node Ray cluster, which
must not meet the test session's Ray (see that script for the two scenarios)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.service
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "multinode.py"


def test_two_nodes_placement_node_loss_resume_and_exhaustion(tiny_teacher, corpus, tmp_path):
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
    assert res["placed_on_both_worker_nodes"]
    resume = res["resume"]
    assert resume["rc"] == 0 and resume["steps"] == 12 and resume["world_size"] == 2, res
    assert resume["resumed_from_step"] and resume["resumed_from_step"] % 3 == 0, res
    exhausted = res["exhausted"]
    assert exhausted["rc"] == 1 and exhausted["checkpoints_left"] >= 1, res
    reason = exhausted["reason"] or ""
    assert any(w in reason.lower() for w in ("died", "node", "worker", "unexpectedly")), reason
