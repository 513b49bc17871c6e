"""The `llm2slm` CLI end to end against a real deployment, and the HTML report page in a
real headless browser.

The app is deployed twice on the session's Ray, sharing one registry and storage: at
/cli with an API token (what the CLI talks to) and at /cli-open without one (Chromium
cannot send an Authorization header). One tiny job runs to completion through
`llm2slm distill --follow`; a second one is cancelled.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from llm2slm.cli import main

pytestmark = pytest.mark.service
TOKEN = "cli-test-token"


def cli(*argv: str) -> tuple[int, str, str]:
    """`llm2slm argv...` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def deployed(ray_cluster, tmp_path_factory, tiny_teacher, corpus):
    from ray import serve

    from serve_app.app import app_builder

    root = tmp_path_factory.mktemp("cli-storage")
    settings = {
        "storage_root": str(root),
        "allowed_local_roots": [str(corpus.parent), str(tiny_teacher)],
        "poll_interval_s": 0.3,
        "max_concurrent_jobs": 2,
        "registry_name": "test-registry-cli",
        "namespace": "llm2slm-test",
        "ray_dashboard_address": ray_cluster["dashboard"],
    }
    serve.run(app_builder(settings | {"api_token": TOKEN}), name="cli", route_prefix="/cli")
    serve.run(app_builder(settings), name="cli-open", route_prefix="/cli-open")
    yield {
        "url": ray_cluster["http"] + "/cli",
        "open_url": ray_cluster["http"] + "/cli-open",
        "root": root,
        "settings": settings,
    }
    serve.delete("cli")
    serve.delete("cli-open")


@pytest.fixture(scope="module")
def followed(deployed, tiny_job, tmp_path_factory):
    """`llm2slm distill --config job.json --max-steps 6 --follow`, URL/token as flags."""
    cfg = tmp_path_factory.mktemp("cli-cfg") / "job.json"
    cfg.write_text(json.dumps(tiny_job(eval_every=2, save_every=0)))
    t0 = time.time()
    rc, out, err = cli(
        "--url", deployed["url"], "--token", TOKEN, "distill", "--config", str(cfg),
        "--max-steps", "6", "--follow", "--every", "0.25",
    )  # fmt: skip
    print(f"\n[timing] llm2slm distill --follow: {time.time() - t0:.1f}s\n{out}{err}")
    assert rc == 0, (out, err)
    job_id = re.search(r"submitted (kd-[0-9a-f]+)", out).group(1)
    return {"job_id": job_id, "out": out}


def test_distill_follow_status_jobs_artifacts(deployed, followed, monkeypatch):
    out, job_id = followed["out"], followed["job_id"]
    # One line per change, in order. Which steps a poll catches depends on timing (the
    # line format is checked on a fixed sequence in test_progress.py): no step is shown
    # twice or goes back, and the last line carries the final report.
    lines = re.findall(rf"^{job_id}\s+(\w+)\s+step (\d+)/6(.*)$", out, re.M)
    seen = [(state, int(step)) for state, step, _ in lines]
    assert seen == sorted(set(seen), key=seen.index) and ("running", 0) in seen, out
    assert [s for s, _ in seen] == sorted(
        (s for s, _ in seen),
        key=["pending", "submitted", "running", "exporting", "succeeded"].index,
    ), out
    assert [n for _, n in seen] == sorted(n for _, n in seen), out
    assert seen[-1] == ("succeeded", 6) and re.search(r"loss \S+\s+\S+ tok/s", lines[-1][2]), out
    assert "held-out perplexity: teacher" in out
    # URL and token from the environment from here on
    monkeypatch.setenv("LLM2SLM_URL", deployed["url"])
    monkeypatch.setenv("LLM2SLM_TOKEN", TOKEN)
    rc, out, _ = cli("status", job_id)
    assert rc == 0 and re.search(rf"{job_id}\s+succeeded\s+step 6/6", out), out
    rc, out, _ = cli("status", job_id, "--json")
    assert rc == 0 and json.loads(out)["summary"]["student_ppl_after"] > 0
    rc, out, _ = cli("jobs")
    assert rc == 0 and job_id in out and "succeeded" in out
    rc, out, _ = cli("artifacts", job_id)
    assert rc == 0
    for path in ("curves.png", "metrics.json", "student/model.safetensors"):
        assert re.search(rf"\d+\s+{re.escape(path)}\n", out), (path, out)
    assert re.search(r"tensorboard/events\.out\.tfevents\.\S+", out), out


