"""Multi-node on one machine: a Ray head and two worker nodes (ray.cluster_utils.Cluster).

    python scripts/multinode.py --teacher TINY_MODEL_DIR --dataset DOCS.jsonl [--out R.json]

The head has no CPUs, each worker node has one, so a 2-worker job must put one
training worker on each node. Storage is one folder that every node sees (on one
machine a local folder is shared storage). Each scenario is a job, `python -m train_job` as its
own driver on the head (--scenarios picks some):

1. resume: placement is checked while it trains (both worker nodes' CPU in use); once
   a checkpoint exists one worker node is removed, training stalls for lack of a CPU,
   a node is added back and the job resumes from its last checkpoint and completes.
2. exhausted: max_failures=0 and a worker node removed after the first checkpoint:
   the job fails with a reason naming the lost node/worker, and the checkpoint stays.
3. stream: data_pipeline=ray_data. The corpus is tokenized by Ray Data actors on both
   nodes, then each training worker (one per node, holding its node's only CPU)
   streams its own shards, read by Ray Data tasks that need no CPU.
4. cache: teacher_signal=cache. The teacher signal is built by a Ray Data actor pool,
   one actor per node, before the two workers train on it.

Prints (and writes to --out) one JSON object with what happened and how long it took.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

ROOT = Path(__file__).resolve().parents[1]


def job_cmd(cfg: dict, job_id: str, storage: Path, work: Path) -> list[str]:
    cfg_file = work / f"{job_id}.json"
    cfg_file.write_text(json.dumps(cfg))
    return [sys.executable, "-m", "train_job", "--config", str(cfg_file)] + [
        "--job-id",
        job_id,
        "--storage",
        str(storage),
    ]


def checkpoints(storage: Path, job_id: str) -> list[Path]:
    return sorted((storage / "ray" / job_id).glob("checkpoint_2*/state.safetensors"))


def registered(storage: Path, job_id: str) -> list[Path]:
    """Checkpoints Ray Train has registered (listed in its snapshot): only these are
    resumed from. A folder whose files exist may not be registered yet; removing a node
    then restarts from scratch (CI saw resumed_from_step None)."""
    snap = storage / "ray" / job_id / "checkpoint_manager_snapshot.json"
    text = snap.read_text() if snap.is_file() else ""
    return [c for c in checkpoints(storage, job_id) if c.parent.name in text]


def busy_nodes(worker_ids: set[str]) -> set[str]:
    """Worker nodes whose only CPU is taken (by a training worker)."""
    free = ray._private.state.available_resources_per_node()
    return {n for n in worker_ids if free.get(n, {}).get("CPU", 0.0) < 1.0}


def wait(pred, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + timeout
    while not pred():
        if proc.poll() is not None:
            raise RuntimeError(f"job ended (rc {proc.returncode}) while waiting for {what}")
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="llm2slm-multinode-"))
    storage = work / "storage"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    env = os.environ | {
        "RAY_ADDRESS": cluster.address,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    }
    base = dict(
        teacher_model=args.teacher,
        dataset=args.dataset,
        max_seq_len=32,
        per_device_batch_size=2,
        warmup_steps=1,
        logging_steps=1,
        max_eval_blocks=2,
        student_layers=2,
        export_formats=["safetensors"],
        # the report's generation section on 4 prompts x 8 tokens: the defaults (32 x 64)
        # cost ~16 s a job on these models
        gen_eval_prompts=4,
        max_new_tokens=8,
        num_workers=2,
    )
    out: dict = {}
    try:
        if "stream" in args.scenarios:
            out["stream"] = finished(storage, work, env, "mn-stream", base | {
                "max_steps": 6, "save_every": 0, "data_pipeline": "ray_data",
            })  # fmt: skip
        if "cache" in args.scenarios:
            out["cache"] = finished(storage, work, env, "mn-cache", base | {
                "max_steps": 6, "save_every": 0, "teacher_signal": "cache",
            })  # fmt: skip
        if "resume" in args.scenarios:
            out.update(resume(args, cluster, nodes, storage, work, env, base))
        if "exhausted" in args.scenarios:
            out["exhausted"] = exhausted(args, cluster, nodes, storage, work, env, base)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


def metrics(storage: Path, job: str) -> dict:
    """The job's metrics.json ({} when it ended before writing one)."""
    f = storage / "jobs" / job / "artifacts" / "metrics.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def where_ran(before: set[str]) -> dict[str, int]:
    """{actor class or task name: how many nodes it ran on}, for the actors and the
    shard-read tasks not in `before` (ids). The state API keeps the dead ones."""
    nodes: dict[str, set] = {}
    for ident, name, node in _actors_and_reads():
        if ident not in before and node:
            nodes.setdefault(name, set()).add(node)
    return {name: len(ns) for name, ns in sorted(nodes.items())}


