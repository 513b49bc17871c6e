"""Bounded load on the API: concurrent POST /distill plus status polls, while a job trains.

    python bench/load.py                       # local Ray + Serve, 50 POSTs, 500 polls
    python bench/load.py --posts 20 --polls 100
    python bench/load.py --url http://host:8000 --token T --body job.json

With no --url it starts a local Ray with Serve, deploys the app with
max_concurrent_jobs=1, starts one real training job on a tiny model and waits until it
trains; then it fires the POSTs all at once and the polls 50 at a time. The queued
jobs never start (they are cancelled before the training job is), so the numbers are
the API's own: POST must answer without waiting on training or on Ray's job API.

Checks: every POST got a distinct job id, every id is listed by /jobs exactly once
(nothing lost or duplicated), and the total grew by exactly the number of POSTs.
Prints one JSON line with p50/p99/max latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def _list_all(c: httpx.AsyncClient) -> list[str]:
    ids, offset = [], 0
    while True:
        page = (await c.get("/jobs", params={"offset": offset, "limit": 200})).json()
        ids += [j["job_id"] for j in page["jobs"]]
        offset += 200
        if offset >= page["total"]:
            return ids


async def run_load(
    url: str, body: dict, posts: int, polls: int, headers: dict | None = None, conc: int = 50
) -> dict:
    """Fire `posts` POSTs at once, then `polls` status reads `conc` at a time."""
    limits = httpx.Limits(max_connections=conc + 10)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as c:
        before = await _list_all(c)

        async def post() -> tuple[float, str]:
            t = time.perf_counter()
            r = await c.post("/distill", json=body)
            assert r.status_code == 202, r.text
            return time.perf_counter() - t, r.json()["job_id"]

        t0 = time.perf_counter()
        done = await asyncio.gather(*(post() for _ in range(posts)))
        post_wall = time.perf_counter() - t0
        post_s = [d for d, _ in done]
        ids = [j for _, j in done]
        sem = asyncio.Semaphore(conc)

        async def poll(i: int) -> float:
            async with sem:
                t = time.perf_counter()
                r = await c.get(f"/status/{ids[i % len(ids)]}")
                assert r.status_code == 200, r.text
                return time.perf_counter() - t

        t0 = time.perf_counter()
        poll_s = await asyncio.gather(*(poll(i) for i in range(polls)))
        poll_wall = time.perf_counter() - t0
        after = await _list_all(c)
    listed = [j for j in after if j in set(ids)]
    ms = 1000.0
    return {
        "posts": posts,
        "polls": polls,
        "distinct_ids": len(set(ids)),
        "listed_once": len(listed) == len(set(listed)) == len(ids),
        "lost": sorted(set(ids) - set(after)),
        "total_grew_by": len(after) - len(before),
        "post_ms": {
            "p50": round(pct(post_s, 0.5) * ms, 1),
            "p99": round(pct(post_s, 0.99) * ms, 1),
            "max": round(max(post_s) * ms, 1),
            "mean": round(statistics.mean(post_s) * ms, 1),
        },
        "poll_ms": {
            "p50": round(pct(poll_s, 0.5) * ms, 1),
            "p99": round(pct(poll_s, 0.99) * ms, 1),
            "max": round(max(poll_s) * ms, 1),
        },
        "post_wall_s": round(post_wall, 2),
        "polls_per_s": round(polls / poll_wall, 1),
        "ids": ids,
    }


def check(result: dict) -> list[str]:
    """Every way the run broke the promise: no job lost or duplicated."""
    problems = []
    if result["distinct_ids"] != result["posts"]:
        problems.append(f"{result['posts'] - result['distinct_ids']} duplicated job ids")
    if result["lost"]:
        problems.append(f"lost jobs: {result['lost']}")
    if not result["listed_once"] or result["total_grew_by"] != result["posts"]:
        problems.append(f"/jobs grew by {result['total_grew_by']}, not {result['posts']}")
    return problems


def _tiny_teacher(folder: Path) -> Path:
    """A 2-layer Llama with the embedded SmolLM2 tokenizer (no download)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kd.models import local_folder

    tok = AutoTokenizer.from_pretrained(local_folder("embedded:smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _local(args) -> dict:
    import ray
    from ray import serve

    from serve_app.app import app_builder

    work = Path(tempfile.mkdtemp(prefix="llm2slm-load-"))
    teacher = _tiny_teacher(work / "teacher")
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")  # busy 2 cores
    ray.init(num_cpus=4, include_dashboard=True, dashboard_port=8275, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    settings = {
        "storage_root": str(work / "storage"),
        "allowed_local_roots": [str(work)],
        "max_concurrent_jobs": 1,
        "poll_interval_s": 0.3,
        "ray_dashboard_address": "http://127.0.0.1:8275",
        "job_env": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"},
    }
    serve.run(app_builder(settings), name="llm2slm", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    body = dict(teacher_model=str(teacher), max_seq_len=32, per_device_batch_size=2)
    body |= dict(max_eval_blocks=2, export_onnx=False, post_training_quant=False)
    result = asyncio.run(with_training_job(url, body, args.posts, args.polls))
    serve.shutdown()
    ray.shutdown()
    return result


async def with_training_job(url: str, body: dict, posts: int, polls: int, headers=None):
    """One long job trains while the load runs; everything is cancelled afterwards."""
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as c:
        r = await c.post("/distill", json=body | {"max_steps": 100_000, "save_every": 0})
        trainer = r.json()["job_id"]
        deadline = time.time() + 300
        while True:
            st = (await c.get(f"/status/{trainer}")).json()
            if (st.get("step") or 0) >= 1:
                break
            assert st["state"] not in ("failed", "cancelled") and time.time() < deadline, st
            await asyncio.sleep(0.3)
        step0 = st["step"]
        result = await run_load(url, body | {"max_steps": 10}, posts, polls, headers)
        st = (await c.get(f"/status/{trainer}")).json()
        result["trainer_steps_during_load"] = (st.get("step") or 0) - step0
        result["trainer_state"] = st["state"]
        for job_id in result["ids"] + [trainer]:  # the queued ones first: none may start
            await c.delete(f"/jobs/{job_id}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None, help="a running deployment; default: start one")
    ap.add_argument("--token", default=None)
    ap.add_argument("--body", default=None, help="JSON file with the DistillConfig to POST")
    ap.add_argument("--posts", type=int, default=50)
    ap.add_argument("--polls", type=int, default=500)
    ap.add_argument("--port", type=int, default=8123)
    args = ap.parse_args(argv)
    if args.url:
        headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
        body = json.loads(Path(args.body).read_text()) if args.body else {}
        result = asyncio.run(run_load(args.url, body, args.posts, args.polls, headers))
    else:
        result = _local(args)
    problems = check(result)
    result.pop("ids")
    print(json.dumps(result | {"problems": problems}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
