"""Time one full KD training step: teacher forward, student forward + backward, AdamW.

Implementations, each run in its own process (so peak RSS is its own):
  ours        kd's path: teacher under no_grad asking only for its last hidden state,
              packed blocks, both LM heads inside the chunked closed-form-gradient
              vocabulary terms (kd.losses.fused_vocab_terms): no [B, L, V] tensor at all
  ours_unfused  the same with materialized [B, L, V] logits of both models fed to the
              chunked terms (kd with fused_lm_head=false)
  ref_packed  the obvious loop on the same packed blocks: all hidden states and
              attentions from both models (eager attention), full-vocabulary fp32
              softmax / log_softmax on [B, L, V]
  ref_padded  the same reference on wikitext-style documents padded to the longest in
              the batch (the original service's behaviour); only real tokens count

    python bench/kd_step.py --batch 8 --seq 256 --steps 3
    python bench/kd_step.py --batch 8 --seq 1024 --steps 1 --impls ours

Prints a table: median step time, real tokens/s, peak memory, MFU =
(6·N_student + 2·N_teacher) × tokens/s / matmul peak. Memory on CPU is given twice:
the process's peak RSS (includes loading the models) and the peak RSS during the
training steps alone (VmHWM reset through /proc/self/clear_refs after loading). The
matmul peak is measured once, in the parent, before any model is loaded, with the same
thread count as the children (best of several runs of a 2048³ fp32 matmul).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CHUNK = 256  # kd.config.DistillConfig.loss_chunk_tokens' default
IMPLS = ("ours", "ours_unfused", "ref_packed", "ref_padded")


def matmul_peak(device: torch.device, n: int = 2048, reps: int = 10, rounds: int = 5) -> float:
    """Best-of-`rounds` fp32 (on GPU: bf16) matmul FLOP/s: the MFU denominator."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def load_models(args, eager: bool):
    from kd import models
    from kd import student as kd_student

    teacher, tok = models.load_model_and_tokenizer(
        args.teacher, attn_implementation="eager" if eager else None
    )
    n = len(models.decoder_layers(teacher))
    student = kd_student.derive_student(teacher, kd_student.uniform_layers(n, args.student_layers))
    if eager:
        models.set_eager_attention(student)
    teacher.eval().requires_grad_(False)
    return teacher, student.train(), tok


