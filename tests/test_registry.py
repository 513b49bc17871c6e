"""The job registry's state machine, run in this process.

The first tests need no Ray: with `max_concurrent_jobs=0` the registry never calls Ray's
job API. The last ones use the session's Ray and its real job API: a submit slowed down
on the real launcher, and a Ray job that ended without reporting to the registry.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import uuid

from jobs.paths import JobPaths
from jobs.states import ACTIVE, JOB_STATES, RESUBMITTABLE, TERMINAL, TRANSITIONS, can_transition
from serve_app.launcher import JobLauncher
from serve_app.registry import JobRegistry


# ---- the transition table ------------------------------------------------------------
def test_transitions_never_go_backwards_or_leave_a_final_state():
    assert set(TRANSITIONS) == {None, *JOB_STATES}
    reachable = {s for targets in TRANSITIONS.values() for s in targets}
    assert reachable <= set(JOB_STATES)
    for state in ACTIVE:  # the lost-cancel bug: a late submit turned running into submitted
        assert not can_transition(state, "pending")
        assert can_transition(state, "submitted") == (state == "submitted")
    for state in TERMINAL:
        assert not can_transition(state, state)  # a final report is taken once
        for new in JOB_STATES:
            assert can_transition(state, new) == (new == "pending" and state in RESUBMITTABLE)
    assert [s for s in JOB_STATES if can_transition(s, "submitted")] == ["pending", "submitted"]
    assert can_transition("running", "running")  # progress reports carry their state
    assert can_transition(None, "pending") and not can_transition(None, "succeeded")


# ---- the registry without Ray ----------------------------------------------------------
def _registry(tmp_path, **settings) -> JobRegistry:
    return JobRegistry({"storage_root": str(tmp_path), "max_concurrent_jobs": 0} | settings)


def test_update_refuses_changes_outside_the_table(tmp_path):
    async def scenario():
        reg = _registry(tmp_path)
        await reg.create("j1", {"max_steps": 3})
        await reg.update("j1", {"state": "running", "step": 1})
        job = await reg.update("j1", {"state": "submitted", "step": 2})  # out of order
        assert job["state"] == "running" and job["step"] == 1
        await reg.update("j1", {"state": "succeeded", "step": 3})
        await reg.update("j1", {"state": "failed", "error": "late"})
        job = await reg.update("j1", {"step": 99})  # late progress of a finished driver
        assert (job["state"], job["step"], job.get("error")) == ("succeeded", 3, None)
        assert job["finished_at"] >= job["created_at"]
        stored = json.loads((tmp_path / "registry" / "state.json").read_text())["jobs"][0]
        assert (stored["state"], stored["step"]) == ("succeeded", 3)

    asyncio.run(scenario())


def test_create_writes_config_only_for_new_failed_or_cancelled_jobs(tmp_path):
    config_file = tmp_path / "jobs" / "j1" / "config.json"

    async def scenario():
        reg = _registry(tmp_path)
        job, created = await reg.create("j1", {"max_steps": 3})
        assert created and json.loads(config_file.read_text()) == {"max_steps": 3}
        for state in ("pending", "running", "succeeded"):
            if state != "pending":
                await reg.update("j1", {"state": state})
            job, created = await reg.create("j1", {"max_steps": 7})
            assert not created and job["state"] == state, job
            assert json.loads(config_file.read_text()) == {"max_steps": 3}, state
            assert job["config"] == {"max_steps": 3} and job["total_steps"] == 3
        await reg.create("j2", {"max_steps": 3})
        await reg.cancel("j2")
        job, created = await reg.create("j2", {"max_steps": 7})
        assert created and (job["state"], job["attempt"], job["total_steps"]) == ("pending", 1, 7)
        assert json.loads((tmp_path / "jobs" / "j2" / "config.json").read_text())["max_steps"] == 7

    asyncio.run(scenario())


def test_a_new_attempt_starts_without_the_last_attempts_progress(tmp_path):
    """CI saw a resubmitted job read `running` at the killed attempt's step with no
    `resumed_from_step`: the driver marks an attempt running before its worker loads the
    checkpoint, and the record still carried the old attempt's progress."""

    async def scenario():
        reg = _registry(tmp_path)
        await reg.create("j1", {"max_steps": 20})
        await reg.update("j1", {"state": "running", "started_at": 1.0})
        await reg.update("j1", {"step": 8, "eta_s": 3.0, "metrics": {"loss": 2.0}})
        await reg.update("j1", {"state": "failed", "error": "driver ended"})
        job, created = await reg.create("j1", {"max_steps": 20, "save_every": 1})
        assert created and (job["state"], job["attempt"]) == ("pending", 1)
        progress = ("step", "eta_s", "metrics", "resumed_from_step", "started_at", "error")
        assert {k: job.get(k) for k in progress} == dict.fromkeys(progress), job
        job = await reg.update("j1", {"state": "running", "started_at": 2.0})  # the driver
        assert job["step"] is None and job["resumed_from_step"] is None
        job = await reg.update("j1", {"state": "running", "step": 6, "resumed_from_step": 6})
        assert (job["step"], job["resumed_from_step"]) == (6, 6)  # the worker, resumed

    asyncio.run(scenario())


