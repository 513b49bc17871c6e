"""Faults, each injected for real into the running service on the session's Ray.

A worker killed mid-job is tests/test_service.py::test_registry_then_worker_killed_keeps_state_and_resumes.
Here: the job driver killed (then the registry actor killed while the job is failed,
then the job resubmitted under its id, and a cancel racing its checkpoint write), a Serve
replica killed, and a storage write that fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from jobs.states import TERMINAL
from kd.state import FILE as CKPT_FILE
from kd.state import load as load_checkpoint
from tests.conftest import train_job_command

pytestmark = pytest.mark.service
MEASURED: dict[str, object] = {}


@pytest.fixture(scope="module")
def fsvc(ray_cluster, tmp_path_factory, tiny_teacher, corpus, tiny_job):
    from ray import serve

    from serve_app.app import app_builder

    root = tmp_path_factory.mktemp("faults-storage")
    settings = {
        "storage_root": str(root),
        "allowed_local_roots": [str(tiny_teacher.parent), str(corpus.parent)],
        "poll_interval_s": 0.3,
        "max_concurrent_jobs": 1,
        "registry_name": "faults-registry",
        "namespace": "llm2slm-faults",
        "ray_dashboard_address": ray_cluster["dashboard"],
    }
    serve.run(app_builder(settings), name="faults", route_prefix="/faults")
    client = httpx.Client(base_url=ray_cluster["http"] + "/faults", timeout=60)
    cfg = tiny_job(max_steps=24, max_failures=0)
    yield {"client": client, "root": root, "cfg": cfg, "settings": settings}
    client.close()
    serve.delete("faults")
    (tmp_path_factory.getbasetemp() / "faults.json").write_text(json.dumps(MEASURED))


def wait_for(client, job_id, pred, timeout=240.0):
    deadline, st = time.time() + timeout, None
    while time.time() < deadline:
        r = client.get(f"/status/{job_id}")
        if r.status_code == 200:
            st = r.json()
            if pred(st):
                return st
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting on {job_id}: last status {st}")


def registered_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint Ray Train's snapshot lists, each loaded."""
    snap = run_dir / "checkpoint_manager_snapshot.json"
    if not snap.is_file():
        return []
    text = snap.read_text()
    out = []
    for d in sorted(run_dir.glob("checkpoint_2*")):
        if d.name in text:  # registered: Ray resumes only from these
            state = load_checkpoint(d)
            out.append((int(state["step"]), d))
    return sorted(out)


def driver_pid(submission_id: str, settings: dict) -> int:
    from serve_app.launcher import JobLauncher
    from serve_app.settings import Settings

    info = JobLauncher(Settings(**settings)).client().get_job_info(submission_id)
    assert info.driver_info is not None, info
    return int(info.driver_info.pid)


def test_driver_killed_registry_killed_resubmit_resumes_then_cancel_mid_checkpoint(fsvc):
    """One job id, three attempts (a job start costs ~35 s here, so one job carries both
    faults): 0. its driver is SIGKILLed: `failed` with the reason; the registry actor is
    then killed and reloads the same record; 1. resubmitted, it resumes from the newest
    checkpoint written before the kill, now with save_every=1 (a schedule change a
    resume allows), so a checkpoint is being written most of the time; the cancel is
    sent the moment a new checkpoint folder appears, i.e. while Ray copies into it;
    2. resubmitted again, it resumes from the last registered checkpoint (every one
    loads) and finishes."""
    import ray

    c, cfg = fsvc["client"], fsvc["cfg"]
    job_id = "fault-driver"
    run_dir = fsvc["root"] / "ray" / job_id
    assert c.post("/distill", params={"job_id": job_id}, json=cfg).status_code == 202
    st = wait_for(c, job_id, lambda s: (s.get("step") or 0) >= 7 or s["state"] in TERMINAL)
    assert st["state"] == "running", st
    os.kill(driver_pid(job_id, fsvc["settings"]), signal.SIGKILL)
    t_kill = time.time()
    failed = wait_for(c, job_id, lambda s: s["state"] in TERMINAL, timeout=60)
    marked_s = time.time() - t_kill
    assert failed["state"] == "failed" and "driver ended" in failed["error"], failed
    before = registered_checkpoints(run_dir)
    assert before, "no checkpoint was registered before the kill"
    MEASURED["ckpt_bytes"] = (before[-1][1] / CKPT_FILE).stat().st_size

    # The registry actor dies; Ray restarts it and it reloads state.json.
    state_file = fsvc["root"] / "registry" / "state.json"
    on_disk = {j["job_id"]: j for j in json.loads(state_file.read_text())["jobs"]}
    ray.kill(ray.get_actor("faults-registry", namespace="llm2slm-faults"), no_restart=False)
    t_reg = time.time()
    again = wait_for(c, job_id, lambda s: True, timeout=60)
    registry_s = time.time() - t_reg
    assert again["state"] == "failed" and again["error"] == on_disk[job_id]["error"]
    assert again["updated_at"] == on_disk[job_id]["updated_at"]

    # 1. Resubmitted: resumes from the newest checkpoint written before the kill.
    every_step = cfg | {"save_every": 1}
    assert c.post("/distill", params={"job_id": job_id}, json=every_step).status_code == 202
    # A new attempt's record starts with no step (registry._again), so a step past the
    # checkpoint is this attempt's worker's; attempt and state are checked as well.
    st = wait_for(
        c,
        job_id,
        lambda s: (
            (
                s["attempt"] == 1
                and s["state"] == "running"
                and (s.get("step") or 0) >= before[-1][0] + 2
            )
            or s["state"] in TERMINAL
        ),
    )
    assert st["state"] == "running" and st["attempt"] == 1, st
    assert st["resumed_from_step"] == before[-1][0], (st, before)
    MEASURED["driver_kill"] = {
        "killed_at_step": failed["step"],
        "last_checkpoint_step": before[-1][0],
        "resumed_from_step": st["resumed_from_step"],
        "marked_failed_s": round(marked_s, 2),
        "registry_restart_s": round(registry_s, 2),
    }
    print(f"\n[faults] driver kill: {MEASURED['driver_kill']}")

    seen = set(run_dir.glob("checkpoint_2*"))
    deadline = time.time() + 60
    while not (set(run_dir.glob("checkpoint_2*")) - seen):
        assert time.time() < deadline
        time.sleep(0.005)
    assert c.delete(f"/jobs/{job_id}").json()["state"] == "cancelled"
    time.sleep(3)  # the driver and its workers are gone by now
    folders = sorted(run_dir.glob("checkpoint_2*"))
    registered = registered_checkpoints(run_dir)  # every one loads (kd.state.load)
    partial = [d for d in folders if d not in {p for _, p in registered}]
    assert registered[-1][0] > before[-1][0]  # attempt 1 registered checkpoints of its own

    # 2. Resubmitted again: resumes from the last registered checkpoint and finishes.
    assert c.post("/distill", params={"job_id": job_id}, json=every_step).status_code == 202
    final = wait_for(c, job_id, lambda s: s["state"] in TERMINAL, timeout=300)
    assert final["state"] == "succeeded" and final["step"] == cfg["max_steps"], final
    assert final["attempt"] == 2 and final["resumed_from_step"] == registered[-1][0], final
    MEASURED["cancel_mid_write"] = {
        "registered": [s for s, _ in registered],
        "unregistered_folders": len(partial),
        "resumed_from_step": final["resumed_from_step"],
    }
    print(f"\n[faults] cancel during checkpoint: {MEASURED['cancel_mid_write']}")


