"""Cached exact-mode teacher signal vs the live teacher, side by side in one run.

Arms, each in its own process (so peak RSS is its own), run interleaved
(build, live, cache, live, cache: A B A B), with `uptime` recorded before each:

  build  loads the teacher; over the same batches alternates a plain batched teacher
         forward (the hidden state discarded) with the cache build of kd.teacher_signal.
         compute_signal (forward + fp16 + np.savez to disk): teacher tokens/s of both,
         and bytes per token on disk. Saves the derived student and the cache files.
  live   teacher + student loaded; each step runs the teacher forward (kd's fused path)
  cache  student + the teacher's LM head only (read from its safetensors, the body is
         never loaded); each step reads the cached fp16 hidden state instead

Reported: median step time and tokens/s of each arm (ratio: target >= 1.3x), the whole
process's peak RSS (target: lower by at least the teacher body's size), the KD loss on
the first batch before any update (target: within 1e-3 relative), build vs plain
forward tokens/s (target: within 15%), bytes per token on disk.

    python bench/teacher_cache.py --batch 8 --seq 256 --steps 3
    python bench/teacher_cache.py --wide 3 --steps 2   # a 3x wider random-weight teacher
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _blocks(args, tok):
    from kd.config import DistillConfig
    from kd.data import pack
    from kd.sources import load_documents

    packed = pack(load_documents(DistillConfig(dataset=args.dataset)), tok, args.seq)
    n = args.batch * (args.steps + 1)
    return [packed.batch(list(range(i, i + args.batch))) for i in range(0, n, args.batch)]


def _teacher_folder(args, work: Path) -> str:
    """The teacher: the given one, or a random-weight one `wide` times wider."""
    from kd.models import local_folder

    folder = local_folder(args.teacher)
    if args.wide <= 1:
        return folder
    out = work / f"teacher-x{args.wide}"
    if not (out / "config.json").is_file():
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        c = AutoConfig.from_pretrained(folder)
        c.hidden_size *= args.wide
        c.intermediate_size *= args.wide
        c.num_attention_heads *= args.wide
        c.num_key_value_heads *= args.wide
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(c).save_pretrained(out)
        AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return str(out)


def arm_build(args, work: Path) -> dict:
    from kd import models
    from kd import student as kd_student
    from kd.teacher_signal import compute_signal

    teacher, tok = models.load_model_and_tokenizer(args.teacher_folder)
    teacher.eval().requires_grad_(False)
    if not (work / "student" / "config.json").is_file():  # the default derived student
        base = teacher if args.wide <= 1 else models.load_model_and_tokenizer(args.teacher)[0]
        n = len(models.decoder_layers(base))
        keep = kd_student.uniform_layers(n, n // 2)
        kd_student.derive_student(base, keep).save_pretrained(work / "student")
        tok.save_pretrained(work / "student")
        del base
    fwd = models.DistillForward(teacher)
    plain, build, size, tokens = [], [], 0, 0
    for i, b in enumerate(_blocks(args, tok)):
        ids, mask = b["input_ids"], b["attention_mask"]
        for which in ("plain", "build") if i % 2 == 0 else ("build", "plain"):
            t0 = time.perf_counter()
            if which == "plain":
                with torch.no_grad():
                    fwd(ids, mask, fused_lm_head=True)
                plain.append(time.perf_counter() - t0)
                continue
            arrays = compute_signal(fwd, ids, mask, "exact", 0, 1.0)
            buf = io.BytesIO()
            np.savez(buf, block=np.arange(i * args.batch, (i + 1) * args.batch), **arrays)
            (work / f"part-{i:05d}.npz").write_bytes(buf.getvalue())
            build.append(time.perf_counter() - t0)
            size += buf.getbuffer().nbytes
        tokens += int(mask.sum())
    per_batch = tokens / len(build)
    n_t = models.count_params(teacher)
    head = teacher.get_output_embeddings().weight.numel()
    return {
        "plain_tokens_per_s": per_batch / statistics.median(plain),
        "build_tokens_per_s": per_batch / statistics.median(build),
        "bytes_per_token": size / tokens,
        "teacher_params": n_t,
        "teacher_body_bytes": (n_t - head) * 4,
    }


def _head_weight(folder: str) -> torch.Tensor:
    """The teacher's LM head read from its safetensors alone (tied: the embedding)."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        name = "lm_head.weight" if "lm_head.weight" in names else "model.embed_tokens.weight"
        return f.get_tensor(name).float()


