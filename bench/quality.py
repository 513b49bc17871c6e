"""Does distillation help? Held-out quality of a derived student at a fixed token budget.

Distils the embedded default teacher (SmolLM2-135M) into a derived half-depth student
on a text corpus given by path, split by document into train and held-out (the
held-out part is never trained on), and compares at the same token budget, seed, data
order and student initialisation:

  kd         the hybrid KD loss with the code's default weights
  kl         KL only (alpha_kl=1; every other weight, lm_ce too, 0)
  ce         next-token CE on the data only, no teacher (lm_ce=1, no teacher forward)
  untrained  the derived student before training (the common starting point)

For each: held-out perplexity, top-1 next-token agreement with the teacher, mean
KL(teacher‖student), training wall time. Also records the student-selection numbers
(held-out perplexity of each layer-selection strategy before training).

    python bench/quality.py --corpus ../shared/data/wikitext-2/valid.txt --steps 32
    python bench/quality.py --corpus ... --variants kd --set lr=1e-3 temperature=1

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
from kd.config import DistillConfig, parse_overrides  # noqa: E402
from kd.train import on_log, setup, train  # noqa: E402

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


def held_out_blocks(run, seq_len: int):
    """The held-out documents packed at seq_len: every variant is scored on the same
    blocks whatever max_seq_len it trained with (perplexity falls with context length)."""
    if run.cfg.max_seq_len == seq_len:
        return run.eval_data
    _, held = data.split_documents(
        data.load_documents(run.cfg), run.cfg.eval_fraction, run.cfg.seed
    )
    return data.pack(held, run.tokenizer, seq_len)


def evaluate_run(run, eval_blocks: int, seq_len: int) -> dict:
    run.student.eval()
    out = evaluate.compare(
        run.teacher,
        run.student,
        held_out_blocks(run, seq_len),
        batch_size=run.cfg.per_device_batch_size,
        max_blocks=eval_blocks,
        device=run.device,
    )
    run.student.train()
    return out


def run_variant(
    name: str, base: dict, eval_blocks: int, eval_len: int, with_untrained: bool, png: Path
) -> list[dict]:
    cfg = DistillConfig(**{**base, **VARIANTS[name]})
    # held-out perplexity on 8 blocks every 5 steps, for the curves (inside train_s)
    t0 = time.perf_counter()
    run = setup(cfg, log_fn=lambda m: print(f"  [{name}] {m}", flush=True))
    setup_s = time.perf_counter() - t0
    rows = []
    common = {
        "steps": cfg.max_steps,
        "tokens": cfg.max_steps * cfg.tokens_per_step,
        "train_blocks": len(run.train_data),
        "eval_blocks": eval_blocks,
        "eval_seq_len": eval_len,
        "selection": run.selection,
    }
    if with_untrained:
        before = evaluate_run(run, eval_blocks, eval_len)
        rows.append(
            {"variant": "untrained", **common, **before, "steps": 0, "tokens": 0, "train_s": 0.0}
        )
        print(json.dumps(rows[-1]), flush=True)
    t0 = time.perf_counter()
    history: list[dict] = []
    train(run, on_log(history.append))
    train_s = time.perf_counter() - t0
    after = evaluate_run(run, eval_blocks, eval_len)
    ref = {"teacher_ppl": after["teacher_ppl"]}
    if with_untrained:
        ref["student_ppl_before"] = rows[0]["student_ppl"]
    curves.plot_curves(history, png, reference=ref)
    rows.append(
        {
            "variant": name,
            **common,
            **after,
            "train_s": train_s,
            "setup_s": setup_s,
            "tokens_per_s": common["tokens"] / train_s,
            "config": {k: v for k, v in cfg.model_dump().items() if k in _TUNED},
            "history": history,
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    del run
    gc.collect()
    return rows


_TUNED = (
    "student_layers layer_selection temperature objective alpha_kl beta_ce gamma_mse delta_cos "
    "lm_ce lr lr_schedule warmup_steps max_seq_len per_device_batch_size max_steps"
).split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", help="text file or folder (e.g. wikitext)")
    ap.add_argument("--steps", type=int, default=32, help="optimizer steps per variant")
    ap.add_argument("--variants", nargs="+", default=["kd", "kl", "ce"], choices=list(VARIANTS))
    ap.add_argument("--no-untrained", action="store_true", help="skip the untrained row")
    ap.add_argument("--eval-blocks", type=int, default=48, help="held-out blocks to score")
    ap.add_argument("--eval-fraction", type=float, default=0.1)
    ap.add_argument(
        "--eval-seq-len", type=int, default=256, help="held-out block length for the scores"
    )
    ap.add_argument("--set", nargs="*", default=[], help="k=v overrides for every variant")
    ap.add_argument("--out", default="bench/results/quality.jsonl")
    ap.add_argument("--label", default="", help="names this run's rows (tuning sweeps)")
    ap.add_argument("--table", metavar="JSONL", help="only print the table of a results file")
    args = ap.parse_args()
    if args.table:
        print_table([json.loads(line) for line in Path(args.table).read_text().splitlines()])
        return
    if not args.corpus or not Path(args.corpus).exists():
        hint = "e.g. ../shared/data/wikitext-2/valid.txt"
        sys.exit(f"--corpus {args.corpus} does not exist; {hint}")
    base = {
        "dataset": str(Path(args.corpus).resolve()),
        "max_steps": args.steps,
        "eval_fraction": args.eval_fraction,
        "max_eval_blocks": 8,  # the in-training curve; the final numbers use --eval-blocks
        "eval_every": 5,
        "export_onnx": False,
        "post_training_quant": False,
        "save_every": 0,
        **parse_overrides(args.set),
    }
    header = {"machine": machine(), "argv": sys.argv[1:], "label": args.label}
    print(json.dumps(header), flush=True)
    rows: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(args.variants):
        first = i == 0 and not args.no_untrained
        png = out.parent / f"curves_{args.label + '_' if args.label else ''}{name}.png"
        rows += run_variant(name, base, args.eval_blocks, args.eval_seq_len, first, png)
    rows = [{**header, **r} for r in rows]
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """One markdown row per result; each ratio is to the teacher on that row's split."""
    teacher = rows[0]["teacher_ppl"]
    print(f"\nteacher held-out ppl {teacher:.2f}; {rows[0]['eval_tokens']} held-out tokens\n")
    cols = "run variant tokens held-out-ppl ppl/teacher top-1-agreement KL train-s".split()
    print("| " + " | ".join(c.replace("-", " ") for c in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print(
            f"| {r.get('label') or '-'} | {r['variant']} | {r['tokens']:,} | "
            f"{r['student_ppl']:.2f} | {r['student_ppl'] / r['teacher_ppl']:.2f}× | "
            f"{r['top1_agreement']:.3f} | {r['kl_teacher_student']:.3f} | {r['train_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