def test_download_resumes_with_range(deployed, followed, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM2SLM_URL", deployed["url"])
    monkeypatch.setenv("LLM2SLM_TOKEN", TOKEN)
    job_id = followed["job_id"]
    art = deployed["root"] / "jobs" / job_id / "artifacts"
    weights = (art / "student" / "model.safetensors").read_bytes()
    # An interrupted download left 1000 bytes. They are zeros here, not the real bytes,
    # so the result proves the client appended the rest (Range) instead of starting over.
    part = tmp_path / "one" / "student" / "model.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 1000)
    rc, out, err = cli("download", job_id, "student/model.safetensors", "-o", str(tmp_path / "one"))
    assert rc == 0, err
    got = (tmp_path / "one" / "student" / "model.safetensors").read_bytes()
    assert got == b"\0" * 1000 + weights[1000:] and not part.exists()
    assert "resumed at byte 1,000" in out
    # everything
    rc, out, err = cli("download", job_id, "-o", str(tmp_path / "all"))
    assert rc == 0, err
    listed = [p for p in art.rglob("*") if p.is_file()]
    assert listed and f"{len(listed)} file(s)" in out
    for p in listed:
        assert (tmp_path / "all" / p.relative_to(art)).read_bytes() == p.read_bytes()


def test_errors_are_explained(deployed, followed, monkeypatch):
    monkeypatch.delenv("LLM2SLM_TOKEN", raising=False)
    monkeypatch.setenv("LLM2SLM_URL", deployed["url"])
    rc, _, err = cli("jobs")
    assert rc == 1 and "401" in err and "LLM2SLM_TOKEN" in err
    rc, _, err = cli("--token", "wrong", "jobs")
    assert rc == 1 and "token was rejected" in err
    rc, _, err = cli("--token", TOKEN, "status", "no-such-job")
    assert rc == 1 and "404" in err and "no-such-job" in err
    rc, _, err = cli("--token", TOKEN, "distill", "temperature=-1", "colour=red")
    assert rc == 2 and "422" in err
    assert re.search(r"^  temperature: ", err, re.M) and re.search(r"^  colour: ", err, re.M), err
    rc, out, err = cli("--token", TOKEN, "caches")  # none built on this storage
    assert rc == 0 and "0 cache(s), 0 bytes" in out, (out, err)
    rc, _, err = cli("--token", TOKEN, "caches", "delete", f"corpus/{'0' * 20}")
    assert rc == 1 and "404" in err and f"no cache corpus/{'0' * 20}" in err, err
    with socket_free_port() as port:
        rc, _, err = cli("--url", f"http://127.0.0.1:{port}", "jobs")
    assert rc == 1 and "cannot reach the llm2slm service" in err and "llm2slm serve" in err


@contextlib.contextmanager
def socket_free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port  # closed: nothing listens there


@pytest.fixture(scope="module")
def cancelled(deployed, tiny_teacher, corpus):
    """A long job submitted with flags (no --follow), cancelled once its driver runs
    (`running` is its first report; waiting for a training step as well would add the
    ~30 s of Ray Train start-up to the suite for no other fact)."""
    from llm2slm.client import Llm2SlmClient

    auth = ("--url", deployed["url"], "--token", TOKEN)
    rc, out, err = cli(
        *auth, "distill", "--teacher", str(tiny_teacher), "--dataset", str(corpus),
        "--max-steps", "100000", "max_seq_len=32", "student_layers=2", "save_every=0",
        "export_formats=safetensors", "gen_eval_prompts=4", "max_new_tokens=8",
        "max_eval_blocks=2",
    )  # fmt: skip
    assert rc == 0, err
    job_id = re.search(r"submitted (kd-[0-9a-f]+)", out).group(1)
    with Llm2SlmClient(deployed["url"], TOKEN) as c:
        for st in c.follow(job_id, every=0.3, timeout=180):
            if st.state == "running":
                break
    first = cli(*auth, "cancel", job_id)
    again = cli(*auth, "cancel", job_id)
    return {"job_id": job_id, "first": first, "again": again}


def test_cancel(deployed, cancelled):
    """`llm2slm cancel` stops the Ray job itself, and a second cancel is refused."""
    from ray.job_submission import JobStatus

    from llm2slm.client import Llm2SlmClient
    from serve_app.launcher import JobLauncher
    from serve_app.settings import Settings

    job_id = cancelled["job_id"]
    rc, out, _ = cancelled["first"]
    assert rc == 0 and f"{job_id} cancelled" in out
    rc, _, err = cancelled["again"]
    assert rc == 1 and "409" in err and "already cancelled" in err
    launcher = JobLauncher(Settings(**deployed["settings"]))
    deadline = time.time() + 60
    while launcher.status(job_id)[0] not in (JobStatus.STOPPED.value, JobStatus.FAILED.value):
        assert time.time() < deadline, launcher.status(job_id)
        time.sleep(0.5)
    time.sleep(2)  # a late report from the dying job must not flip the state back
    with Llm2SlmClient(deployed["url"], TOKEN) as c:
        assert c.status(job_id).state == "cancelled"


def _prometheus(url: str) -> str:
    try:
        return httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return ""


def test_registry_exports_job_metrics(ray_cluster, deployed, followed):
    """The gauges reach Ray's Prometheus endpoint (what the dashboard's charts read)."""
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    job_id, text = followed["job_id"], ""
    deadline = time.time() + 60  # Ray exports every few seconds
    while time.time() < deadline:
        text = _prometheus(url)
        if f'job_id="{job_id}"' in text and "ray_llm2slm_jobs" in text:
            break
        time.sleep(2)
    ours = "\n".join(ln for ln in text.splitlines() if "llm2slm" in ln)
    assert re.search(rf'ray_llm2slm_job_loss\{{[^}}]*job_id="{job_id}"', text), ours or text[-500:]
    assert re.search(rf'ray_llm2slm_job_tokens_per_second\{{[^}}]*job_id="{job_id}"', text)
    assert re.search(r'ray_llm2slm_jobs\{[^}]*state="succeeded"[^}]*\} [1-9]', text)


# ---- the report page in a browser ----------------------------------------------------
def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(url: str, out: Path, tmp: Path) -> Path:
    cmd = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--hide-scrollbars", f"--user-data-dir={tmp}",
        f"--screenshot={out}", "--window-size=1100,1400", url,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    return out


def coloured_pixels(png: Path) -> tuple[int, tuple[int, int, int, int] | None]:
    """(count, bounding box) of saturated pixels. The page is greyscale apart from the
    chart, so these are the chart's lines and markers."""
    from PIL import Image

    img = Image.open(png).convert("RGB")
    w = img.width
    boxes = [
        (i % w, i // w)
        for i, (r, g, b) in enumerate(img.getdata())
        if max(r, g, b) - min(r, g, b) > 60
    ]
    if not boxes:
        return 0, None
    xs, ys = [x for x, _ in boxes], [y for _, y in boxes]
    return len(boxes), (min(xs), min(ys), max(xs), max(ys))


# Appended to a saved copy of the page: reports what Chromium laid out for the
# side-by-side table (its box and its rendered text, which skips anything hidden).
PROBE = """<script>
const t = document.getElementById('side-by-side'), r = t && t.getBoundingClientRect();
const p = document.createElement('pre'); p.id = 'probe';
p.textContent = JSON.stringify(t && {w: r.width, h: r.height, text: t.innerText});
document.body.appendChild(p);
</script>"""


def laid_out_samples(html: str, tmp: Path) -> dict | None:
    """Chromium's layout of #side-by-side in this page: {w, h, text} or None."""
    from html import unescape

    page = tmp / "page.html"
    page.write_text(html.replace("</body>", PROBE + "</body>"))
    cmd = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        f"--user-data-dir={tmp / 'probe-profile'}", "--dump-dom", page.as_uri(),
    ]  # fmt: skip
    dom = subprocess.run(cmd, check=True, timeout=120, capture_output=True, text=True).stdout
    return json.loads(unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)))


