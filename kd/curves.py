"""Training curves of a job: a PNG, TensorBoard event files and (when configured) MLflow.

All three are drawn from the `history` that the loop reports (one dict per logging
step, see `kd.train.train`), after training, so a resumed job gets the whole run:

    <out>/curves.png       every loss part, and held-out perplexity when eval_every > 0;
                           runs that generate (lmbda > 0 or seq_kd) get a third panel,
                           rollout time and training time per step
    <out>/tensorboard/     event files: train/<part>, train/lr, train/tokens_per_s, eval/ppl
    MLflow                 only when MLFLOW_TRACKING_URI is set and mlflow is installed

matplotlib runs headless (the Agg canvas, no pyplot state), so this works in a Ray
worker without a display.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kd.spec import LOSS_TERMS

log = logging.getLogger(__name__)

CURVES = "curves.png"
TENSORBOARD = "tensorboard"
# Keys of a history row that are not loss parts.
# rollout_s, train_s, on_policy: step timing and the on-policy share (kd.rollout), not losses.
NOT_LOSS = {
    "step",
    "lr",
    "tokens_per_s",
    "epoch",
    "grad_norm",
    "eval_ppl",
    "rollout_s",
    "train_s",
    "on_policy",
    "loss_scale",  # fp16 loss scaling (kd.step._clip_and_step): the scale and the
    "fp16_skipped",  # share of steps skipped for overflow
}
# Loss parts in a stable order (the total first, then kd.spec.LOSS_TERMS' keys); any
# other part follows.
PART_ORDER = ["loss", *LOSS_TERMS.values()]


def loss_parts(history: list[dict]) -> list[str]:
    seen = {k for row in history for k in row if k not in NOT_LOSS}
    return [k for k in PART_ORDER if k in seen] + sorted(seen - set(PART_ORDER))


def series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one key over the rows that have it."""
    rows = [r for r in history if key in r and r[key] is not None]
    return [float(r["step"]) for r in rows], [float(r[key]) for r in rows]


TIMING = ("rollout_s", "train_s")  # seconds per step, logged when the run generates


def plot_timing(ax, history: list[dict]) -> None:
    """Rollout (generation) and training seconds per step, stacked: their sum is the
    step time, the lower band the rollout share."""
    xs, rollout = series(history, "rollout_s")
    _, train = series(history, "train_s")
    total = [r + t for r, t in zip(rollout, train, strict=True)]
    ax.fill_between(xs, 0, rollout, color="tab:orange", alpha=0.6, label="rollout_s")
    ax.fill_between(xs, rollout, total, color="tab:blue", alpha=0.6, label="train_s")
    ax.set(title="seconds per step", xlabel="step", ylabel="seconds")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right", fontsize=8)


def plot_curves(history: list[dict], path: Path, reference: dict | None = None) -> Path:
    """Two panels: loss parts over steps (log scale), held-out perplexity over steps;
    a third, rollout and training seconds per step, when the history has them.

    `reference` may hold teacher_ppl / student_ppl_before, drawn as dashed lines in the
    perplexity panel so the curve reads against where it started and where it aims.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    reference = reference or {}
    timed = any(all(k in r for k in TIMING) for r in history)
    fig = Figure(figsize=(15, 4) if timed else (10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_ppl, *ax_time = fig.subplots(1, 3 if timed else 2)
    if timed:
        plot_timing(ax_time[0], [r for r in history if all(k in r for k in TIMING)])
    for key in loss_parts(history):
        xs, ys = series(history, key)
        ax_loss.plot(
            xs, ys, marker="o", markersize=3, linewidth=2 if key == "loss" else 1.2, label=key
        )
    ax_loss.set(title="training loss parts", xlabel="step", ylabel="value")
    if any(v > 0 for r in history for k, v in r.items() if k not in NOT_LOSS):
        ax_loss.set_yscale("log")
    if history:
        ax_loss.legend(loc="upper right", fontsize=8)
    xs, ys = series(history, "eval_ppl")
    before, after = reference.get("student_ppl_before"), reference.get("student_ppl_after")
    if before is not None and history:  # the full evaluations bracket the curve
        xs, ys = [0.0, *xs], [float(before), *ys]
        if after is not None:
            xs, ys = [*xs, float(history[-1]["step"])], [*ys, float(after)]
    if xs:
        ax_ppl.plot(xs, ys, marker="o", color="tab:purple", label="student (held-out)")
    for key, style in (("teacher_ppl", "tab:green"), ("student_ppl_before", "tab:gray")):
        if reference.get(key) is not None:
            ax_ppl.axhline(reference[key], linestyle="--", color=style, label=key)
    if not xs:
        ax_ppl.text(
            0.5,
            0.5,
            "no evaluation during training\n(set eval_every > 0)",
            ha="center",
            va="center",
            transform=ax_ppl.transAxes,
            color="0.4",
        )
    ax_ppl.set(title="held-out perplexity", xlabel="step", ylabel="perplexity")
    if ys or reference.get("teacher_ppl"):
        ax_ppl.set_yscale("log")  # from hundreds (untrained) to the teacher's ~10
    if ax_ppl.get_legend_handles_labels()[0]:
        ax_ppl.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def write_tensorboard(history: list[dict], folder: Path) -> Path:
    """TensorBoard event files (tensorboardX: no TensorFlow, no tensorboard server)."""
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir=str(folder))
    try:
        for row in history:
            step = int(row["step"])
            for key, value in row.items():
                if key in ("step", "epoch") or value is None:
                    continue
                tag = "eval/ppl" if key == "eval_ppl" else f"train/{key}"
                writer.add_scalar(tag, float(value), step)
    finally:
        writer.close()
    return folder


def log_mlflow(history: list[dict], config: dict, out: Path, run_name: str) -> bool:
    """Log params, per-step metrics and the curves to MLflow when MLFLOW_TRACKING_URI is
    set. mlflow is optional: without it (or on any MLflow error) this logs a warning and
    returns False; a tracking server being down never fails a job."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return False
    try:
        import mlflow
    except ImportError:
        log.warning("MLFLOW_TRACKING_URI is set but mlflow is not installed; skipping MLflow")
        return False
    try:
        with mlflow.start_run(run_name=run_name):
            mlflow.log_params({k: v for k, v in config.items() if v is not None})
            for row in history:
                step = int(row["step"])
                values = {k: float(v) for k, v in row.items() if k != "step" and v is not None}
                mlflow.log_metrics(values, step=step)
            if (out / CURVES).is_file():
                mlflow.log_artifact(str(out / CURVES))
    except Exception as e:
        log.warning("MLflow logging failed: %s", e)
        return False
    return True


def write_all(out: Path, history: list[dict], config: dict, reference: dict | None = None) -> None:
    """curves.png, tensorboard/ and MLflow for one finished run."""
    plot_curves(history, out / CURVES, reference)
    write_tensorboard(history, out / TENSORBOARD)
    # A job's folder is <root>/jobs/<job_id>/artifacts; `python -m kd` writes to --out.
    name = out.parent.name if out.name == "artifacts" else out.name
    log_mlflow(history, config, out, run_name=name or "llm2slm")
