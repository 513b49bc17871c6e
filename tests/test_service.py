"""The service for real: a local Ray cluster, Ray Serve over HTTP, Ray Jobs, Ray Train.

One Ray per test session (see the `ray_cluster` fixture); the Serve app is deployed
once per module. Jobs use tiny models so each takes seconds of training.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from jobs.states import TERMINAL
from tests.conftest import tiny_job_body, train_job_command

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def svc(ray_cluster, tmp_path_factory, tiny_teacher, tokenizer):
    """The app deployed with a storage root, local roots and a short poll interval."""
    from ray import serve

    from serve_app.app import app_builder

    root = tmp_path_factory.mktemp("storage")
    data = tmp_path_factory.mktemp("svcdata")
    docs = [
        {"text": " ".join(f"word{(i * 7 + j) % 23}" for j in range(40 + i % 9))} for i in range(80)
    ]
    (data / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    settings = {
        "storage_root": str(root),
        "allowed_local_roots": [str(data), str(tiny_teacher), str(tiny_teacher.parent)],
        "poll_interval_s": 0.3,
        "max_concurrent_jobs": 1,
        "registry_name": "test-registry",
        "namespace": "llm2slm-test",
        "ray_dashboard_address": ray_cluster["dashboard"],
    }
    serve.run(app_builder(settings), name="llm2slm", route_prefix="/")
    client = httpx.Client(base_url=ray_cluster["http"], timeout=60)
    base_cfg = tiny_job_body(tiny_teacher, data / "docs.jsonl", max_steps=6, max_failures=2)
    yield {"client": client, "root": root, "data": data, "cfg": base_cfg, "settings": settings}
    client.close()


def wait_for(client, job_id, pred, timeout=240.0, every=0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = client.get(f"/status/{job_id}").json()
        if pred(st):
            return st
        time.sleep(every)
    raise AssertionError(f"timed out waiting on {job_id}: last status {st}")


def submit(svc, **overrides) -> str:
    r = svc["client"].post("/distill", json=svc["cfg"] | overrides)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


# The module's one job that trains to the end (a job start costs ~35 s of Ray Train
# processes here): 2 workers, on-policy (lmbda=1), so it carries the multi-worker and
# the rollout facts as well as the API's.
ON_POLICY_2_WORKERS = dict(num_workers=2, lmbda=1.0, prompt_tokens=8, max_new_tokens=8,
                           gen_eval_prompts=2, lm_ce=0.0)  # fmt: skip


@pytest.fixture(scope="module")
def finished_job(svc):
    """A tiny job run to completion through the API, with its timings."""
    c = svc["client"]
    t0 = time.time()
    job_id = submit(svc, **ON_POLICY_2_WORKERS)
    post_s = time.time() - t0
    first = wait_for(c, job_id, lambda s: (s.get("step") or 0) >= 1 or s["state"] in TERMINAL)
    first_step_s = time.time() - t0
    final = wait_for(c, job_id, lambda s: s["state"] in TERMINAL)
    total_s = time.time() - t0
    assert final["state"] == "succeeded", final
    timing = {"post_s": post_s, "first_step_s": first_step_s, "total_s": total_s}
    print(
        f"\n[timing] tiny job: POST answered in {post_s:.2f}s, first step after "
        f"{first_step_s:.1f}s, done after {total_s:.1f}s"
    )
    (svc["root"] / "timing.json").write_text(json.dumps(timing))
    return {"job_id": job_id, "status": final, "first": first, **timing}


def test_tiny_job_status_artifacts_download(svc, finished_job):
    c, job_id = svc["client"], finished_job["job_id"]
    assert finished_job["post_s"] < 10  # POST never trains
    st = finished_job["status"]
    assert st["step"] == 6 and st["summary"]["student_ppl_after"] > 0
    assert st["summary"]["exports"] == {}  # this job turned exports off
    arts = {a["path"]: a["size"] for a in c.get(f"/artifacts/{job_id}").json()["artifacts"]}
    assert {"student/model.safetensors", "student/config.json", "metrics.json"} <= set(arts)
    on_disk = svc["root"] / "jobs" / job_id / "artifacts" / "student" / "config.json"
    r = c.get(f"/download/{job_id}/student/config.json")
    assert r.status_code == 200 and r.content == on_disk.read_bytes()
    assert int(r.headers["content-length"]) == arts["student/config.json"]
    weights = on_disk.parent / "model.safetensors"
    r = c.get(f"/download/{job_id}/student/model.safetensors", headers={"Range": "bytes=10-109"})
    assert r.status_code == 206 and r.content == weights.read_bytes()[10:110]
    assert r.headers["content-range"] == f"bytes 10-109/{weights.stat().st_size}"
    page = c.get("/jobs", params={"limit": 5}).json()
    assert any(j["job_id"] == job_id for j in page["jobs"]) and page["limit"] == 5
    assert c.get("/docs").status_code == 200 and "/distill" in c.get("/openapi.json").text


def test_post_with_an_existing_id_gets_409_and_leaves_its_config(svc):
    """Only a new, failed or cancelled job may be (re)submitted under its id: a queued
    one keeps the config it will run with (test_registry covers running and succeeded)."""
    c = svc["client"]
    job_id = submit(svc, max_steps=100_000, save_every=0)
    config = svc["root"] / "jobs" / job_id / "config.json"
    before = config.read_bytes()
    try:
        r = c.post("/distill", params={"job_id": job_id}, json=svc["cfg"] | {"max_steps": 7})
        assert r.status_code == 409 and "exists and is" in r.json()["detail"], r.text
        assert config.read_bytes() == before
        assert c.get(f"/status/{job_id}").json()["config"]["max_steps"] == 100_000
    finally:
        c.delete(f"/jobs/{job_id}")


def test_the_driver_of_a_cancelled_job_exits_before_training(svc):
    """Regression: a DELETE in the first instant of a job reached Ray while the job's
    entrypoint shell had not started Python yet. Ray's stop signalled the shell and the
    children it had (none), reported STOPPED, and the driver started a moment later ran
    the cancelled 100,000-step job through the rest of the test session. That driver, the
    service's own command for the job, now finds the job cancelled at its first report
    and exits without training."""
    from serve_app.launcher import JobLauncher
    from serve_app.settings import Settings

    c, root = svc["client"], svc["root"]
    job_id = submit(svc, max_steps=100_000, save_every=0)
    assert c.delete(f"/jobs/{job_id}").json()["state"] == "cancelled"
    # the orphan: the entrypoint the service gives Ray for this job, run by hand
    command = JobLauncher(Settings(**svc["settings"])).entrypoint(job_id)
    env = train_job_command(root / "unused.json", job_id, root)[1]
    proc = subprocess.run(command, shell=True, env=env, capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"job {job_id} was cancelled before training started" in out, out[-3000:]
    assert not (root / "ray" / job_id).exists()  # no Ray Train run was started
    assert c.get(f"/status/{job_id}").json()["state"] == "cancelled"


def test_traversal_and_unknown_ids_get_404(svc, finished_job, tmp_path):
    c, job_id = svc["client"], finished_job["job_id"]
    secret = svc["root"] / "jobs" / job_id / "config.json"  # outside artifacts/
    art = svc["root"] / "jobs" / job_id / "artifacts"
    (art / "escape").symlink_to(secret)
    (art / "escape_dir").symlink_to(svc["root"])
    raw_paths = [
        f"/download/{job_id}/../config.json",
        f"/download/{job_id}/%2e%2e/config.json",
        f"/download/{job_id}/%2e%2e%2fconfig.json",
        f"/download/{job_id}/%252e%252e/config.json",
        f"/download/{job_id}//etc/passwd",
        f"/download/{job_id}/%2fetc%2fpasswd",
        f"/download/{job_id}/escape",
        f"/download/{job_id}/escape_dir/registry/state.json",
        f"/download/{job_id}/student/..%2f..%2fconfig.json",
        "/download/..%2f..%2fetc/passwd",
        "/download/no-such-job/metrics.json",
        "/artifacts/no-such-job",
        "/status/no-such-job",
        "/status/..%2fjobs",
        "/artifacts/%2e%2e",
    ]
    # http.client sends the path byte for byte (httpx would resolve "..")
    url = httpx.URL(str(c.base_url))
    for p in raw_paths:
        conn = http.client.HTTPConnection(url.host, url.port, timeout=30)
        conn.request("GET", p)
        r = conn.getresponse()
        body = r.read()
        conn.close()
        assert r.status in (400, 404), (p, r.status, body[:200])
        assert b"root:" not in body and secret.read_bytes() != body
    listed = [a["path"] for a in c.get(f"/artifacts/{job_id}").json()["artifacts"]]
    assert not any(p.startswith("escape") for p in listed)


def test_invalid_bodies_get_422_naming_the_field(svc):
    c = svc["client"]
    cases = {
        "temperature": {"temperature": -1},
        "max_steps": {"max_steps": 10**12},
        "trust_remote_code": {"trust_remote_code": True},
        "colour": {"colour": "red"},
        "teacher_model": {"teacher_model": "/etc/passwd-model"},
    }
    for field, body in cases.items():
        r = c.post("/distill", json=svc["cfg"] | body)
        assert r.status_code == 422, (field, r.text)
        locs = [e["loc"][-1] for e in r.json()["detail"]]
        assert field in locs, (field, r.json())
    r = c.post("/distill", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = c.post("/distill", content=b"x" * 200_000, headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_bearer_token_enforced(ray_cluster, svc):
    from ray import serve

    from serve_app.app import app_builder

    secured = svc["settings"] | {"api_token": "s3cret-token", "registry_name": "test-reg-auth"}
    serve.run(app_builder(secured), name="secured", route_prefix="/secured")
    with httpx.Client(base_url=ray_cluster["http"] + "/secured", timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        for method, path in [
            ("GET", "/jobs"),
            ("GET", "/status/x1"),
            ("POST", "/distill"),
            ("GET", "/artifacts/x1"),
            ("DELETE", "/jobs/x1"),
            ("GET", "/download/x1/a"),
        ]:
            assert c.request(method, path).status_code == 401
            bad = {"Authorization": "Bearer wrong"}
            assert c.request(method, path, headers=bad).status_code == 401
        good = {"Authorization": "Bearer s3cret-token"}
        assert c.get("/jobs", headers=good).status_code == 200
        assert c.get("/status/x1", headers=good).status_code == 404
    serve.delete("secured")


def test_two_workers_both_train_on_policy(svc, finished_job):
    """lmbda=1 with 2 workers through the API: both ranks train on their own blocks,
    every step's batch is written by the student, each rank generates its own
    continuations, and the report has the rollout timing and the generation section."""
    assert finished_job["status"]["state"] == "succeeded"
    artifacts = svc["root"] / "jobs" / finished_job["job_id"] / "artifacts"
    metrics = json.loads((artifacts / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    assert metrics["blocks_seen_by_rank"] == [24, 24]  # 6 steps x 4 blocks on each rank
    (n0, digest0), (n1, digest1) = metrics["rollouts_by_rank"]
    assert n0 == n1 == 6  # one generated micro-batch per step on each rank
    assert digest0 != digest1  # each worker generated its own batch
    last = metrics["history"][-1]
    assert last["on_policy"] == 1.0 and last["rollout_s"] > 0 and last["train_s"] > 0
    rep = json.loads((artifacts / "report.json").read_text())
    assert set(rep["generation_quality"]["rows"]) == {"teacher", "untrained_student", "student"}


def test_submissions_queue_one_at_a_time(svc):
    """max_concurrent_jobs=1: all accepted at once, started in order, all end. Four
    jobs: each is a Ray job submission, a supervisor and a driver (~9 s here)."""
    c = svc["client"]
    missing = svc["data"] / "no-model-here"  # allowed root, fails in the job's preflight
    ids = [submit(svc, teacher_model=str(missing)) for _ in range(4)]
    assert len(set(ids)) == 4
    seen_active = 0
    deadline = time.time() + 300
    while True:
        # One snapshot from one registry call: four /status calls in a row take long
        # enough for one job to end and the next to start between two of them.
        listed = {j["job_id"]: j for j in c.get("/jobs", params={"limit": 200}).json()["jobs"]}
        states = [listed[j] for j in ids]
        active = [s for s in states if s["state"] in ("submitted", "running", "exporting")]
        seen_active = max(seen_active, len(active))
        if all(s["state"] in TERMINAL for s in states):
            break
        assert time.time() < deadline, [s["state"] for s in states]
        time.sleep(0.3)
    assert seen_active <= 1
    assert all(s["state"] == "failed" for s in states)
    assert all("does not exist" in (s["error"] or "") for s in states), states[0]
    finished = [s["updated_at"] for s in states]
    assert finished == sorted(finished)  # started (and so ended) in submission order


def _registry(svc):
    import ray

    return ray.get_actor(svc["settings"]["registry_name"], namespace=svc["settings"]["namespace"])


def test_registry_then_worker_killed_keeps_state_and_resumes(svc):
    """One job, two crashes (one job start instead of two: each costs ~35 s here):
    the registry actor killed mid-job answers again with the job's state, and a
    training worker killed later resumes from the last checkpoint."""
    import ray
    from ray.util.state import list_actors

    from serve_app.launcher import JobLauncher
    from serve_app.settings import Settings

    c = svc["client"]
    job_id = submit(svc, max_steps=30, save_every=5, logging_steps=1)
    wait_for(c, job_id, lambda s: (s.get("step") or 0) >= 1 or s["state"] in TERMINAL)
    ray.kill(_registry(svc), no_restart=False)
    st = wait_for(c, job_id, lambda s: True, timeout=60)  # answers again after the restart
    assert st["job_id"] == job_id and st["state"] not in TERMINAL, st

    wait_for(c, job_id, lambda s: (s.get("step") or 0) >= 7 or s["state"] in TERMINAL)
    driver = JobLauncher(Settings(**svc["settings"])).client().get_job_info(job_id).driver_info
    mine = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    workers = list_actors(filters=[*mine, ("job_id", "=", driver.id)])  # not another job's
    assert workers, "no training worker found"
    killed_at = c.get(f"/status/{job_id}").json()["step"]
    os.kill(int(workers[0]["pid"]), signal.SIGKILL)
    final = wait_for(c, job_id, lambda s: s["state"] in TERMINAL, timeout=300)
    assert final["state"] == "succeeded" and final["step"] == 30, final
    metrics = json.loads(
        (Path(svc["root"]) / "jobs" / job_id / "artifacts" / "metrics.json").read_text()
    )
    assert metrics["steps"] == 30
    resumed = metrics["resumed_from_step"]
    assert resumed is not None and resumed % 5 == 0 and resumed <= killed_at
    lost = killed_at - resumed
    print(f"\n[resume] killed at step {killed_at}, resumed from {resumed}: {lost} steps redone")
    (svc["root"] / "resume.json").write_text(
        json.dumps({"killed_at": killed_at, "resumed_from": resumed})
    )


def test_a_job_started_outside_the_service_registers_itself(ray_cluster, svc, tmp_path):
    """`python -m train_job` against the cluster, without --registry: it finds the
    registry under the name in LLM2SLM_NAMESPACE / LLM2SLM_REGISTRY_NAME, registers and
    reports, and GET /jobs lists it with its state, progress and artifacts. A cancel is
    refused with the reason: this driver is not a Ray job submission."""

    c, job_id = svc["client"], f"by-hand-{uuid.uuid4().hex[:8]}"
    cfg_file = tmp_path / "job.json"
    cfg_file.write_text(json.dumps(svc["cfg"] | {"max_steps": 3}))
    cmd, env = train_job_command(
        cfg_file,
        job_id,
        svc["root"],
        LLM2SLM_NAMESPACE=svc["settings"]["namespace"],
        LLM2SLM_REGISTRY_NAME=svc["settings"]["registry_name"],
    )
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while (r := c.get(f"/status/{job_id}")).status_code == 404:
            assert proc.poll() is None and time.time() < deadline, "never registered"
            time.sleep(0.3)
        assert r.json()["state"] in ("running", "exporting"), r.json()
        r = c.delete(f"/jobs/{job_id}")  # Ray cannot stop a driver it did not start
        assert r.status_code == 409 and "started by hand" in r.json()["detail"], r.text
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out.decode(errors="replace")[-4000:]
    st = c.get(f"/status/{job_id}").json()
    assert st["state"] == "succeeded" and st["step"] == 3, st
    assert st["config"]["max_steps"] == 3 and st["summary"]["student_ppl_after"] > 0
    listed = c.get("/jobs", params={"state": "succeeded", "limit": 200}).json()["jobs"]
    assert job_id in [j["job_id"] for j in listed]
    arts = [a["path"] for a in c.get(f"/artifacts/{job_id}").json()["artifacts"]]
    assert "metrics.json" in arts and "student/model.safetensors" in arts


def test_two_jobs_build_one_cache_then_list_and_delete(ray_cluster, svc, tokenizer):
    """Two jobs that need the same missing corpus cache at once build it once (the
    registry's build lease; the real ingest on Ray Data in both); GET /caches lists it
    with both jobs; DELETE is refused (409) while a job using it is active, then frees
    it. The two jobs register as drivers run by hand would (this test's Ray driver)."""
    import threading

    import ray

    from jobs.storage import Storage
    from kd.config import DistillConfig
    from train_job.cache_guard import CacheGuard
    from train_job.ingest import ingest
    from train_job.registry_client import RegistryClient

    c, reg = svc["client"], _registry(svc)
    storage = Storage(svc["root"])
    body = svc["cfg"] | {"data_pipeline": "ray_data", "max_steps": 2}
    cfg = DistillConfig.model_validate(body)
    jobs = [f"cache-user-{i}-{uuid.uuid4().hex[:6]}" for i in range(2)]
    driver = ray.get_runtime_context().get_job_id()
    for job_id in jobs:  # running, reconciled against this (live) driver
        assert ray.get(reg.register.remote(job_id, body, str(svc["root"]), driver))
    results: dict[str, dict] = {}

    def run(job_id):
        guard = CacheGuard(storage, job_id, RegistryClient(reg, "x/y"), poll_s=0.2)
        results[job_id] = ingest(cfg, storage, tokenizer, guard=guard)

    try:
        threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert set(results) == set(jobs), "a job did not get its corpus"
        key = results[jobs[0]]["key"]
        assert results[jobs[1]]["key"] == key
        assert sorted(r["reused"] for r in results.values()) == [False, True]  # built once
        assert sorted(r["tokenizer_calls"] == 0 for r in results.values()) == [False, True]
        builder = next(j for j, r in results.items() if not r["reused"])

        listed = c.get("/caches").json()
        mine = [x for x in listed["caches"] if x["key"] == key]
        assert len(mine) == 1, listed
        cache = mine[0]
        assert (cache["kind"], cache["complete"], cache["corpus"]) == (
            "corpus", True, body["dataset"])  # fmt: skip
        assert {j["job_id"]: j["built"] for j in cache["jobs"]} == {
            j: j == builder for j in jobs}  # fmt: skip
        assert sorted(cache["in_use_by"]) == sorted(jobs) and cache["building_by"] == []
        on_disk = sum(
            p.stat().st_size for p in (svc["root"] / "corpus" / key).rglob("*") if p.is_file()
        )
        assert cache["bytes"] == on_disk and listed["total_bytes"] >= on_disk

        r = c.delete(f"/caches/corpus/{key}")
        assert r.status_code == 409 and jobs[0] in r.json()["detail"], r.text
        assert (svc["root"] / "corpus" / key / "manifest.json").is_file()
        assert c.delete(f"/caches/corpus/{'0' * 20}").status_code == 404
        assert c.delete(f"/caches/jobs/{key}").status_code == 404  # not a cache kind
    finally:
        for job_id in jobs:
            ray.get(reg.update.remote(job_id, {"state": "succeeded"}))
    r = c.delete(f"/caches/corpus/{key}")
    assert r.status_code == 200 and r.json()["bytes_freed"] == on_disk, r.text
    assert not (svc["root"] / "corpus" / key).exists()
    assert key not in [x["key"] for x in c.get("/caches").json()["caches"]]
