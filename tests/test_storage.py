"""Storage roots for real: a local folder and S3 on a moto server started here.

The unit tests talk to moto in this process; the end-to-end test runs a tiny job
through the API with its storage root on that S3 server, so the API replica, the
registry actor, the job driver and the training workers all go through it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time

import httpx
import pyarrow.fs as pafs
import pytest
from fastapi import FastAPI, HTTPException, Request

from jobs.states import TERMINAL
from jobs.storage import Storage, StorageError
from kd.state import FILE as CKPT_FILE
from tests.conftest import tiny_cfg

BUCKET = "llm2slm-test"
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_s3():
    """An S3-compatible server (moto) on a free port with one empty bucket."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"127.0.0.1:{port}"
    fs = pafs.S3FileSystem(
        access_key="testing",
        secret_key="testing",
        endpoint_override=endpoint,
        scheme="http",
        region="us-east-1",
        allow_bucket_creation=True,
    )
    fs.create_dir(BUCKET)
    env = CREDS | {"AWS_REGION": "us-east-1", "LLM2SLM_S3_ENDPOINT_URL": f"http://{endpoint}"}
    yield {"env": env, "endpoint": f"http://{endpoint}"}
    server.stop()


@pytest.fixture
def s3_env(moto_s3, monkeypatch):
    """This process's environment pointed at the moto server."""
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in moto_s3["env"].items():
        monkeypatch.setenv(k, v)
    return moto_s3


def test_roots_parse_and_bad_settings_say_what_to_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = Storage("store")
    assert local.is_local and local.root == str(tmp_path / "store")
    assert local.uri("jobs/a/config.json") == str(tmp_path / "store/jobs/a/config.json")
    monkeypatch.delenv("LLM2SLM_S3_ENDPOINT_URL", raising=False)
    s3 = Storage("s3://bucket/some/prefix/")
    assert not s3.is_local and s3.root == "s3://bucket/some/prefix"
    assert s3.uri("jobs/a/config.json") == "s3://bucket/some/prefix/jobs/a/config.json"
    assert s3.ray_storage("ray")[0] == "bucket/some/prefix/ray"  # Ray wants no scheme
    with pytest.raises(StorageError, match="has no local path.*s3://bucket/some/prefix"):
        s3.local_path("jobs")
    with pytest.raises(StorageError, match="names no bucket"):
        Storage("s3://")
    with pytest.raises(StorageError, match=r"shared-filesystem path.*s3://bucket/prefix"):
        Storage("gs://bucket/x")
    monkeypatch.setenv("LLM2SLM_S3_ENDPOINT_URL", "minio:9000")
    with pytest.raises(StorageError, match="LLM2SLM_S3_ENDPOINT_URL='minio:9000'.*http://"):
        Storage("s3://bucket/x")


@pytest.fixture(params=["folder", "s3"])
def store(request, tmp_path) -> Storage:
    if request.param == "folder":
        return Storage(tmp_path / "root")
    request.getfixturevalue("s3_env")
    return Storage(f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}")


def test_files_behave_the_same_on_a_folder_and_on_s3(store, tmp_path):
    assert not store.is_file("jobs/j1/config.json") and store.list_files("jobs/j1") == []
    store.write_json("jobs/j1/config.json", {"max_steps": 3})
    store.write_json("jobs/j1/config.json", {"max_steps": 4})  # replaced
    assert store.read_json("jobs/j1/config.json") == {"max_steps": 4}
    assert store.file_size("jobs/j1/config.json") == len(store.read_bytes("jobs/j1/config.json"))
    assert store.file_size("jobs/j1") is None  # a folder is not a file
    with store.staged("jobs/j1/artifacts") as out:
        (out / "student").mkdir(parents=True)
        (out / "student" / "model.safetensors").write_bytes(bytes(range(256)) * 4)
        (out / "before.json").write_text("{}")
        (out / "half.tmp").write_text("partial")
    with store.staged("jobs/j1/artifacts") as out:  # a later stage sees what is there
        assert (out / "before.json").read_text() == "{}"
        (out / "metrics.json").write_text('{"steps": 4}')
    with pytest.raises(RuntimeError), store.staged("jobs/j1/artifacts") as out:
        (out / "broken.json").write_text("never uploaded on S3")
        raise RuntimeError("export failed")
    listed = store.list_files("jobs/j1/artifacts")
    names = [f["path"] for f in listed]
    assert "half.tmp" not in names
    assert {"before.json", "metrics.json", "student/model.safetensors"} <= set(names)
    assert names == sorted(names)
    assert {"path": "student/model.safetensors", "size": 1024} in listed
    with store.open_input("jobs/j1/artifacts/student/model.safetensors") as f:
        assert f.size() == 1024 and f.read_at(4, 254) == bytes([254, 255, 0, 1])


