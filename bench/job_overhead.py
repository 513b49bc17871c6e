"""Where a tiny Ray Train job's wall time goes: the suite's unit of cost.

Starts a local Ray (4 CPUs, as the test session does), builds the suite's tiny teacher
and corpus (tests/conftest.py), runs `python -m train_job` on it --jobs times (each a
new Ray job, as every service test's job is), and prints each line of the driver's
output with the seconds since the driver started, then each job's total.

    python bench/job_overhead.py [--steps 4] [--jobs 2]

The milestones to read: the driver connected; "training 1 worker(s)" (the driver built
the TorchTrainer); the TrainController's first line (its process started and imported
the train function's module: torch, transformers, kd); "Setting up process group" (the
training worker's process started likewise); "held-out data" (the worker loaded the
tokenizer, data and teacher); the step reports; "succeeded"; the process exit.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"  # as in the tests
    import conftest as c
    import ray
    from transformers import AutoTokenizer

    from kd.models import local_folder

    tok = AutoTokenizer.from_pretrained(local_folder("embedded:smollm2-135m"))
    work = Path(tempfile.mkdtemp(prefix="llm2slm-overhead-"))
    teacher = c.make_tiny_llama(work / "teacher", tok)
    corpus = c.write_tiny_corpus(work / "docs.jsonl")  # the suite's `corpus` fixture
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    cfg = work / "job.json"
    cfg.write_text(json.dumps(c.tiny_job_body(teacher, corpus, max_steps=args.steps)))
    totals = []
    for k in range(args.jobs):
        cmd, env = c.train_job_command(cfg, f"overhead-{k}", work / "storage")
        t0 = time.time()
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)  # fmt: skip
        for line in p.stdout:
            if "PlacementGroupCleaner" not in line:  # its state-API retries, once a second
                print(f"{time.time() - t0:6.1f}  {line.rstrip()[:160]}", flush=True)
        p.wait()
        totals.append(round(time.time() - t0, 1))
        print(f"job {k}: exit {p.returncode}, {totals[-1]} s for {args.steps} steps", flush=True)
    print(json.dumps({"steps": args.steps, "job_s": totals}))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