def test_outcome_reads_the_result_from_the_job_files(tmp_path):
    reg = _registry(tmp_path)
    paths = JobPaths(str(tmp_path), "j1")
    job = {"job_id": "j1", "state": "running", "submitted_at": 100.0}
    lost = reg._outcome(job, "SUCCEEDED", "done")
    assert lost["state"] == "failed" and "without reporting a result" in lost["error"]
    paths.storage.write_json(paths.error_key, {"reason": "OldError: before", "time": 50.0})
    assert "OldError" not in reg._outcome(job, "FAILED", "exit 1")["error"]  # an old attempt
    paths.storage.write_json(paths.error_key, {"reason": "ValueError: bad", "time": 150.0})
    failed = reg._outcome(job, "FAILED", "exit 1")
    assert failed == {"state": "failed", "error": "the job driver ended (FAILED): ValueError: bad"}
    _write_result(paths)
    done = reg._outcome(job, "SUCCEEDED", "done")
    assert done["state"] == "succeeded" and done["step"] == 6
    assert done["summary"] == {"steps": 6, "student_ppl_after": 12.5}
    assert [a["path"] for a in done["artifacts"]] == ["metrics.json", "student/config.json"]


def _write_result(paths: JobPaths) -> None:
    """What a finished job leaves in its artifact folder (see kd.pipeline.finalize)."""
    metrics = {"steps": 6, "student_ppl_after": 12.5, "history": [{"step": 6}]}
    paths.storage.write_json(paths.artifact_key("metrics.json"), metrics)
    paths.storage.write_json(paths.artifact_key("student/config.json"), {"model_type": "llama"})


# ---- with the session's Ray ------------------------------------------------------------
class SlowSubmitLauncher(JobLauncher):
    """The real launcher whose submit first waits `delay_s`, as when the job agent of a
    starting cluster answers late (the launcher retries for up to 30 s)."""

    def __init__(self, settings, delay_s: float):
        super().__init__(settings)
        self.delay_s = delay_s
        self.in_flight = threading.Event()
        self.returned = threading.Event()

    def submit(self, job_id: str, submission_id: str) -> None:
        self.in_flight.set()
        time.sleep(self.delay_s)
        try:
            super().submit(job_id, submission_id)
        finally:
            self.returned.set()


async def _until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


def test_cancel_while_the_submit_is_in_flight_stops_the_job(ray_cluster, tmp_path, tiny_job):
    job_id = f"cancel-in-flight-{uuid.uuid4().hex[:8]}"
    settings = {"max_concurrent_jobs": 1, "poll_interval_s": 0.2}
    reg = _registry(tmp_path, ray_dashboard_address=ray_cluster["dashboard"], **settings)
    reg.launcher = launcher = SlowSubmitLauncher(reg.settings, delay_s=3.0)

    async def scenario():
        await reg.create(job_id, tiny_job(max_steps=100_000, save_every=0))
        assert await asyncio.to_thread(launcher.in_flight.wait, 60)
        job = await reg.cancel(job_id)  # the submit is still sleeping
        assert job["state"] == "cancelled"
        # the launcher itself waits up to 30 s for a new cluster's job agent
        assert await asyncio.to_thread(launcher.returned.wait, 240)
        await asyncio.sleep(1.5)  # the registry takes the submit's return, then a few ticks
        return reg.jobs[job_id]

    try:
        job = asyncio.run(scenario())
        assert job["state"] == "cancelled", job
        status = launcher.status(job_id)[0]
        deadline = time.monotonic() + 60
        while status not in ("STOPPED", "FAILED", None):
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
            status = launcher.status(job_id)[0]
    finally:  # on the unfixed registry the job would train on: end it either way
        launcher.stop(job_id)


def test_a_lost_final_report_is_read_from_the_job_files(ray_cluster, tmp_path):
    """A Ray job that succeeded while its own report never reached the registry (a call
    that timed out under load): the registry finds metrics.json and says `succeeded`."""
    job_id = f"lost-report-{uuid.uuid4().hex[:8]}"
    settings = {"max_concurrent_jobs": 1, "poll_interval_s": 0.2}
    reg = _registry(tmp_path, ray_dashboard_address=ray_cluster["dashboard"], **settings)
    client = reg.launcher.client()
    # The job's Ray job, under its submission id: it ends at once and reports nothing.
    deadline = time.monotonic() + 240
    while True:  # a cluster that has just started may have no job agent yet
        try:
            client.submit_job(entrypoint=f"{sys.executable} -c pass", submission_id=job_id)
            break
        except RuntimeError as e:
            assert "No available agent" in str(e) and time.monotonic() < deadline, e
            time.sleep(2.0)
    while str(client.get_job_status(job_id).value) != "SUCCEEDED":
        assert time.monotonic() < deadline, client.get_job_info(job_id)
        time.sleep(0.5)
    _write_result(JobPaths(str(tmp_path), job_id))

    async def scenario():
        await reg.create(job_id, {"max_steps": 6})  # its submit finds the Ray job there
        await _until(lambda: reg.jobs[job_id]["state"] in TERMINAL, 60, "never reconciled")
        return reg.jobs[job_id]

    job = asyncio.run(scenario())
    assert job["state"] == "succeeded", job
    assert job["step"] == 6 and job["summary"]["student_ppl_after"] == 12.5
    assert [a["path"] for a in job["artifacts"]] == ["metrics.json", "student/config.json"]
