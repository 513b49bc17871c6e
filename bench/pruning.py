"""Depth vs width pruning at the same parameter budget, before and after the same KD.

For each budget (default ~81M, today's 15-layer student, and ~50M, where depth
pruning alone breaks down) the candidates of `kd.shapes.candidate_shapes` are built
from the embedded teacher (SmolLM2-135M): depth only (block influence), width only
(FFN; hidden + FFN; hidden + FFN + heads) and depth + width. Every row is distilled
with the same KD budget, defaults, seed and data order, then scored on held-out
whole documents (split as in bench/quality.py):

  params, held-out ppl before / after KD, top-1 agreement with the teacher,
  generation tokens/s at batch 1 and 8 (greedy, fixed length)

The shape search (train_job/shape_search.py, Ray Tune, `--search-steps` per trial)
runs once per budget; its pick is checked against the full-budget rows.
Importance-scoring time (one hooked teacher forward over the calibration blocks) is
recorded too; target: ≤ 2 minutes on 2 CPU cores.

    python bench/pruning.py --corpus ../shared/data/wikitext-2/valid.txt --steps 32
    python bench/pruning.py --corpus ... --before-only --budgets 81M   # no training

Rows are appended to --out (JSONL); a markdown table closes the run.
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

from kd import data, evaluate, models, width  # noqa: E402
from kd.config import DistillConfig, parse_overrides  # noqa: E402
from kd.shapes import Shape, candidate_shapes, parse_params, shape_params  # noqa: E402
from kd.student import block_influence, derive_student, select_layers  # noqa: E402


def machine() -> str:
    return (
        f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )


def scoring(teacher, train_data, calib_blocks: int, batch_size: int) -> dict:
    """Block influence and width importance on the same calibration blocks, timed."""
    calib = width.calibration_batches(train_data, calib_blocks, batch_size)
    # Wall time, and CPU time of this process: on a shared machine the wall time
    # measures the neighbours; CPU seconds / threads is what an idle machine would take.
    t0, c0 = time.perf_counter(), time.process_time()
    imp = width.importance(teacher, calib)
    t_imp, c_imp = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    influence = block_influence(teacher, calib)
    t_inf, c_inf = time.perf_counter() - t0, time.process_time() - c0
    return {
        "importance": imp,
        "influence": influence,
        "importance_s": t_imp,
        "importance_cpu_s": c_imp,
        "block_influence_s": t_inf,
        "block_influence_cpu_s": c_inf,
        "calibration_tokens": imp.tokens,
        "threads": torch.get_num_threads(),
    }


def pruned(teacher, shape: Shape, sc: dict) -> torch.nn.Module:
    """The untrained student of `shape`: block-influence layers, then width by importance."""
    n = teacher.config.num_hidden_layers
    layers = select_layers("block_influence", n, shape.layers, sc["influence"])
    if not shape.prunes_width(Shape.of(teacher.config)):
        return derive_student(teacher, layers)
    keep = width.select(sc["importance"], layers, shape, teacher.config.num_key_value_heads)
    return width.prune(teacher, keep)


@torch.no_grad()
def generation_tps(model, prompt: torch.Tensor, batch: int, new_tokens: int = 32) -> float:
    """Greedy tokens/s generating exactly `new_tokens` for `batch` copies of a prompt."""
    ids = prompt[None].repeat(batch, 1)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    model.generate(input_ids=ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]), **kw)
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    return batch * new_tokens / (time.perf_counter() - t0)


def before_rows(teacher, held, sc: dict, budget: int, eval_blocks: int) -> list[dict]:
    rows = []
    for shape in candidate_shapes(teacher.config, budget):
        student = pruned(teacher, shape, sc).eval()
        t0 = time.perf_counter()
        ppl = evaluate.perplexity(student, held, max_blocks=eval_blocks, batch_size=4)
        rows.append(
            {
                "budget": budget,
                "row": shape.name,
                "shape": shape.to_dict(),
                "params": shape_params(teacher.config, shape),
                "ppl_before": ppl,
                "eval_s": time.perf_counter() - t0,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del student
        gc.collect()
    return rows


def trained_row(base: dict, shape: Shape, held, eval_blocks: int, prompt) -> dict:
    """Distil `shape` with the shared KD budget; before/after scores and speed."""
    from kd.train import setup, train
    from train_job.shape_search import winner_config

    cfg = winner_config(DistillConfig(**base), shape)
    run = setup(cfg, log_fn=lambda m: print(f"  [{shape.name}] {m}", flush=True))
    run.student.eval()
    before = evaluate.compare(run.teacher, run.student, held, max_blocks=eval_blocks)
    run.student.train()
    t0 = time.perf_counter()
    train(run)
    train_s = time.perf_counter() - t0
    run.student.eval()
    after = evaluate.compare(run.teacher, run.student, held, max_blocks=eval_blocks)
    row = {
        "row": shape.name,
        "shape": shape.to_dict(),
        "params": models.count_params(run.student),
        "ppl_before": before["student_ppl"],
        "ppl_after": after["student_ppl"],
        "teacher_ppl": after["teacher_ppl"],
        "top1_agreement": after["top1_agreement"],
        "kl_teacher_student": after["kl_teacher_student"],
        "train_s": train_s,
        "gen_tps_b1": generation_tps(run.student, prompt, 1),
        "gen_tps_b8": generation_tps(run.student, prompt, 8),
        "selection": {k: v for k, v in run.selection.items() if k != "width"},
    }
    print(json.dumps(row), flush=True)
    return row


def run_budget(args, base: dict, teacher, held, sc: dict, budget: int) -> list[dict]:
    shapes = candidate_shapes(teacher.config, budget)
    prompt = held.input_ids[0, :16]
    rows = [trained_row(base, s, held, args.eval_blocks, prompt) for s in shapes]
    for r in rows:
        r["budget"] = budget
    if args.search_steps:
        import ray

        from train_job.shape_search import search_shapes

        ray.init(ignore_reinit_error=True, include_dashboard=False)
        cfg = DistillConfig(**{**base, "student_layers": None, "student_params": budget})
        t0 = time.perf_counter()
        rep = search_shapes(cfg, steps=args.search_steps, name=f"bench-search-{budget}")
        best = min(rows, key=lambda r: r["ppl_after"])["row"]
        search = {
            "budget": budget,
            "row": "search",
            "search_steps": args.search_steps,
            "search_s": time.perf_counter() - t0,
            "picked": rep["winner"],
            "best_at_full_budget": best,
            "picked_the_best": rep["winner"] == best,
            "candidates": rep["candidates"],
        }
        print(json.dumps(search), flush=True)
        rows.append(search)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", required=True, help="e.g. ../shared/data/wikitext-2/valid.txt")
    ap.add_argument("--budgets", nargs="+", default=["81M", "50M"])
    ap.add_argument("--steps", type=int, default=32, help="KD steps for every row")
    ap.add_argument("--search-steps", type=int, default=8, help="KD steps per search trial")
    ap.add_argument("--eval-blocks", type=int, default=48, help="held-out 256-token blocks")
    ap.add_argument("--calib-blocks", type=int, default=16, help="importance calibration")
    ap.add_argument("--before-only", action="store_true", help="no training: scoring + ppl")
    ap.add_argument("--set", nargs="*", default=[], help="k=v overrides for every row")
    ap.add_argument("--out", default="bench/results/pruning.jsonl")
    args = ap.parse_args()
    base = {
        "dataset": str(Path(args.corpus).resolve()),
        "max_steps": args.steps,
        "eval_fraction": 0.1,
        "max_eval_blocks": 8,
        "export_onnx": False,
        "post_training_quant": False,
        "save_every": 0,
        **parse_overrides(args.set),
    }
    header = {"machine": machine(), "argv": sys.argv[1:]}
    print(json.dumps(header), flush=True)
    teacher, tok = models.load_model_and_tokenizer(DistillConfig().teacher_model)
    teacher.eval().requires_grad_(False)
    train_data, held = data.build_datasets(DistillConfig(**base), tok)
    sc = scoring(teacher, train_data, args.calib_blocks, 4)
    timing = {k: v for k, v in sc.items() if k not in ("importance", "influence")}
    rows = [{"row": "scoring", **timing}]
    print(json.dumps(rows[0]), flush=True)
    t_ppl = evaluate.perplexity(teacher, held, max_blocks=args.eval_blocks, batch_size=4)
    rows.append({"row": "teacher", "params": models.count_params(teacher), "ppl_before": t_ppl})
    for b in args.budgets:
        if args.before_only:
            rows += before_rows(teacher, held, sc, parse_params(b), args.eval_blocks)
        else:
            rows += run_budget(args, base, teacher, held, sc, parse_params(b))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps({**header, **r}) + "\n")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    cols = "budget row params ppl_before ppl_after top1_agreement gen_tps_b1 gen_tps_b8".split()
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        if "params" not in r:
            continue
        cells = []
        for c in cols:
            v = r.get(c, "")
            if isinstance(v, float):
                cells.append(f"{v:,.3f}")
            else:
                cells.append(f"{v:,}" if isinstance(v, int) else str(v))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
