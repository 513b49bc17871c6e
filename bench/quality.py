"""Does distillation help? Held-out quality of a derived student, on documents it never saw.

Distils the embedded default teacher (SmolLM2-135M) into a derived half-depth student
on a corpus given by path, split the way every job splits (kd.data.plan_split): whole
documents held out (wikitext articles at their '= Title =' headings, files of a folder,
records), never trained on. It compares, at the same budget, seed, data order and
student initialisation:

  kd         the hybrid KD loss with the code's default weights
  kl         KL only (alpha_kl=1; every other weight, lm_ce too, 0)
  ce         next-token CE on the data only, no teacher (lm_ce=1, no teacher forward)
  untrained  the derived student before training (the common starting point)

For each, side by side on the held-out documents: perplexity, top-1 next-token
agreement with the teacher and mean KL(teacher‖student) (with CE on the data a student
can beat the teacher's perplexity on the corpus's domain, so perplexity alone does not
measure distillation), plus training wall time and the split's description.

    python bench/quality.py --corpus ../shared/data/wikitext-2/valid.txt --steps 25
    python bench/quality.py --corpus ... --variants kd --set lr=1e-3 temperature=1
    # the pre-issue-17 split (blank-line paragraphs, which leak articles) for comparison
    python bench/quality.py --corpus ... --set document_separator=blank_line
    # train for 30 minutes of wall clock, held-out curve every 10 steps
    python bench/quality.py --corpus ... --time-budget-min 30 --curve-every 10
    # train on the embedded corpus, score on the same held-out articles as above
    python bench/quality.py --corpus embedded --score-corpus .../valid.txt

--time-budget-min trains until that much training wall time (held-out evaluations
excluded) and re-aims the lr schedule at the budget: from step 3 on, max_steps is
re-estimated every step from the measured seconds per step, so a decaying schedule
ends near the budget. --curve-every N scores the student on --curve-blocks held-out
blocks every N steps; the curve (training minutes, tokens, perplexity, agreement, KL)
is saved as curve_<label>_<variant>.json and .png beside --out.

Each result is printed as one JSON line and appended to --out (JSONL); a markdown
table closes the run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from kd import curves, data, evaluate  # noqa: E402
from kd.config import EMBEDDED_DATASET, DistillConfig, parse_overrides  # noqa: E402
from kd.train import setup, train  # noqa: E402

VARIANTS = {
    "kd": {},
    "kl": {
        "alpha_kl": 1.0,
        "beta_ce": 0.0,
        "gamma_mse": 0.0,
        "delta_cos": 0.0,
        "epsilon_attn": 0.0,
        "lm_ce": 0.0,
    },
    "ce": {
        "alpha_kl": 0.0,
        "beta_ce": 0.0,
        "gamma_mse": 0.0,
        "delta_cos": 0.0,
        "epsilon_attn": 0.0,
        "lm_ce": 1.0,
    },
}


def machine() -> str:
    return (
        f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average at start "
        f"{os.getloadavg()[0]:.1f}"
    )


def spread(packed: data.Packed, n: int) -> data.Packed:
    """n blocks evenly spaced over the held-out set (all when n is 0 or more than there
    are), so the scores cover every held-out document, not only the first ones."""
    if n <= 0 or n >= len(packed):
        return packed
    idx = [round(i * (len(packed) - 1) / (n - 1)) for i in range(n)] if n > 1 else [0]
    b = packed.batch(idx)
    return data.Packed(b["input_ids"], b["attention_mask"], packed.split)


def scoring_split(cfg: DistillConfig, score_corpus: str | None) -> data.Split:
    """The held-out documents every row is scored on: those of the training split, or
    those that --score-corpus's split holds out (same seed and eval_fraction)."""
    if score_corpus is None:
        return data.plan_split(cfg)
    return data.plan_split(
        DistillConfig(dataset=score_corpus, eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    )


def held_out_blocks(run, args) -> data.Packed:
    """The held-out documents packed at --eval-seq-len: every variant is scored on the
    same blocks whatever max_seq_len it trained with (perplexity falls with context)."""
    split = scoring_split(run.cfg, args.score_corpus)
    packed = data.pack(split.held.pieces, run.tokenizer, args.eval_seq_len)
    packed.split = {**split.info, "eval_documents": len(split.held.groups)}
    packed.split["eval_names"] = split.held.names[: data.EVAL_NAMES_SHOWN]
    return spread(packed, args.eval_blocks)


def evaluate_on(run, blocks: data.Packed) -> dict:
    was = run.student.training
    run.student.eval()
    out = evaluate.compare(
        run.teacher,
        run.student,
        blocks,
        batch_size=run.cfg.per_device_batch_size,
        device=run.device,
    )
    run.student.train(was)
    return out


class Clock:
    """The kd.train.train callback of a bench row: the held-out curve every `curve_every` steps and,
    with a budget, a stop at `budget_s` seconds of training (evaluations excluded).

    With a budget the lr schedule is re-aimed at it: from step PROBE_STEPS on, every
    step sets run.cfg.max_steps (which the schedule and the loop read) to the steps
    done plus the steps the remaining time allows at the measured speed."""

    PROBE_STEPS = 3

    def __init__(self, run, budget_s: float | None, curve_every: int, curve_blocks, history):
        self.run, self.budget_s, self.every = run, budget_s, curve_every
        self.blocks, self.history = curve_blocks, history
        self.curve: list[dict] = []
        self.eval_s = 0.0
        self.t0 = time.perf_counter()

    @property
    def train_s(self) -> float:
        return time.perf_counter() - self.t0 - self.eval_s

    def point(self) -> dict:
        """One curve point, timed out of the budget."""
        t, step = time.perf_counter(), self.run.step
        train_s = self.train_s
        scores = evaluate_on(self.run, self.blocks)
        row = {
            "step": step,
            "train_min": train_s / 60,
            "tokens": step * self.run.cfg.tokens_per_step,
        }
        row.update(scores)
        self.curve.append(row)
        if self.history and self.history[-1].get("step") == step:
            self.history[-1]["eval_ppl"] = scores["student_ppl"]  # for curves.plot_curves
        print(f"  curve {json.dumps(row)}", flush=True)
        self.eval_s += time.perf_counter() - t
        return row

    def on_event(self, event) -> None:
        """kd.train's callback (logging_steps=1, so once a step): history, the curve,
        and the budget: ending the run is setting max_steps, which the loop reads."""
        if event.due.log:
            self.history.append(event.metrics)
        if self.stop():
            self.run.cfg.max_steps = self.run.step

    def stop(self) -> bool:
        run = self.run
        if self.every and run.step % self.every == 0:
            self.point()
        if self.budget_s is None:
            return False
        train_s = self.train_s
        if train_s >= self.budget_s:
            return True
        if run.step >= self.PROBE_STEPS:
            left = int((self.budget_s - train_s) / (train_s / run.step))
            run.cfg.max_steps = run.step + max(1, left)
        return False


def plot_curve(curve: list[dict], path: Path, title: str) -> None:
    """Held-out perplexity (with the teacher's), agreement and KL over training minutes:
    a line through the curve points (--curve-blocks blocks) and a star for the final
    score (all --eval-blocks blocks, so it may sit off the line)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    points = [r for r in curve if not r.get("final")]
    final = [r for r in curve if r.get("final")]
    panels = (
        ("student_ppl", "held-out perplexity", "tab:blue"),
        ("top1_agreement", "top-1 agreement with the teacher", "tab:purple"),
        ("kl_teacher_student", "KL(teacher‖student) / token", "tab:red"),
    )
    for ax, (key, name, color) in zip(axes, panels, strict=True):
        ax.plot([r["train_min"] for r in points], [r[key] for r in points], "o-", color=color)
        for r in final:
            ax.plot([r["train_min"]], [r[key]], "*", markersize=12, color=color, label="final")
        ax.set(title=name, xlabel="training minutes")
    ax_ppl = axes[0]
    ax_ppl.plot(
        [r["train_min"] for r in points],
        [r["teacher_ppl"] for r in points],
        "--",
        color="tab:green",
        label="teacher",
    )
    ax_ppl.set_yscale("log")
    ax_ppl.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")


def run_variant(name: str, base: dict, args, with_untrained: bool, stem: Path) -> list[dict]:
    cfg = DistillConfig(**{**base, **VARIANTS[name]})
    t0 = time.perf_counter()
    run = setup(cfg, log_fn=lambda m: print(f"  [{name}] {m}", flush=True))
    setup_s = time.perf_counter() - t0
    blocks = held_out_blocks(run, args)
    rows = []
    common = {
        "steps": cfg.max_steps,
        "tokens": cfg.max_steps * cfg.tokens_per_step,
        "train_blocks": len(run.train_data),
        "eval_blocks": len(blocks),
        "eval_seq_len": args.eval_seq_len,
        "selection": run.selection,
        "split": run.train_data.split,
        "scored_on": blocks.split,
    }
    if with_untrained:
        before = evaluate_on(run, blocks)
        rows.append(
            {"variant": "untrained", **common, **before, "steps": 0, "tokens": 0, "train_s": 0.0}
        )
        print(json.dumps(rows[-1]), flush=True)
    history: list[dict] = []
    budget_s = args.time_budget_min * 60 if args.time_budget_min else None
    clock = Clock(run, budget_s, args.curve_every, spread(blocks, args.curve_blocks), history)
    if args.curve_every:
        clock.point()  # the curve starts at the untrained student
    clock.t0 = time.perf_counter()
    clock.eval_s = 0.0
    run.cfg.logging_steps = 1  # an event every step: the clock checks the budget each step
    train(run, clock.on_event)
    train_s = clock.train_s
    after = evaluate_on(run, blocks)
    steps = run.step
    ref = {"teacher_ppl": after["teacher_ppl"]}
    if with_untrained:
        ref["student_ppl_before"] = rows[0]["student_ppl"]
    curves.plot_curves(history, stem.with_name(f"curves_{stem.name}_{name}.png"), reference=ref)
    if clock.curve:
        clock.curve.append({"step": steps, "train_min": train_s / 60, **after, "final": True})
        path = stem.with_name(f"curve_{stem.name}_{name}.json")
        path.write_text(json.dumps(clock.curve, indent=1))
        plot_curve(
            clock.curve,
            path.with_suffix(".png"),
            f"{stem.name} {name}: {blocks.split['held_out_source']}",
        )
    rows.append(
        {
            "variant": name,
            **common,
            **after,
            "steps": steps,
            "tokens": steps * cfg.tokens_per_step,
            "train_s": train_s,
            "eval_s_during_training": clock.eval_s,
            "setup_s": setup_s,
            "tokens_per_s": steps * cfg.tokens_per_step / train_s,
            "config": {k: v for k, v in cfg.model_dump().items() if k in _TUNED},
            "history": history,
            "curve": clock.curve,
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    del run
    gc.collect()
    return rows


_TUNED = (
    "student_layers layer_selection temperature objective alpha_kl beta_ce gamma_mse delta_cos "
    "lm_ce lr lr_schedule warmup_steps min_lr_ratio max_seq_len per_device_batch_size "
    "grad_accum_steps max_steps dataset document_separator eval_fraction seed"
).split()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", help="training text: file, folder or 'embedded'")
    ap.add_argument("--steps", type=int, default=32, help="optimizer steps per variant")
    ap.add_argument(
        "--time-budget-min",
        type=float,
        help="train until this many minutes of training wall time instead of --steps",
    )
    ap.add_argument("--variants", nargs="+", default=["kd", "kl", "ce"], choices=list(VARIANTS))
    ap.add_argument("--no-untrained", action="store_true", help="skip the untrained row")
    ap.add_argument(
        "--eval-blocks", type=int, default=48, help="held-out blocks to score, spread (0: all)"
    )
    ap.add_argument("--eval-fraction", type=float, default=0.1)
    ap.add_argument(
        "--eval-seq-len", type=int, default=256, help="held-out block length for the scores"
    )
    ap.add_argument(
        "--score-corpus",
        help="score on the documents this corpus's split holds out (default: --corpus's)",
    )
    ap.add_argument("--curve-every", type=int, default=0, help="held-out curve every N steps")
    ap.add_argument("--curve-blocks", type=int, default=16, help="held-out blocks per point")
    ap.add_argument("--set", nargs="*", default=[], help="k=v overrides for every variant")
    ap.add_argument("--out", default="bench/results/quality.jsonl")
    ap.add_argument("--label", default="", help="names this run's rows (tuning sweeps)")
    ap.add_argument("--table", metavar="JSONL", help="only print the table of a results file")
    return ap.parse_args()


def _exists(corpus: str | None) -> bool:
    return corpus == EMBEDDED_DATASET or (corpus is not None and Path(corpus).exists())


def main() -> None:
    args = parse_args()
    if args.table:
        print_table([json.loads(line) for line in Path(args.table).read_text().splitlines()])
        return
    for flag, corpus in (("--corpus", args.corpus), ("--score-corpus", args.score_corpus)):
        if (flag == "--corpus" or corpus is not None) and not _exists(corpus):
            sys.exit(f"{flag} {corpus} does not exist; e.g. ../shared/data/wikitext-2/valid.txt")
    resolve = lambda c: c if c in (None, EMBEDDED_DATASET) else str(Path(c).resolve())  # noqa: E731
    args.score_corpus = resolve(args.score_corpus)
    base = {
        "dataset": resolve(args.corpus),
        "max_steps": 1_000_000 if args.time_budget_min else args.steps,
        "eval_fraction": args.eval_fraction,
        "max_eval_blocks": 8,
        "eval_every": 0,  # the held-out curve is --curve-every's, timed out of the budget
        "export_formats": ["safetensors"],
        "save_every": 0,
        **parse_overrides(args.set),
    }
    header = {"machine": machine(), "argv": sys.argv[1:], "label": args.label}
    print(json.dumps(header), flush=True)
    rows: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.parent / (args.label or "run")
    for i, name in enumerate(args.variants):
        first = i == 0 and not args.no_untrained
        rows += run_variant(name, base, args, first, stem)
    rows = [{**header, **r} for r in rows]
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print_table(rows)


def _held_out(r: dict) -> str:
    """Short: what the row was scored on (old rows have no split description)."""
    s = r.get("scored_on") or r.get("split")
    if not s:
        return "paragraphs (pre-17 split)"
    unit = s.get("unit", "document")
    return f"{s.get('eval_documents', '?')} {unit}s ({s['method']})"


def print_table(rows: list[dict]) -> None:
    """One markdown row per result; each ratio is to the teacher on that row's blocks."""
    for r in rows:
        s = r.get("scored_on") or r.get("split")
        if s:
            print(f"- {r.get('label') or '-'} {r['variant']}: scored on {s['held_out_source']}")
    cols = (
        "run variant held-out tokens teacher-ppl held-out-ppl ppl/teacher top-1-agreement "
        "KL(T‖S) train-s"
    ).split()
    print("\n| " + " | ".join(c.replace("-", " ") for c in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print(
            f"| {r.get('label') or '-'} | {r['variant']} | {_held_out(r)} | {r['tokens']:,} | "
            f"{r['teacher_ppl']:.2f} | {r['student_ppl']:.2f} | "
            f"{r['student_ppl'] / r['teacher_ppl']:.2f}× | {r['top1_agreement']:.3f} | "
            f"{r['kl_teacher_student']:.3f} | {r['train_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
