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

from kd import pipeline
from kd.config import DistillConfig, config_changes, load_config, resume_refusal
from kd.exports import write_json
from kd.fmt import metric_line
from kd.model_files import ModelFilesError
from kd.preflight import PreflightError, preflight
from kd.preflight import summary as preflight_summary
from kd.state import CheckpointError, load_state_dict, state_dict
from kd.state import find as find_checkpoint
from kd.state import load as load_checkpoint
from kd.state import save as save_state
from kd.train import Event, Run, setup, train

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


def save_checkpoint(run: Run, out: Path, history: list[dict] | None = None) -> None:
    """Atomic (kd.state.save): the state with the history so far, and the config."""
    folder = out / CKPT
    save_state(state_dict(run, history), folder)
    write_json(folder / "distill_config.json", run.cfg.model_dump(mode="json"))


def _resume_problem(args: argparse.Namespace, cfg: DistillConfig) -> str | None:
    """With --resume and a checkpoint: refuse changed model/data fields, print the rest."""
    saved = Path(args.out) / CKPT / "distill_config.json"
    if not (args.resume and saved.is_file()):
        return None
    refused, allowed = config_changes(json.loads(saved.read_text()), cfg.model_dump(mode="json"))
    if refused:
        return resume_refusal(refused)
    if allowed:
        print(f"resuming with changes: {'; '.join(allowed)}")
    return None


def _config_and_plan(args: argparse.Namespace) -> tuple:
    """(config, preflight plan, None), or (None, None, why the run is refused)."""
    try:
        cfg = load_config(args.config, args.overrides)
    except Exception as e:  # pydantic lists every problem with its field
        return None, None, f"invalid config: {e}"
    problem = _resume_problem(args, cfg)
    if problem:
        return None, None, f"invalid config: {problem}"
    try:  # tokenizers and memory, from config files only, before anything is loaded
        return cfg, preflight(cfg), None
    except (PreflightError, ModelFilesError) as e:
        return None, None, f"preflight refused the job: {e}"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, plan, refusal = _config_and_plan(args)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    print(preflight_summary(plan))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:  # safetensors + JSON: nothing in a checkpoint is unpickled
        ckpt_path = find_checkpoint(out / CKPT) if args.resume else None
        state = load_checkpoint(ckpt_path) if ckpt_path else None
    except CheckpointError as e:
        print(f"cannot resume: {e}", file=sys.stderr)
        return 2
    if state is None:  # a fresh run must not reuse an old run's "before" numbers
        (out / pipeline.BEFORE).unlink(missing_ok=True)
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
    before = pipeline.evaluate_before(run, out, preflight=plan)
    print(
        f"held-out perplexity: teacher {before['teacher_ppl']:.2f}, "
        f"student before training {before['student_ppl']:.2f}"
    )
    if state is not None:
        load_state_dict(run, state)
        print(f"resumed from {ckpt_path} at step {run.step}")
    # the history before the resume comes from the checkpoint: metrics.json and the
    # curves cover the whole run
    history: list[dict[str, float]] = list(state.get("history", [])) if state else []

    def on_event(event: Event) -> None:
        if event.due.log:
            history.append(dict(event.metrics))
            print(f"[train] {metric_line(event.metrics)}", flush=True)
        if event.due.save:
            save_checkpoint(run, out, history)

    t_train = time.perf_counter()
    train(run, on_event)
    train_s = time.perf_counter() - t_train
    metrics = pipeline.finalize(run, out, before, history, train_s, started)
    print(
        f"\n{pipeline.summary_line(metrics)}\nstudent written to {out / 'student'} "
        f"(wall time {metrics['wall_seconds']:.0f}s, training {train_s:.0f}s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