def test_serve_replica_killed_api_back_no_job_lost(ray_cluster, fsvc):
    from ray.util.state import list_actors

    c = fsvc["client"]
    jobs_before = {j["job_id"]: j["state"] for j in c.get("/jobs").json()["jobs"]}
    assert jobs_before
    replicas = [
        a
        for a in list_actors(
            address=ray_cluster["dashboard"], filters=[("state", "=", "ALIVE")], limit=1000
        )
        if "ServeReplica:faults:" in a["class_name"]
    ]
    assert len(replicas) == 1, [a["class_name"] for a in replicas]
    os.kill(int(replicas[0]["pid"]), signal.SIGKILL)
    t0 = time.time()
    while True:
        try:
            r = c.get("/jobs", timeout=5)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() - t0 < 60, "API did not come back within 60 s"
        time.sleep(0.1)
    back_s = time.time() - t0
    jobs_after = {j["job_id"]: j["state"] for j in r.json()["jobs"]}
    assert jobs_after == jobs_before
    MEASURED["replica_kill_back_s"] = round(back_s, 2)
    print(f"\n[faults] Serve replica killed: API answered again after {back_s:.1f}s")


def _make_storage_fail(root: Path, run_dir: Path, ckpt_bytes: int) -> str:
    """Storage that takes one checkpoint, then refuses the next write.

    As root (the CI container, this sandbox) chmod does not stop writes, so the storage
    is a tmpfs sized for about one and a half checkpoints: a full disk. Otherwise the
    run folder is made read-only once the first checkpoint is there (see the caller).
    """
    if os.geteuid() != 0:
        return "read-only"
    size = int(ckpt_bytes * 1.5) + 4 * 2**20
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(root)])
    if r.returncode != 0:
        pytest.skip("running as root without mount permission: cannot fill a disk")
    return "full-disk"


def test_storage_write_fails_job_fails_with_reason_checkpoint_intact(
    ray_cluster, fsvc, tmp_path, tiny_teacher, corpus
):

    ckpt_bytes = int(MEASURED.get("ckpt_bytes") or 40 * 2**20)
    root = tmp_path / "storage"
    root.mkdir()
    job_id = "fault-storage"
    run_dir = root / "ray" / job_id
    mode = _make_storage_fail(root, run_dir, ckpt_bytes)
    cfg = fsvc["cfg"] | {"save_every": 2, "max_steps": 12}
    cfg_file = tmp_path / "job.json"
    cfg_file.write_text(json.dumps(cfg))
    cmd, env = train_job_command(cfg_file, job_id, root)
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if mode == "read-only":
            deadline = time.time() + 180
            while not list(run_dir.glob(f"checkpoint_2*/{CKPT_FILE}")):
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.05)
            time.sleep(0.5)
            run_dir.chmod(0o555)
        out, _ = proc.communicate(timeout=300)
        run_dir.chmod(0o755)
        text = out.decode(errors="replace")
        assert proc.returncode == 1, text[-4000:]
        line = [ln for ln in text.splitlines() if ln.startswith(f"job {job_id} failed: ")]
        assert line, text[-4000:]  # on a full disk error.json may not fit: stdout has it
        reason = line[-1].split(": ", 1)[1]
        assert "CheckpointWriteError" in reason and "step-4 checkpoint" in reason, reason
        assert "No space left" in reason or "denied" in reason, reason
        intact = registered_checkpoints(run_dir)  # loads each one
        assert intact and intact[0][0] == 2, intact
        MEASURED["storage_fault"] = {"mode": mode, "reason": reason[:300], "intact": intact[0][0]}
        print(f"\n[faults] storage write failed ({mode}): {reason[:300]}")
    finally:
        if mode == "full-disk":
            subprocess.run(["umount", "-l", str(root)])
