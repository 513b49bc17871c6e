"""What happens around the loop: the evaluation before training and the finish after.

Both `python -m kd` and the Ray job (rank 0) call these, so a job run either way
produces the same artifact folder:

    <out>/before.json        teacher and student held-out numbers before training
    <out>/metrics.json       before/after numbers, timings, the student selection, history
    <out>/student/           the merged student (see kd.export)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kd import evaluate
from kd.export import save_student, write_json
from kd.train import Run

BEFORE = "before.json"
METRICS = "metrics.json"


def eval_kwargs(run: Run) -> dict:
    return {
        "batch_size": run.cfg.per_device_batch_size,
        "max_blocks": run.cfg.max_eval_blocks,
        "device": run.device,
    }


def evaluate_before(run: Run, out: Path) -> dict:
    """Held-out numbers of teacher and untrained student; kept in out/before.json so a
    resumed job still reports them."""
    path = out / BEFORE
    if path.is_file():
        return json.loads(path.read_text())
    was = run.student.training
    run.student.eval()
    before = evaluate.compare(run.teacher, run.student, run.eval_data, **eval_kwargs(run))
    run.student.train(was)
    before["student_selection"] = run.selection
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, before)
    return before


def finalize(
    run: Run,
    out: Path,
    before: dict,
    history: list[dict],
    train_seconds: float,
    started: float,
) -> dict:
    """Evaluate the trained student, save it, and write metrics.json. Returns metrics."""
    run.student.eval()
    after = evaluate.compare(run.teacher, run.student, run.eval_data, **eval_kwargs(run))
    save_student(run.student, run.tokenizer, run.cfg, out, extra={"kept_layers": run.kept_layers})
    metrics = {
        "teacher_ppl": before["teacher_ppl"],
        "student_ppl_before": before["student_ppl"],
        "student_ppl_after": after["student_ppl"],
        "top1_agreement_before": before["top1_agreement"],
        "top1_agreement_after": after["top1_agreement"],
        "kl_before": before["kl_teacher_student"],
        "kl_after": after["kl_teacher_student"],
        "eval_tokens": after["eval_tokens"],
        "steps": run.step,
        "train_seconds": train_seconds,
        "wall_seconds": time.time() - started,
        "student_selection": before.get("student_selection", run.selection),
        "history": history,
    }
    write_json(out / METRICS, metrics)
    return metrics


def summary_line(m: dict) -> str:
    return (
        f"held-out perplexity  teacher {m['teacher_ppl']:.2f} | student before "
        f"{m['student_ppl_before']:.2f} -> after {m['student_ppl_after']:.2f} | top-1 agreement "
        f"{m['top1_agreement_before']:.3f} -> {m['top1_agreement_after']:.3f}"
    )
