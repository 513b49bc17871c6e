"""`python -m kd`: one distillation in this process, no Ray.

    python -m kd --out runs/default                       # the embedded defaults
    python -m kd --config job.json --out runs/x max_steps=100 temperature=4

Prints held-out perplexity of the teacher and of the student before and after
training, and writes the student (safetensors, tokenizer, resolved config), a
`metrics.json` and a resumable `checkpoint/` to the output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from kd import evaluate
from kd.config import load_config
from kd.export import save_student, write_json
from kd.train import Run, load_state_dict, setup, state_dict, train

CKPT = "checkpoint"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m kd", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="", help="JSON file with a DistillConfig")
    ap.add_argument("--out", default="runs/default", help="output folder")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    ap.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model repos that ship their own code (off by default)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    return ap.parse_args(argv)


def save_checkpoint(run: Run, out: Path) -> None:
    """Atomic: write to a temp file, then rename over the previous checkpoint."""
    folder = out / CKPT
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "state.pt.tmp"
    torch.save(state_dict(run), tmp)
    tmp.replace(folder / "state.pt")
    write_json(folder / "distill_config.json", run.cfg.model_dump(mode="json"))


def _fmt(metrics: dict[str, float]) -> str:
    keys = ["step", "loss", "kd", "ce", "mse", "cos", "attn", "lr", "grad_norm", "tokens_per_s"]
    parts = []
    for k in keys + [k for k in metrics if k not in keys and k != "epoch"]:
        if k in metrics:
            v = metrics[k]
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config, args.overrides)
    except Exception as e:  # pydantic lists every problem with its field
        print(f"invalid config: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt_path = out / CKPT / "state.pt"
    resume = args.resume and ckpt_path.is_file()
    state = torch.load(ckpt_path, weights_only=False) if resume else None
    run = setup(
        cfg,
        trust_remote_code=args.trust_remote_code,
        log_fn=print,
        kept_layers=state["kept_layers"] if state else None,
    )
    print(
        f"data: {len(run.train_data)} training blocks, {len(run.eval_data)} held-out blocks "
        f"of {cfg.max_seq_len} tokens"
    )
    kwargs = dict(batch_size=cfg.per_device_batch_size, max_blocks=cfg.max_eval_blocks)
    before = evaluate.compare(run.teacher, run.student, run.eval_data, **kwargs)
    print(
        f"held-out perplexity: teacher {before['teacher_ppl']:.2f}, "
        f"student before training {before['student_ppl']:.2f}"
    )
    if state is not None:
        load_state_dict(run, state)
        print(f"resumed from {ckpt_path} at step {run.step}")
    t_train = time.perf_counter()
    history: list[dict[str, float]] = []

    def report(m: dict[str, float]) -> None:
        history.append(dict(m))
        print(f"[train] {_fmt(m)}", flush=True)

    train(run, report=report, checkpoint=lambda r: save_checkpoint(r, out))
    train_s = time.perf_counter() - t_train
    run.student.eval()
    after = evaluate.compare(run.teacher, run.student, run.eval_data, **kwargs)
    folder = save_student(
        run.student, run.tokenizer, cfg, out, extra={"kept_layers": run.kept_layers}
    )
    wall = time.perf_counter() - t0
    metrics = {
        "teacher_ppl": before["teacher_ppl"],
        "student_ppl_before": before["student_ppl"],
        "student_ppl_after": after["student_ppl"],
        "top1_agreement_before": before["top1_agreement"],
        "top1_agreement_after": after["top1_agreement"],
        "kl_before": before["kl_teacher_student"],
        "kl_after": after["kl_teacher_student"],
        "eval_tokens": after["eval_tokens"],
        "train_seconds": train_s,
        "wall_seconds": wall,
        "student_selection": run.selection,
        "history": history,
    }
    write_json(out / "metrics.json", metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("history",)}, indent=1))
    print(
        f"\nheld-out perplexity  teacher {metrics['teacher_ppl']:.2f} | student before "
        f"{metrics['student_ppl_before']:.2f} -> after {metrics['student_ppl_after']:.2f}\n"
        f"student written to {folder}  (wall time {wall:.0f}s, training {train_s:.0f}s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