def _actors_and_reads() -> list[tuple[str, str, str]]:
    from ray.util.state import list_actors, list_tasks

    kw = {"limit": 10_000, "raise_on_missing_output": False}
    got = [(a.actor_id, a.class_name, a.node_id) for a in list_actors(**kw)]
    reads = [t for t in list_tasks(**kw) if "_read_rows" in t.name]
    return got + [(t.task_id, t.name, t.node_id) for t in reads]


def finished(storage: Path, work: Path, env: dict, job: str, cfg: dict) -> dict:
    """Run a job to its end; on how many nodes each of its actors and shard reads ran,
    and what its metrics say about where its data and teacher signal came from."""
    t0, before = time.time(), {i for i, _, _ in _actors_and_reads()}
    proc = subprocess.Popen(job_cmd(cfg, job, storage, work), env=env, cwd=ROOT)
    rc = proc.wait(timeout=600)
    m = metrics(storage, job)
    cache, ingest = m.get("teacher_cache") or {}, m.get("ingest") or {}
    return {
        "rc": rc,
        "nodes_by_actor_or_task": where_ran(before),
        "steps": m.get("steps"),
        "world_size": m.get("world_size"),
        "blocks_seen_by_rank": m.get("blocks_seen_by_rank"),
        "tokenizer_calls": ingest.get("tokenizer_calls"),
        "cache_built_on_nodes": cache.get("built_on_nodes"),
        "teacher_forwards": m.get("teacher_forwards"),  # the cache build's plus live ones
        "cache_build_forwards": cache.get("teacher_forwards"),
        "wall_s": round(time.time() - t0, 1),
    }


def resume(args, cluster, nodes, storage, work, env, base) -> dict:
    """Placement, node lost, node back, resume, complete."""
    t0 = time.time()
    job = "mn-resume"
    cfg = base | {"max_steps": args.steps, "save_every": 3, "max_failures": 3}
    proc = subprocess.Popen(job_cmd(cfg, job, storage, work), env=env, cwd=ROOT)
    ids = {n.node_id for n in nodes}
    wait(lambda: busy_nodes(ids) == ids, 180, proc, "a worker on each node")
    wait(lambda: registered(storage, job), 180, proc, "a first registered checkpoint")
    cluster.remove_node(nodes[1], allow_graceful=False)
    removed_at = time.time()
    time.sleep(args.gap_s)  # no capacity: the controller waits for a second CPU
    nodes[1] = cluster.add_node(num_cpus=1)
    rc = proc.wait(timeout=600)
    m = metrics(storage, job)
    return {
        "placed_on_both_worker_nodes": True,
        "resume": {
            "rc": rc,
            "steps": m.get("steps"),
            "world_size": m.get("world_size"),
            "resumed_from_step": m.get("resumed_from_step"),
            "node_removed_to_done_s": round(time.time() - removed_at, 1),
            "wall_s": round(time.time() - t0, 1),
        },
    }


def exhausted(args, cluster, nodes, storage, work, env, base) -> dict:
    """The same loss with no retries left: a clear failure, checkpoint kept."""
    t0 = time.time()
    job = "mn-exhausted"
    cfg = base | {"max_steps": args.steps, "save_every": 2, "max_failures": 0}
    proc = subprocess.Popen(job_cmd(cfg, job, storage, work), env=env, cwd=ROOT)
    wait(lambda: checkpoints(storage, job), 180, proc, "a first checkpoint")
    cluster.remove_node(nodes[0], allow_graceful=False)
    rc = proc.wait(timeout=300)
    err = storage / "jobs" / job / "error.json"
    return {
        "rc": rc,
        "reason": json.loads(err.read_text())["reason"] if err.is_file() else None,
        "checkpoints_left": len(checkpoints(storage, job)),
        "wall_s": round(time.time() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="a small local model folder")
    ap.add_argument("--dataset", required=True, help="a local .jsonl/.txt corpus")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--gap-s", type=float, default=3.0, help="seconds with a node missing")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--scenarios",
        type=lambda v: v.split(","),
        default=["stream", "cache", "resume", "exhausted"],
        help="comma-separated, run in this order: stream,cache,resume,exhausted",
    )
    args = ap.parse_args(argv)
    result = run(args)
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