def batches(args, tok, padded: bool):
    from kd.config import DistillConfig
    from kd.data import load_documents, pack

    docs = load_documents(DistillConfig(dataset=args.dataset))
    if not padded:
        packed = pack(docs, tok, args.seq)
        for i in range(0, len(packed) - args.batch + 1, args.batch):
            yield packed.batch(list(range(i, i + args.batch)))
        return
    # one document (wikitext line / paragraph) per row, padded to the longest in the batch
    tok.padding_side = "right"
    for i in range(0, len(docs) - args.batch + 1, args.batch):
        enc = tok(
            docs[i : i + args.batch],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=args.seq,
        )
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def ours_step(teacher_fwd, student_fwd, opt, batch, weights, lazy: bool):
    from kd.losses import hybrid_loss

    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        t_logits, t_hidden, _ = teacher_fwd(ids, mask, fused_lm_head=lazy)
    s_logits, s_hidden, _ = student_fwd(ids, mask, fused_lm_head=lazy)
    loss, _ = hybrid_loss(
        s_logits, t_logits, mask, weights, student_hidden=s_hidden, teacher_hidden=t_hidden
    )
    del s_logits, t_logits  # as kd.step does: not alive during backward
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def ref_step(teacher, student, opt, batch, T=2.0, alpha=1.0, beta=0.1, delta=0.1):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        t_out = teacher(
            input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True
        )
    s_out = student(
        input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True
    )
    s_logits, t_logits = s_out.logits[:, :-1].float(), t_out.logits[:, :-1].float()
    tm = (mask[:, :-1] * mask[:, 1:]).float()
    n = tm.sum()
    s_logp = F.log_softmax(s_logits / T, dim=-1)
    t_p = F.softmax(t_logits / T, dim=-1)
    t_logp = F.log_softmax(t_logits / T, dim=-1)
    kl = ((t_p * (t_logp - s_logp)).sum(-1) * tm).sum() / n * T * T
    ce = (
        F.cross_entropy(s_logits.transpose(1, 2), t_logits.argmax(-1), reduction="none") * tm
    ).sum() / n
    hs, ht = s_out.hidden_states[-1], t_out.hidden_states[-1]
    cos = ((1 - F.cosine_similarity(hs, ht, dim=-1)) * mask).sum() / mask.sum()
    loss = alpha * kl + beta * ce + delta * cos
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_one(args) -> dict:
    from kd import models
    from kd.losses import LossWeights

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    impl = args.impls[0]
    ours = impl.startswith("ours")
    teacher, student, tok = load_models(args, eager=not ours)
    teacher.to(device)
    student.to(device)
    n_t, n_s = models.count_params(teacher), models.count_params(student)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    if ours:
        weights = LossWeights(
            alpha_kl=1.0, beta_ce=0.1, delta_cos=0.1, temperature=2.0, loss_chunk_tokens=args.chunk
        )
        t_fwd, s_fwd = models.DistillForward(teacher), models.DistillForward(student)

        def step(b):
            with autocast:
                ours_step(t_fwd, s_fwd, opt, b, weights, lazy=impl == "ours")
    else:

        def step(b):
            with autocast:
                ref_step(teacher, student, opt, b)

    times, tokens = [], []
    it = batches(args, tok, padded=impl == "ref_padded")
    rss_loaded = _vm_kb("VmRSS") * 1024
    reset_peak_rss()
    for i in range(args.warmup + args.steps):
        b = {k: v.to(device) for k, v in next(it).items()}
        t0 = time.perf_counter()
        step(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(int(b["attention_mask"].sum()))
    med = statistics.median(times)
    tok_s = statistics.median(t / s for t, s in zip(tokens, times, strict=True))
    step_peak = _vm_kb("VmHWM") * 1024
    peak = args.peak_gflops * 1e9 if args.peak_gflops else matmul_peak(device)
    mem = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "impl": impl,
        "device": str(device),
        "batch": args.batch,
        "seq": args.seq,
        "step_s": med,
        "real_tokens_per_s": tok_s,
        "peak_mem_gb": mem / 1e9,
        "step_peak_rss_gb": step_peak / 1e9 if device.type == "cpu" else None,
        "rss_after_load_gb": rss_loaded / 1e9 if device.type == "cpu" else None,
        "threads": torch.get_num_threads(),
        "mfu": (6 * n_s + 2 * n_t) * tok_s / peak,
        "matmul_peak_gflops": peak / 1e9,
        "n_teacher": n_t,
        "n_student": n_s,
        "real_tokens_per_step": statistics.mean(tokens),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="embedded:smollm2-135m")
    ap.add_argument("--dataset", default="embedded")
    ap.add_argument("--student-layers", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=CHUNK, help="loss chunk (kd's default)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--peak-gflops", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args)))
        return
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_peak(device, reps=20)  # once, before any model exists
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for impl in args.impls:  # each in a fresh process: peak RSS is per implementation
        cmd = [sys.executable, __file__, "--child", "--impls", impl] + [
            a for a in sys.argv[1:] if a not in args.impls and a != "--impls"
        ]
        cmd += ["--peak-gflops", str(peak / 1e9)]
        root = str(Path(__file__).resolve().parents[1])  # kd importable without installing
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        }
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{impl} failed:\n{proc.stderr[-3000:]}")
        out = proc.stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| impl | B×L | step s | real tokens/s | peak mem GB (process) "
        "| peak RSS GB (steps) | MFU |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        steps = f"{r['step_peak_rss_gb']:.2f}" if r["step_peak_rss_gb"] else "-"
        print(
            f"| {r['impl']} | {r['batch']}×{r['seq']} | {r['step_s']:.2f} | "
            f"{r['real_tokens_per_s']:.1f} | {r['peak_mem_gb']:.2f} | {steps} | {r['mfu']:.1%} |"
        )
    print(
        f"\nmatmul peak {rows[0]['matmul_peak_gflops']:.0f} GFLOP/s on {rows[0]['device']}; "
        f"N_teacher={rows[0]['n_teacher']:,} N_student={rows[0]['n_student']:,}"
    )


if __name__ == "__main__":
    main()
