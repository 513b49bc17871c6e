"""Preflight's memory plan against the measured peak of real training steps.

Cases, each run in its own process so its memory is its own:
  default   the DistillConfig defaults: embedded SmolLM2-135M teacher, derived
            15-layer student, batch 4 x 256, fused LM head, chunks of 256 tokens
  lora      the same with lora_r=16

For each: the plan (`kd.preflight.preflight`, timed, no weights read); then the models
are loaded through `kd.train.setup` (the derived student's layers given, so the
selection pass is skipped) and
  train  `--steps` optimizer steps of `kd.train.train`, peak over all of them
  eval   `kd.evaluate.compare` on `--eval-blocks` held-out blocks (what before.json
         and metrics.json run), with the optimizer state and last gradients alive
Measured on CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs before each
phase, after malloc_trim hands freed heap back) minus the RSS before the models were
loaded; on GPU: torch.cuda.max_memory_allocated (reset per phase). "held at phase
start" is what the process holds when the phase begins (weights, optimizer state...).

    python bench/preflight.py                      # both cases, 3 steps each
    python bench/preflight.py --cases lora --steps 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# This checkout's kd, not an installed one (the children run this file as a script).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {"default": {}, "lora": {"lora_r": 16}}


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak(device) -> int:
    """Start a phase: returns the memory held now (RSS on CPU) above nothing."""
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return int(torch.cuda.memory_allocated())
    # Hand freed heap memory back first, so the phase's peak is live memory plus what
    # the allocator keeps during the phase itself, not what an earlier phase left.
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS (Linux >= 4.0)
        f.write("5")
    return rss_bytes()


def peak(device, base: int) -> int:
    if device.type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated()) - base
    return rss_bytes("VmHWM") - base


def child(case: str, steps: int, eval_blocks: int, threads: int) -> dict:
    from kd.config import DistillConfig
    from kd.preflight import preflight

    cfg = DistillConfig(
        **CASES[case], max_steps=steps, logging_steps=1, save_every=0, warmup_steps=0
    )
    t0 = time.perf_counter()
    plan = preflight(cfg)
    plan_s = time.perf_counter() - t0
    import torch

    from kd import evaluate, student
    from kd.train import setup, train

    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = cfg.model_copy(update={"use_gpu": device.type == "cuda"})
    if device.type == "cuda":
        plan = preflight(cfg)
    base = int(torch.cuda.memory_allocated()) if device.type == "cuda" else rss_bytes()
    keep = student.uniform_layers(30, plan["student"]["layers"])
    run = setup(cfg, device=device, kept_layers=keep, log_fn=lambda s: None)
    loaded = peak(device, base) if device.type == "cuda" else rss_bytes() - base
    train_start = reset_peak(device) - base
    t1 = time.perf_counter()
    train(run)
    train_s = time.perf_counter() - t1
    train_peak = peak(device, base)
    eval_start = reset_peak(device) - base
    run.student.eval()
    with run.autocast:
        evaluate.compare(
            run.teacher,
            run.student,
            run.eval_data,
            batch_size=cfg.per_device_batch_size,
            max_blocks=eval_blocks,
            device=device,
        )
    eval_peak = peak(device, base)
    return {
        "case": case,
        "device": device.type,
        "plan_seconds": round(plan_s, 2),
        "steps": steps,
        "train_seconds": round(train_s, 1),
        "loaded_bytes": loaded,
        "plan_weights_bytes": plan["bytes"]["teacher_weights"] + plan["bytes"]["student_weights"],
        "plan_train": plan["train_peak_bytes"],
        "measured_train": train_peak,
        "start_train": train_start,
        "plan_eval": plan["eval_peak_bytes"],
        "measured_eval": eval_peak,
        "start_eval": eval_start,
        "plan": plan["bytes"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--eval-blocks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.eval_blocks, args.threads)))
        return 0
    rows = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--child", case, "--steps", str(args.steps)]
        cmd += ["--eval-blocks", str(args.eval_blocks), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mib = 1024**2
    head = f"{'case':8} {'phase':6} {'plan MiB':>9} {'measured MiB':>13} {'plan/measured':>14}"
    print(head + f" {'held at phase start MiB':>24}")
    for r in rows:
        for phase in ("train", "eval"):
            p, m, s = r[f"plan_{phase}"], r[f"measured_{phase}"], r[f"start_{phase}"]
            print(
                f"{r['case']:8} {phase:6} {p / mib:9.0f} {m / mib:13.0f} {p / m:14.2f} "
                f"{s / mib:24.0f}"
            )
        print(
            f"{'':8} weights: plan {r['plan_weights_bytes'] / mib:.0f} MiB, RSS after loading "
            f"{r['loaded_bytes'] / mib:.0f} MiB; preflight {r['plan_seconds']} s; "
            f"{r['steps']} steps in {r['train_seconds']} s on {r['device']}"
        )
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
