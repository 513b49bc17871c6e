"""On-policy distillation (GKD) against off-policy KD and TRL's GKDTrainer.

Rows, side by side in one invocation, each in its own process (so peak RSS is its own)
and each trained for the same wall-clock budget:

  a   lmbda=0    our loop, the data's continuations only (off-policy)
  b   lmbda=1    our loop, the student's own continuations only (on-policy)
  c   lmbda=0.5  our loop, half and half
  d   TRL        trl.experimental.gkd.GKDTrainer with the same teacher, student,
                 prompts, lmbda (--trl-lmbda, default 1: compare with b), beta,
                 max_new_tokens, batch, lr and sampling temperature

Teacher: the embedded SmolLM2-135M. Student: the teacher with half its layers kept
(block influence, the same layers in every row). Prompts: the embedded prompt set
(prompt_column='prompt', chat template; kd/prompts.py), the data's continuation being
the corpus text. The divergence is GKD's generalized JSD(β) at loss temperature 1, as
in TRL (β=0: forward KL, β=1: reverse KL); no CE term in either.

Reported per row: optimizer steps/s, the rollout's share of step time, peak RSS of the
process, and after training (not counted in the budget) held-out generation quality
(kd.genquality: teacher NLL and reverse KL per token of the student's samples on N
held-out prompts) and held-out perplexity on the embedded held-out blocks.

    python bench/on_policy.py --budget-s 600 --out bench/results/on_policy.json
    python bench/on_policy.py --smoke        # one step per row, tiny evaluation

TRL runs in a separate virtual environment (--trl-python, default
/work/venv-bench/bin/python; see the `bench` extra in pyproject.toml for the pinned
version) so its dependencies never touch the project's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

ROWS = {"a": 0.0, "b": 1.0, "c": 0.5, "d": None}


def objective_for(beta: float) -> dict:
    """TRL's β mapped onto DistillConfig (same generalized JSD; limits are the KLs)."""
    if beta <= 0.0:
        return {"objective": "forward_kl"}
    if beta >= 1.0:
        return {"objective": "reverse_kl"}
    return {"objective": "jsd", "jsd_beta": beta}


def make_config(args, lmbda: float):
    from kd.config import DistillConfig

    return DistillConfig(
        dataset="embedded",
        prompt_column="prompt",
        lmbda=lmbda,
        max_new_tokens=args.max_new_tokens,
        gen_temperature=args.gen_temperature,
        max_seq_len=args.max_seq_len,
        per_device_batch_size=args.batch,
        max_steps=1_000_000 if not args.smoke else 1,
        lr=args.lr,
        lr_schedule="constant",
        warmup_steps=0,
        logging_steps=1,
        temperature=1.0,
        alpha_kl=1.0,
        lm_ce=0.0,
        fused_lm_head=True,
        seed=args.seed,
        export_formats=["safetensors"],
        **objective_for(args.beta),
    )


def evaluate_student(args, cfg, student, teacher, tok, eval_data) -> dict:
    from kd import evaluate, genquality
    from kd.rollout import GenSettings

    gen = GenSettings(args.max_new_tokens, args.gen_temperature, 1.0)
    prompts = genquality.heldout_prompts(cfg, tok, eval_data, n=args.n_prompts, seed=args.seed)
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=args.seed, batch_size=8)
    t0 = time.perf_counter()
    row = genquality.evaluate_model(student, teacher, prompts, gen, **kw)
    row["genquality_s"] = time.perf_counter() - t0  # what one row costs a job's report
    row.pop("greedy_ids")
    row["heldout_ppl"] = evaluate.perplexity(
        student, eval_data, batch_size=4, max_blocks=args.eval_blocks
    )
    return row


# ---------------------------------------------------------------------------------
# Children: one row each
# ---------------------------------------------------------------------------------
def child_ours(args) -> dict:
    from kd.train import setup, train

    cfg = make_config(args, ROWS[args.child])
    run = setup(cfg, kept_layers=args.kept)
    history: list[dict] = []
    run.cfg.logging_steps = 1  # an event per step: one history row each, and the clock

    def on_event(event) -> None:
        history.append(event.metrics)
        if time.perf_counter() - t0 > args.budget_s:
            run.cfg.max_steps = run.step  # the loop stops here: equal wall-clock budgets

    t0 = time.perf_counter()
    train(run, on_event)
    wall = time.perf_counter() - t0
    # rollout_s / train_s are logged only when the run generates (lmbda > 0): row a has none
    rollout = sum(h.get("rollout_s", 0.0) for h in history)
    step_s = sum(h.get("rollout_s", 0.0) + h.get("train_s", 0.0) for h in history)
    out = {
        "steps": len(history),
        "train_wall_s": wall,
        "steps_per_s": len(history) / wall,
        "rollout_share": rollout / step_s if step_s else 0.0,
        "last_loss": history[-1]["loss"],
    }
    out.update(evaluate_student(args, cfg, run.student, run.teacher, run.tokenizer, run.eval_data))
    return out