def arm_train(args, work: Path, cached: bool) -> dict:
    from kd import models, teacher_signal
    from kd.losses import LossWeights

    torch.manual_seed(0)
    student, tok = models.load_model_and_tokenizer(str(work / "student"))
    s_fwd = models.DistillForward(student.train())
    if cached:
        head = _head_weight(args.teacher_folder)
    else:
        teacher, _ = models.load_model_and_tokenizer(args.teacher_folder)
        t_fwd = models.DistillForward(teacher.eval().requires_grad_(False))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    w = LossWeights(alpha_kl=1.0, lm_ce=1.0, temperature=2.0, loss_chunk_tokens=256)
    times, first = [], None
    for i, b in enumerate(_blocks(args, tok)):
        ids, mask = b["input_ids"], b["attention_mask"]
        t0 = time.perf_counter()
        if cached:
            with np.load(work / f"part-{i:05d}.npz") as z:
                signal = {"hidden": torch.from_numpy(z["hidden"])}
            t_logits, t_hidden, _ = teacher_signal.teacher_outputs(signal, head, "cpu")
        else:
            with torch.no_grad():
                t_logits, t_hidden, _ = t_fwd(ids, mask, fused_lm_head=True)
        s_logits, _, _ = s_fwd(ids, mask, fused_lm_head=True)
        loss, parts = teacher_signal.hybrid_loss(s_logits, t_logits, mask, w, input_ids=ids)
        del s_logits, t_logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        if first is None:
            first = {k: float(v) for k, v in parts.items()}
        gc.collect()
    tokens = args.batch * args.seq
    return {
        "step_s": statistics.median(times[1:] or times),
        "tokens_per_s": tokens / statistics.median(times[1:] or times),
        "peak_rss_mb": _vm_kb("VmHWM") / 1024,
        "first_batch": first,
    }


def arm_topk(args, work: Path) -> dict:
    """Top-k mode's quality cost on batch 0: the student's KD gradient from k + 1
    buckets against exact mode's (cosine and relative error), and both KD values."""
    from kd import models, teacher_signal
    from kd.losses import LossWeights
    from kd.teacher_signal import TeacherSignal

    student, tok = models.load_model_and_tokenizer(str(work / "student"))
    teacher, _ = models.load_model_and_tokenizer(args.teacher_folder)
    t_fwd = models.DistillForward(teacher.eval().requires_grad_(False))
    b = _blocks(args, tok)[0]
    ids, mask = b["input_ids"], b["attention_mask"]
    w = LossWeights(alpha_kl=1.0, temperature=2.0, loss_chunk_tokens=256)
    sig = teacher_signal.compute_signal(t_fwd, ids, mask, "topk", args.topk, w.temperature)
    top = TeacherSignal("topk", sig).take(list(range(len(ids))))
    exact = teacher_signal.compute_signal(t_fwd, ids, mask, "exact", 0, 1.0)
    head = t_fwd.head_weight()
    del t_fwd, teacher
    out, grads = {}, {}
    s_fwd = models.DistillForward(student.train())
    for mode, signal in (("exact", {"hidden": torch.from_numpy(exact["hidden"])}), ("topk", top)):
        s_fwd.zero_grad(set_to_none=True)
        t_logits, _, _ = teacher_signal.teacher_outputs(signal, head, "cpu")
        s_logits, _, _ = s_fwd(ids, mask, fused_lm_head=True)
        loss, parts = teacher_signal.hybrid_loss(s_logits, t_logits, mask, w, input_ids=ids)
        loss.backward()
        grads[mode] = torch.cat(
            [p.grad.flatten() for p in s_fwd.parameters() if p.grad is not None]
        )
        out[f"kd_{mode}"] = float(parts["kd"])
    g_e, g_t = grads["exact"], grads["topk"]
    out["grad_cosine"] = float(torch.nn.functional.cosine_similarity(g_e, g_t, dim=0))
    out["grad_rel_err"] = float((g_t - g_e).norm() / g_e.norm())
    out["k"] = args.topk
    return out