def test_check_names_the_missing_bucket_or_the_unreachable_endpoint(s3_env, monkeypatch):
    Storage(f"s3://{BUCKET}/x").check()
    with pytest.raises(StorageError, match="bucket 'no-such-bucket'.*does not exist.*endpoint"):
        Storage("s3://no-such-bucket/x").check()
    monkeypatch.setenv("LLM2SLM_S3_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(StorageError, match="cannot reach.*LLM2SLM_S3_ENDPOINT_URL"):
        Storage(f"s3://{BUCKET}/x").check()


def test_registry_state_survives_a_restart_on_s3(s3_env):
    from serve_app.registry import JobRegistry

    settings = {"storage_root": f"s3://{BUCKET}/registry-test"}
    reg = JobRegistry(settings)
    reg.jobs["j1"] = {"job_id": "j1", "state": "pending", "created_at": 1.0, "updated_at": 1.0}
    reg._save()
    stored = Storage(settings["storage_root"]).read_json("registry/state.json")
    assert [j["job_id"] for j in stored["jobs"]] == ["j1"]
    assert JobRegistry(settings).jobs["j1"]["state"] == "pending"  # reloaded by a new actor


def test_s3_downloads_honour_ranges_and_stay_inside_the_artifacts(s3_env):
    from fastapi.testclient import TestClient

    from jobs.paths import JobPaths
    from serve_app.downloads import artifact_response
    from serve_app.security import safe_artifact_key

    paths = JobPaths(f"s3://{BUCKET}/downloads", "j1")
    data = bytes(range(256)) * 8
    paths.storage.write_bytes(paths.artifact_key("student/model.safetensors"), data)
    paths.storage.write_bytes(paths.artifact_key("empty.txt"), b"")
    paths.storage.write_bytes(paths.artifact_key("x.tmp"), b"partial")
    paths.storage.write_json(paths.config_key, {"secret": 1})  # outside artifacts/
    api = FastAPI()

    @api.get("/d/{rel:path}")
    async def d(rel: str, request: Request):
        return await artifact_response(paths, rel, request.headers.get("range"))

    c = TestClient(api)
    r = c.get("/d/student/model.safetensors")
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-length"] == str(len(data)) and r.headers["accept-ranges"] == "bytes"
    assert 'filename="model.safetensors"' in r.headers["content-disposition"]
    for header, first, last in [
        ("bytes=10-109", 10, 109),
        ("bytes=2000-", 2000, 2047),
        ("bytes=-5", 2043, 2047),
        ("bytes=2040-9999", 2040, 2047),
    ]:
        r = c.get("/d/student/model.safetensors", headers={"Range": header})
        assert r.status_code == 206, header
        assert r.content == data[first : last + 1], header
        assert r.headers["content-range"] == f"bytes {first}-{last}/{len(data)}", header
    r = c.get("/d/student/model.safetensors", headers={"Range": "bytes=5000-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
    r = c.get("/d/student/model.safetensors", headers={"Range": "bytes=0-1,5-6"})
    assert r.status_code == 200 and r.content == data  # several ranges: whole file
    r = c.get("/d/empty.txt")
    assert r.status_code == 200 and r.content == b""
    # httpx would normalise '..' in a URL, so the containment checks are called directly
    for rel in [
        "../config.json",
        "student/../../config.json",
        "./empty.txt",
        "/etc/passwd",
        "x.tmp",
        "student",
        "missing",
        "student\\model.safetensors",
        "a\x00b",
        "",
    ]:
        with pytest.raises(HTTPException) as err:
            safe_artifact_key(paths, rel)
        assert err.value.status_code == 404, rel
    assert safe_artifact_key(paths, "empty.txt") == (paths.artifact_key("empty.txt"), 0)


def _run_to_the_end(c: httpx.Client, body: dict, timeout: float = 300) -> dict:
    r = c.post("/distill", json=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    deadline = time.time() + timeout
    while (st := c.get(f"/status/{job_id}").json())["state"] not in TERMINAL:
        assert time.time() < deadline, st
        time.sleep(0.5)
    return st


@pytest.mark.service
def test_job_through_the_api_on_s3(ray_cluster, s3_env, tiny_teacher, corpus):
    """A tiny job whose config, checkpoints, artifacts and registry all live on S3."""
    import ray
    from ray import serve

    from serve_app.app import Llm2SlmAPI
    from serve_app.settings import Settings

    root = f"s3://{BUCKET}/e2e"
    env = s3_env["env"]
    settings = Settings(
        storage_root=root,
        allowed_local_roots=[str(corpus.parent), str(tiny_teacher)],
        poll_interval_s=0.3,
        registry_name="s3-registry",
        namespace="llm2slm-test-s3",
        ray_dashboard_address=ray_cluster["dashboard"],
        job_env=env,  # the job's driver and workers; here via runtime_env, in k8s the pods'
    )
    # The replica (and the registry actor it creates) gets the S3 settings the same way.
    opts = {"num_cpus": 0, "runtime_env": {"env_vars": env}}
    app = Llm2SlmAPI.options(ray_actor_options=opts).bind(settings.model_dump(mode="json"))
    serve.run(app, name="s3", route_prefix="/s3")
    try:
        cfg = tiny_cfg(tiny_teacher, corpus, max_steps=4, save_every=2, max_eval_blocks=2)
        t0 = time.time()
        with httpx.Client(base_url=ray_cluster["http"] + "/s3", timeout=60) as c:
            st = _run_to_the_end(c, cfg.model_dump(mode="json"))
            job_id = st["job_id"]
            print(f"\n[timing] tiny job on S3: done after {time.time() - t0:.1f}s")
            if st["state"] != "succeeded":
                from ray.job_submission import JobSubmissionClient

                n = st.get("attempt") or 0
                sub = job_id if n == 0 else f"{job_id}--retry{n}"
                try:
                    logs = JobSubmissionClient(ray_cluster["dashboard"]).get_job_logs(sub)
                except RuntimeError as e:
                    logs = f"(no logs: {e})"
                pytest.fail(f"job {job_id} {st['state']}: {st.get('error')}\n{logs[-6000:]}")
            assert st["step"] == 4

            store = Storage(root)
            assert store.read_json(f"jobs/{job_id}/config.json")["max_steps"] == 4
            registry = store.read_json("registry/state.json")
            assert any(
                j["job_id"] == job_id and j["state"] == "succeeded" for j in registry["jobs"]
            )
            ckpts = [f["path"] for f in store.list_files(f"ray/{job_id}")]
            states = [
                p for p in ckpts if p.startswith("checkpoint_") and p.endswith(f"/{CKPT_FILE}")
            ]
            assert len(states) == 2, ckpts  # steps 2 and 4 (num_to_keep=2)

            on_s3 = store.list_files(f"jobs/{job_id}/artifacts")
            listed = c.get(f"/artifacts/{job_id}").json()["artifacts"]
            assert listed == on_s3
            names = {a["path"] for a in listed}
            assert {
                "before.json",
                "metrics.json",
                "report.json",
                "student/model.safetensors",
            } <= names
            metrics = json.loads(c.get(f"/download/{job_id}/metrics.json").content)
            assert metrics["steps"] == 4 and metrics["student_ppl_after"] > 0
            weights = store.read_bytes(f"jobs/{job_id}/artifacts/student/model.safetensors")
            r = c.get(f"/download/{job_id}/student/model.safetensors")
            assert r.status_code == 200 and r.content == weights
            r = c.get(
                f"/download/{job_id}/student/model.safetensors", headers={"Range": "bytes=10-109"}
            )
            assert r.status_code == 206 and r.content == weights[10:110]
            assert c.get(f"/download/{job_id}/config.json").status_code == 404  # not an artifact
            page = c.get(f"/jobs/{job_id}/report")  # report.json and curves.png from S3
            assert page.status_code == 200 and 'id="curves"' in page.text
            assert "Quality (held-out)" in page.text
    finally:
        serve.delete("s3")
        with contextlib.suppress(ValueError):  # never created when serve.run failed
            ray.kill(ray.get_actor("s3-registry", namespace="llm2slm-test-s3"))