def child_trl(args) -> dict:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kd import models, prompts
    from kd.data import build_datasets
    from kd.student import derive_student

    cfg = make_config(args, args.trl_lmbda)
    teacher, tok = models.load_model_and_tokenizer(cfg.teacher_model)
    teacher.eval().requires_grad_(False)
    student = derive_student(teacher, args.kept)
    _, eval_data = build_datasets(cfg, tok)
    # The very tokens our rows train on: chat-formatted prompt + response + EOS, cut to
    # max_seq_len on the right (TRL's own collator would cut the prompt off the left).
    ps = prompts.load_prompt_set(cfg, tok, "train")
    ds = Dataset.from_list(
        [
            {
                "prompt": text,
                "input_ids": p + r,
                "completion_mask": [0] * len(p) + [1] * len(r),
            }
            for p, r, text in zip(ps.prompts, ps.responses, ps.texts, strict=True)
        ]
    )
    gen_s = [0.0]
    orig = GKDTrainer.generate_on_policy_outputs

    def timed(model, inputs, generation_config):
        t = time.perf_counter()
        try:
            return orig(model, inputs, generation_config)
        finally:
            gen_s[0] += time.perf_counter() - t

    GKDTrainer.generate_on_policy_outputs = staticmethod(timed)
    t0 = [0.0]

    class Budget(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            t0[0] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if time.perf_counter() - t0[0] > args.budget_s:
                control.should_training_stop = True

    targs = GKDConfig(
        output_dir=str(Path(args.work) / "trl"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=1 if args.smoke else 1_000_000,
        max_grad_norm=1.0,
        lmbda=args.trl_lmbda,
        beta=args.beta,
        temperature=args.gen_temperature,
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_seq_len,
        seq_kd=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
        bf16=False,
        fp16=False,
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=targs,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[Budget()],
    )
    trainer.train()
    wall = time.perf_counter() - t0[0]
    steps = trainer.state.global_step
    out = {
        "steps": steps,
        "train_wall_s": wall,
        "steps_per_s": steps / wall,
        "rollout_share": gen_s[0] / wall,
        "trl_version": trl.__version__,
    }
    out.update(evaluate_student(args, cfg, student, teacher, tok, eval_data))
    return out


def child_reference(args) -> dict:
    """The floor (teacher's own samples) and the ceiling (untrained student)."""
    from kd import models
    from kd.data import build_datasets
    from kd.student import derive_student

    cfg = make_config(args, 0.0)
    teacher, tok = models.load_model_and_tokenizer(cfg.teacher_model)
    teacher.eval()
    _, eval_data = build_datasets(cfg, tok)
    student = derive_student(teacher, args.kept)
    return {
        "teacher": evaluate_student(args, cfg, teacher, teacher, tok, eval_data),
        "untrained_student": evaluate_student(args, cfg, student, teacher, tok, eval_data),
    }


def run_child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.child == "ref":
        out = child_reference(args)
    elif args.child == "d":
        out = child_trl(args)
    else:
        out = child_ours(args)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------
def student_layers(args) -> list[int]:
    """The half-depth student's layers by block influence (the default selection; the
    uniform one starts at perplexity ~2.6M on the embedded corpus), chosen once and
    passed to every row so that all start from the same student."""
    from kd import models, student
    from kd.data import build_datasets

    teacher, tok = models.load_model_and_tokenizer("embedded:smollm2-135m")
    train_data, _ = build_datasets(make_config(args, 0.0), tok)
    calib = [train_data.batch([i, i + 1]) for i in (0, 2)]
    n = len(models.decoder_layers(teacher))
    influence = student.block_influence(teacher, calib)
    return student.select_layers("block_influence", n, n // 2, influence)


def spawn(args, row: str, kept: list[int]) -> dict:
    python = args.trl_python if row == "d" else sys.executable
    cmd = [python, str(Path(__file__).resolve()), "--child", row, "--kept-json", json.dumps(kept)]
    cmd += sys.argv[1:]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"error": f"row {row} exited {proc.returncode}: {tail}"}
    out = json.loads(lines[-1][len("RESULT ") :])
    out["process_s"] = time.perf_counter() - t
    return out


def table(results: dict) -> str:
    head = (
        "| row | steps | steps/s | rollout share | peak RSS MB | reverse KL | teacher NLL | "
        "held-out ppl | distinct-2 | repeated 4-grams |\n|---|---:|---:|---:|---:|---:|---:|"
        "---:|---:|---:|"
    )
    lines = [head]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]!r} |")
            continue
        lines.append(
            f"| {name} | {r.get('steps', '-')} | {r.get('steps_per_s', float('nan')):.3f} | "
            f"{r.get('rollout_share', float('nan')):.2f} | {r.get('peak_rss_mb', 0):.0f} | "
            f"{r['reverse_kl']:.3f} | {r['teacher_nll']:.3f} | {r['heldout_ppl']:.2f} | "
            f"{r['distinct_2']:.3f} | {r['repeat_4gram']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    ap.add_argument("--budget-s", type=float, default=600.0, help="training wall-clock per row")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.5, help="GKD's β (0: forward, 1: reverse KL)")
    ap.add_argument("--gen-temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--trl-lmbda", type=float, default=1.0)
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reference", action="store_true", help="skip teacher / untrained rows")
    ap.add_argument("--smoke", action="store_true", help="1 step per row, tiny evaluation")
    ap.add_argument("--trl-python", default="/work/venv-bench/bin/python")
    ap.add_argument("--work", default="/tmp/on_policy_bench")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kept-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.n_prompts, args.eval_blocks, args.max_new_tokens = 2, 1, min(args.max_new_tokens, 8)
    if args.child:
        args.kept = json.loads(args.kept_json)
        run_child(args)
        return
    kept = student_layers(args)
    results: dict[str, dict] = {}
    if not args.no_reference:
        ref = spawn(args, "ref", kept)
        results.update({k: v for k, v in ref.items() if k in ("teacher", "untrained_student")})
        if "error" in ref:
            results["reference"] = ref
    for row in args.rows.split(","):
        label = f"{row} (TRL lmbda={args.trl_lmbda})" if row == "d" else f"{row} lmbda={ROWS[row]}"
        results[label] = spawn(args, row, kept)
        print(label, json.dumps(results[label])[:400], flush=True)
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "threads": args.threads,
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "kept_json")},
        "kept_layers": kept,
    }
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
