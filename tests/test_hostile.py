"""Hostile requests: each gets a 4xx with a clear message, reads nothing outside the
job folder and starts nothing.

Requests go in-process to the real app (`create_api()` with a real Service and a real
registry actor) as raw ASGI messages, so paths reach the app byte for byte, the way a
server hands them over (httpx would resolve '..' before sending). tests/test_service.py
sends the same kind of paths over real HTTP through Ray Serve.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from urllib.parse import unquote

import pytest

pytestmark = pytest.mark.service
TOKEN = "hostile-token-9f8e7d6c5b4a"
AUTH = (b"authorization", f"Bearer {TOKEN}".encode())


async def _call(app, method: str, raw: str, chunks: list[bytes], headers: list) -> tuple:
    path, _, query = raw.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(path),  # what uvicorn puts here
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks or [b""])
    ]
    sent: list[dict] = []

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the client stays connected until the response ends

    async def send(msg):
        sent.append(msg)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


def call(app, method, raw, body=b"", *, chunked=False, auth=True, content_type=True):
    headers = [AUTH] if auth else []
    chunks = [body[i : i + 8192] for i in range(0, len(body), 8192)] if chunked else [body]
    if body and not chunked:
        headers.append((b"content-length", str(len(body)).encode()))
    if content_type:
        headers.append((b"content-type", b"application/json"))
    return asyncio.run(_call(app, method, raw, chunks, headers))


@pytest.fixture(scope="module")
def hostile(ray_cluster, tmp_path_factory, tiny_teacher):
    import ray

    from serve_app import service
    from serve_app.app import create_api
    from serve_app.settings import Settings

    root = tmp_path_factory.mktemp("hostile-storage")
    settings = Settings(
        storage_root=str(root),
        max_concurrent_jobs=0,  # the one job registered below must stay a folder only
        registry_name="hostile-registry",
        namespace="llm2slm-hostile",
        api_token=TOKEN,
        allowed_local_roots=[str(tiny_teacher.parent)],
        ray_dashboard_address=ray_cluster["dashboard"],
    )
    previous = service.current_or_none()
    service.install(service.Service(settings))
    app = create_api()
    status, body = call(app, "POST", "/distill?job_id=victim", b"{}")
    assert status == 202, body
    job = root / "jobs" / "victim"
    art = job / "artifacts"
    (art / "student").mkdir(parents=True)
    (art / "student" / "config.json").write_text('{"ok": true}')
    other = root / "jobs" / "other" / "artifacts"
    other.mkdir(parents=True)
    (other / "secret.txt").write_text("SECRET-OF-ANOTHER-JOB")
    (art / "link_file").symlink_to(job / "config.json")
    (art / "link_other").symlink_to(other / "secret.txt")
    (art / "link_dir").symlink_to(root)
    (art / "link_abs").symlink_to("/etc/passwd")
    registry = ray.get_actor("hostile-registry", namespace="llm2slm-hostile")
    yield {"app": app, "root": root, "registry": registry, "job": job}
    service.install(previous)


def _snapshot(h) -> tuple:
    import ray

    _, total = ray.get(h["registry"].list.remote(0, 1))
    return total, sorted(p.name for p in (h["root"] / "jobs").iterdir())


def test_sanity_a_real_artifact_downloads(hostile):
    status, body = call(hostile["app"], "GET", "/download/victim/student/config.json")
    assert status == 200 and body == b'{"ok": true}'


TRAVERSALS = [
    "/download/victim/../config.json",
    "/download/victim/%2e%2e/config.json",
    "/download/victim/%2e%2e%2fconfig.json",
    "/download/victim/%252e%252e%252fconfig.json",
    "/download/victim/student/..%2f..%2fconfig.json",
    "/download/victim/%2fetc%2fpasswd",
    "/download/victim//etc/passwd",
    "/download/victim/%5c..%5cconfig.json",
    "/download/victim/student%00/config.json",
    "/download/victim/link_file",
    "/download/victim/link_other",
    "/download/victim/link_abs",
    "/download/victim/link_dir/jobs/other/artifacts/secret.txt",
    "/download/victim/" + "a" * 5000,
    "/download/..%2fvictim/config.json",
    "/download/%2e%2e/etc/passwd",
    "/artifacts/..",
    "/artifacts/%2e%2e",
    "/artifacts/..%2f..%2fetc",
    "/artifacts/%252e%252e",
    "/artifacts/%2fetc",
]


@pytest.mark.parametrize("raw", TRAVERSALS)
def test_traversal_is_404_and_reads_nothing(hostile, raw):
    status, body = call(hostile["app"], "GET", raw)
    assert status == 404, (raw, status, body[:200])
    detail = json.loads(body)["detail"]
    assert "no " in detail or "not found" in detail.lower()
    config = (hostile["job"] / "config.json").read_bytes()
    for leaked in (b"root:", b"SECRET-OF-ANOTHER-JOB", config):
        assert leaked not in body


def test_symlinks_are_never_listed(hostile):
    status, body = call(hostile["app"], "GET", "/artifacts/victim")
    listed = [a["path"] for a in json.loads(body)["artifacts"]]
    assert status == 200 and listed == ["student/config.json"]


NAN = b'{"lr": NaN}'
BODIES = {
    "max_steps": {"max_steps": 10**12},
    "per_device_batch_size": {"per_device_batch_size": 10**6},
    "num_workers": {"num_workers": 10**9},
    "seed": {"seed": 10**40},
    "unknown": {"colour": "red"},
    "trust_remote_code": {"trust_remote_code": True},
    "teacher_model": {"teacher_model": "/etc"},
    "student_model": {"student_model": "/root/.cache/some-model"},
    "dataset": {"dataset": "/etc/passwd.txt"},
    "teacher_model~": {"teacher_model": "~root/model"},
    "teacher_model..": {"teacher_model": "../../../../etc/model"},
    "teacher_modelfile": {"teacher_model": "file:///etc/passwd"},
    "teacher_model\\": {"teacher_model": "C:\\models\\x"},
}


def test_hostile_bodies_are_422_naming_the_field(hostile):
    before = _snapshot(hostile)
    app = hostile["app"]
    for name, body in BODIES.items():
        status, out = call(app, "POST", "/distill", json.dumps(body).encode())
        assert status == 422, (name, status, out)
        detail = json.loads(out)["detail"]
        field = name.rstrip("~.\\").removesuffix("file")
        field = "colour" if field == "unknown" else field
        assert any(field in json.dumps(d) for d in detail), (name, detail)
    for raw in (NAN, b'{"temperature": Infinity}', b'{"eval_fraction": -Infinity}'):
        status, out = call(app, "POST", "/distill", raw)
        assert status == 422 and b"finite" in out, (raw, status, out)
    status, out = call(app, "POST", "/distill", json.dumps({"max_steps": 2_000_000}).encode())
    assert status == 422 and b"at most 1000000" in out, out
    assert _snapshot(hostile) == before  # nothing registered, no folder written


def test_oversized_bodies_are_413(hostile):
    before = _snapshot(hostile)
    big = json.dumps({"teacher_model": "x" * 300_000}).encode()
    for chunked in (False, True):  # declared Content-Length, and streamed without one
        status, out = call(hostile["app"], "POST", "/distill", big, chunked=chunked)
        assert status == 413 and b"larger than" in out, (chunked, status, out[:200])
    assert _snapshot(hostile) == before


@pytest.mark.parametrize(
    "method,raw",
    [
        ("POST", "/distill?job_id=..%2fescape"),
        ("POST", "/distill?job_id=" + "a" * 65),
        ("POST", "/distill?job_id=-starts-with-dash"),
        ("POST", "/distill?job_id=a%20b"),
        ("GET", "/status/" + "a" * 65),
        ("GET", "/status/a%20b"),
        ("GET", "/status/%F0%9F%98%80"),
        ("GET", "/status/-x"),
        ("DELETE", "/jobs/a.b"),
        ("GET", "/artifacts/a%00b"),
    ],
)
def test_malformed_job_ids_rejected(hostile, method, raw):
    before = _snapshot(hostile)
    status, out = call(hostile["app"], method, raw, b"{}" if method == "POST" else b"")
    assert status in (404, 422), (raw, status, out)
    assert b"job" in out.lower() or b"not found" in out
    assert _snapshot(hostile) == before


def test_token_required_everywhere_but_healthz(hostile):
    app = hostile["app"]
    assert call(app, "GET", "/healthz", auth=False)[0] == 200
    routes = [
        ("GET", "/jobs"),
        ("GET", "/status/victim"),
        ("POST", "/distill"),
        ("GET", "/artifacts/victim"),
        ("DELETE", "/jobs/victim"),
        ("GET", "/download/victim/student/config.json"),
    ]
    for method, raw in routes:
        status, out = call(app, method, raw, b"{}" if method == "POST" else b"", auth=False)
        assert status == 401 and b"Bearer" in out, (raw, status)
    assert call(app, "GET", "/jobs")[0] == 200


def test_token_compared_in_constant_time():
    import inspect

    from serve_app import security

    assert "hmac.compare_digest" in inspect.getsource(security.check_token)


def test_token_never_logged(ray_cluster, hostile, caplog, tmp_path_factory):
    """A secured Serve deployment: wrong and right tokens, then no log holds either."""
    import logging

    import httpx
    import ray
    from ray import serve

    from serve_app.app import app_builder

    token = "never-log-me-" + os.urandom(8).hex()
    wrong = "wrong-" + os.urandom(8).hex()
    root = tmp_path_factory.mktemp("auth-storage")
    settings = {
        "storage_root": str(root),
        "api_token": token,
        "max_concurrent_jobs": 0,
        "registry_name": "auth-registry",
        "namespace": "llm2slm-auth",
    }
    caplog.set_level(logging.DEBUG)
    serve.run(app_builder(settings), name="authlog", route_prefix="/authlog")
    try:
        with httpx.Client(base_url=ray_cluster["http"] + "/authlog", timeout=30) as c:
            for headers in ({"Authorization": f"Bearer {wrong}"}, {}):
                assert c.get("/jobs", headers=headers).status_code == 401
            good = {"Authorization": f"Bearer {token}"}
            assert c.get("/jobs", headers=good).status_code == 200
            assert c.post("/distill", json={}, headers=good).status_code == 202
            assert c.get("/status/nope", headers=good).status_code == 404
    finally:
        serve.delete("authlog")
    time.sleep(1.0)  # let the log monitors flush
    logs = Path(ray.get_runtime_context().gcs_address and _session_dir()) / "logs"
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert files, logs
    for p in files + [root / "registry" / "state.json"]:
        data = p.read_bytes()
        assert token.encode() not in data and wrong.encode() not in data, p
    assert token not in caplog.text and wrong not in caplog.text


def _session_dir() -> str:
    import ray

    return ray._private.worker._global_node.get_session_dir_path()