@pytest.mark.skipif(
    chromium() is None,
    reason="no chromium on PATH: to run this browser test install a headless Chromium, e.g. "
    "`sudo apt-get install chromium` on Debian/Ubuntu (`brew install --cask chromium` on macOS); "
    ".ci/run installs it",
)
def test_report_page_renders_the_chart_in_chromium(deployed, followed, cancelled, tmp_path):
    job_id = followed["job_id"]
    url = f"{deployed['open_url']}/jobs/{job_id}/report"
    page = httpx.get(url, timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert '<img id="curves"' in html and "student after" in html and "max_seq_len" in html
    secured = httpx.get(f"{deployed['url']}/jobs/{job_id}/report", timeout=30)
    assert secured.status_code == 401  # the page is behind the same token as the API

    shot = screenshot(url, tmp_path / "report.png", tmp_path / "profile")
    n, box = coloured_pixels(shot)
    print(f"\n[report] {n} coloured pixels, bounding box {box}")
    shutil.copy(shot, deployed["root"] / "report-screenshot.png")
    assert n > 2000, n  # loss-part lines and the perplexity curve
    left, top, right, bottom = box
    assert right - left > 500 and bottom - top > 150  # spread over both panels

    # Generation quality: the side-by-side greedy continuations are laid out and visible.
    report = json.loads(
        (deployed["root"] / "jobs" / job_id / "artifacts" / "report.json").read_text()
    )
    shown = report["generation_quality"]["side_by_side"]
    box = laid_out_samples(html, tmp_path)
    assert box is not None and box["w"] > 500 and box["h"] > 40, box
    for item in shown:
        for key in ("prompt", "teacher", "untrained_student", "student"):
            words = (item[key] or "(empty)").split()[:3]  # innerText collapses whitespace
            assert " ".join(words) in " ".join(box["text"].split()), (key, item[key])
    assert "untrained student (ceiling)" in box["text"] and len(shown) == 3

    # The cancelled job's page has no chart (no curves.png): no coloured pixels at all.
    no_chart = f"{deployed['open_url']}/jobs/{cancelled['job_id']}/report"
    assert 'id="no-curves"' in httpx.get(no_chart, timeout=30).text
    shot2 = screenshot(no_chart, tmp_path / "no-chart.png", tmp_path / "profile2")
    assert coloured_pixels(shot2)[0] < 50


def test_curves_tensorboard_events(deployed, followed):
    """The job's event file holds every loss part and eval/ppl at the logged steps."""
    from tensorboardX.proto import event_pb2

    tb = deployed["root"] / "jobs" / followed["job_id"] / "artifacts" / "tensorboard"
    (events,) = list(tb.glob("events.out.tfevents.*"))
    tags: dict[str, list[int]] = {}
    data = events.read_bytes()
    i = 0
    while i < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
        (n,) = struct.unpack("<Q", data[i : i + 8])
        ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
        for v in ev.summary.value:
            tags.setdefault(v.tag, []).append(ev.step)
        i += 12 + n + 4
    assert tags["train/loss"] == [1, 2, 3, 4, 5, 6]
    # the default loss: T²·KL ("kd") + CE on the data ("lm")
    assert {"train/kd", "train/lm", "train/lr", "train/tokens_per_s"} <= set(tags)
    assert tags["eval/ppl"] == [2, 4, 6]


@pytest.mark.slow
def test_ray_job_submit_as_llm2slm_serve_prints_it(ray_cluster, tiny_job, tmp_path):
    """The real `ray job submit` CLI, from a shell that has no RAY_AUTH_MODE (the
    session's Ray, like `llm2slm serve`'s, has token authentication on): the bare
    command is refused, the one `llm2slm serve` prints runs a tiny train_job."""
    import os
    import sys

    from serve_app.local import submit_command

    (tmp_path / "job.json").write_text(json.dumps(tiny_job(max_steps=2)))
    storage = tmp_path / "storage"
    shell = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    shell["PATH"] = f"{Path(sys.executable).parent}:{shell.get('PATH', '')}"  # this `ray`
    # Ray 2.60's ray.init of a new local cluster (here and in `llm2slm serve`) turns
    # token authentication on and sets this in its own process, which submit_command reads.
    assert os.environ.get("RAY_AUTH_MODE") == "token"
    command = submit_command(ray_cluster["dashboard"], str(storage), python=sys.executable)
    assert command.startswith("RAY_AUTH_MODE=token ray job submit --address ")

    def run(cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-c", cmd], cwd=tmp_path, env=shell, capture_output=True, text=True,
            timeout=400,
        )  # fmt: skip

    bare = run(command.removeprefix("RAY_AUTH_MODE=token "))
    assert bare.returncode != 0
    assert "Missing authentication token" in bare.stdout + bare.stderr
    done = run(command)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    jobs = list((storage / "jobs").iterdir())
    assert len(jobs) == 1 and (jobs[0] / "artifacts" / "metrics.json").is_file()


def test_resubmit_with_another_model_is_409_and_keeps_the_config(
    deployed, followed, tiny_job, tmp_path, capsys
):
    """Regression (#16.5): resubmitting an id with other layers kept the checkpoint's
    layers; now the API answers 409 before config.json changes, and `python -m train_job`
    with that id exits 2 naming the field (checked against the job's real checkpoint)."""
    from jobs.paths import JobPaths
    from jobs.resume import resume_refused
    from kd.config import DistillConfig
    from train_job.cli import main as train_job_main

    job_id = followed["job_id"]
    paths = JobPaths(str(deployed["root"]), job_id)
    stored = paths.storage.read_bytes(paths.config_key)
    body = tiny_job(eval_every=2, save_every=0, max_steps=6, student_layers=1)
    r = httpx.post(
        f"{deployed['url']}/distill",
        params={"job_id": job_id},
        json=body,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert r.status_code == 409, r.text
    assert paths.storage.read_bytes(paths.config_key) == stored
    changed = DistillConfig(**body).model_dump(mode="json")
    assert resume_refused(paths, changed).startswith("student_layers: cannot resume")
    longer = DistillConfig(**tiny_job(eval_every=2, save_every=0, max_steps=9))
    assert resume_refused(paths, longer.model_dump(mode="json")) is None  # schedule only
    (tmp_path / "job.json").write_text(json.dumps(body))
    argv = ["--config", str(tmp_path / "job.json"), "--job-id", job_id]
    assert train_job_main([*argv, "--storage", str(deployed["root"])]) == 2
    assert "student_layers: 2 -> 1" in capsys.readouterr().err
    assert paths.storage.read_bytes(paths.config_key) == stored