def child(args) -> None:
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    args.teacher_folder = _teacher_folder(args, work)
    if args.arm == "build":
        out = arm_build(args, work)
    elif args.arm == "topk":
        out = arm_topk(args, work)
    else:
        out = arm_train(args, work, cached=args.arm == "cache")
    print("RESULT " + json.dumps(out), flush=True)


def run_arm(arm: str, args, work: str) -> dict:
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    cmd = [sys.executable, __file__, "--arm", arm, "--work", work] + args.passthrough
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"arm {arm} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(line[-1][len("RESULT ") :])
    out["uptime"] = uptime.split("load average:")[-1].strip()
    print(f"  {arm:5s} done (load {out['uptime']})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="embedded:smollm2-135m")
    ap.add_argument("--dataset", default="embedded")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wide", type=int, default=1, help="random teacher this many x wider")
    ap.add_argument("--topk", type=int, default=64, help="k of the top-k quality arm; 0: skip")
    ap.add_argument("--arm", default=None)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    if args.arm:
        return child(args)
    keys = ("teacher", "dataset", "batch", "seq", "steps", "threads", "wide", "topk")
    args.passthrough = [x for k in keys for x in (f"--{k}", str(getattr(args, k)))]
    with tempfile.TemporaryDirectory() as work:
        build = run_arm("build", args, work)
        runs = {"live": [], "cache": []}
        for arm in ("live", "cache", "live", "cache"):
            runs[arm].append(run_arm(arm, args, work))
        topk = run_arm("topk", args, work) if args.topk else None
    report(args, build, runs, topk)


def report(args, build: dict, runs: dict, topk: dict | None) -> None:
    med = {a: statistics.median(r["step_s"] for r in rs) for a, rs in runs.items()}
    rss = {a: max(r["peak_rss_mb"] for r in rs) for a, rs in runs.items()}
    kd = {a: rs[0]["first_batch"]["kd"] for a, rs in runs.items()}
    loss = {a: rs[0]["first_batch"]["loss"] for a, rs in runs.items()}
    tok = args.batch * args.seq
    body_mib = build["teacher_body_bytes"] / 2**20
    loads = [r["uptime"] for rs in runs.values() for r in rs]
    print(f"\npython bench/teacher_cache.py {' '.join(args.passthrough)}")
    print(f"teacher {build['teacher_params'] / 1e6:.1f}M params (x{args.wide} wide), body")
    print(f"{body_mib:.0f} MiB; load averages per training arm: {loads}")
    print("| arm | step s (each run) | tokens/s | peak RSS MiB | KD loss batch 0 | loss |")
    print("|---|---|---|---|---|---|")
    for a, rs in runs.items():
        each = ", ".join(f"{r['step_s']:.2f}" for r in rs)
        row = [f"{med[a]:.2f} ({each})", f"{tok / med[a]:.0f}", f"{rss[a]:.0f}"]
        row += [f"{kd[a]:.6f}", f"{loss[a]:.6f}"]
        print(f"| {a} | " + " | ".join(row) + " |")
    kd_rel = abs(kd["cache"] - kd["live"]) / kd["live"]
    loss_rel = abs(loss["cache"] - loss["live"]) / loss["live"]
    ratio = build["build_tokens_per_s"] / build["plain_tokens_per_s"]
    print(f"\nthroughput cache/live: {med['live'] / med['cache']:.2f}x (target >= 1.3x)")
    print(f"peak RSS saved: {rss['live'] - rss['cache']:.0f} MiB (teacher body {body_mib:.0f} MiB)")
    print(f"KD loss relative difference {kd_rel:.2e}, total loss {loss_rel:.2e} (target 1e-3)")
    print(
        f"cache build {build['build_tokens_per_s']:.0f} teacher tokens/s vs plain forward "
        f"{build['plain_tokens_per_s']:.0f}: {ratio:.2f} (target >= 0.85); "
        f"{build['bytes_per_token']:.0f} bytes/token on disk"
    )
    if topk:
        print(
            f"top-k (k={topk['k']}) vs exact on batch 0: student KD-gradient cosine "
            f"{topk['grad_cosine']:.4f}, relative error {topk['grad_rel_err']:.3f}; KD "
            f"{topk['kd_topk']:.4f} (k+1 buckets) vs {topk['kd_exact']:.4f} (full vocabulary)"
        )
    print("RESULTS " + json.dumps({"build": build, "runs": runs, "topk": topk}))


if __name__ == "__main__":
    main()
