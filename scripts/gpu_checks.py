"""GPU checks for fp16 loss scaling, exact resume on CUDA and bf16 (issue 16, item 12).

    python scripts/gpu_checks.py                 # on a CUDA machine: about a minute
    python scripts/gpu_checks.py --device cpu    # the checks that run without a GPU

Prints one line per check, PASS / FAIL / SKIP with its numbers, and exits 1 when any
check fails. The models are tiny (a 4-layer, 64-wide Llama on the SmolLM2 tokenizer and
the embedded corpus), so nothing is downloaded.

1. fp16_underflow   a loss whose gradients (2^-30) are below fp16's smallest subnormal
                    (2^-24): under fp16 autocast they are all zero without a GradScaler
                    and match the fp32 reference with one (runs on CPU too).
2. fp16_training    precision=fp16 turns the run's GradScaler on; a few steps give finite
                    losses, a non-zero grad norm and loss_scale in the metrics; the
                    scale comes back from a checkpoint file.
3. resume_exact     lora_dropout=0.1: 6 steps straight equal 3 steps, a checkpoint file,
                    a fresh Run loaded from it and 3 more steps, loss for loss. On CUDA
                    a control resumes without the CUDA RNG state and must differ (the
                    check sees the dropout masks).
4. bf16             precision=bf16: the student's logits are bf16 under the run's
                    autocast and a few steps give finite losses.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import traceback
from pathlib import Path

# cuBLAS is deterministic only with a fixed workspace; set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kd import state as kd_state  # noqa: E402
from kd.config import DistillConfig  # noqa: E402
from kd.train import on_log, setup, train  # noqa: E402


class Skip(Exception):
    """The check needs something this machine lacks."""


def tiny_teacher(folder: Path) -> Path:
    """The suite's tiny teacher (tests/conftest.py): a 4-layer, 64-wide Llama with the
    SmolLM2 tokenizer from the shipped GGUF, so the GPU checks run the tested model."""
    from transformers import AutoTokenizer

    from kd.models import local_folder
    from tests.conftest import make_tiny_llama

    tok = AutoTokenizer.from_pretrained(local_folder("embedded:smollm2-135m"))
    return make_tiny_llama(folder, tok)


def job(args: argparse.Namespace, **kw) -> DistillConfig:
    body = dict(
        teacher_model=str(args.teacher),
        dataset=args.dataset,
        max_seq_len=32,
        per_device_batch_size=4,
        student_layers=2,
        max_steps=6,
        warmup_steps=1,
        logging_steps=1,
        lr=3e-3,
        save_every=0,
        eval_every=0,
        max_eval_blocks=2,
        export_onnx=False,
        post_training_quant=False,
        use_gpu=args.device == "cuda",
    )
    return DistillConfig.model_validate(body | kw)


def losses(run) -> list[float]:
    logged: list[dict] = []
    train(run, on_log(logged.append))
    return [m["loss"] for m in logged]


def check_fp16_underflow(args: argparse.Namespace) -> str:
    dev = args.device
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64).to(dev)
    x = torch.randn(8, 64, device=dev)
    opt = torch.optim.SGD(lin.parameters(), lr=0.0)
    ref = (x.sum(0) * 2.0**-30).expand(64, 64)  # d(sum(W x + b) * 2^-30) / dW in fp32
    grads = {}
    for scaled in (False, True):
        scaler = torch.amp.GradScaler(dev, enabled=scaled)
        lin.zero_grad()
        with torch.autocast(dev, dtype=torch.float16):
            y = lin(x)
        scaler.scale(y.float().sum() * 2.0**-30).backward()
        scaler.unscale_(opt)
        grads[scaled] = lin.weight.grad.detach().clone()
    rel = float((grads[True] - ref).abs().max() / ref.abs().max())
    msg = f"max |grad| without scaler {grads[False].abs().max():.1e}, with: rel err {rel:.1e}"
    assert float(grads[False].abs().max()) == 0.0 and rel < 1e-2, msg
    return msg


def check_fp16_training(args: argparse.Namespace) -> str:
    if args.device != "cuda":
        raise Skip("fp16 autocast runs only with use_gpu (CUDA)")
    run = setup(job(args, precision="fp16", max_steps=4), device="cuda")
    assert run.scaler.is_enabled(), "precision=fp16 on CUDA but the GradScaler is off"
    logged: list[dict] = []
    train(run, on_log(logged.append))
    assert all(math.isfinite(m["loss"]) for m in logged), logged
    assert any(m["grad_norm"] > 0 for m in logged) and "loss_scale" in logged[-1], logged
    with tempfile.TemporaryDirectory() as d:
        kd_state.save(kd_state.state_dict(run), d)
        back = kd_state.load(d)["scaler"]
    assert back["scale"] == run.scaler.get_scale(), (back, run.scaler.get_scale())
    return f"losses {[round(m['loss'], 3) for m in logged]}, loss_scale {back['scale']:.0f}"


def check_resume_exact(args: argparse.Namespace) -> str:
    dev = args.device
    cfg = job(args, lora_r=4, lora_dropout=0.1, precision="fp32")
    straight = losses(setup(cfg, device=dev))
    first = setup(cfg, device=dev)
    first.cfg = cfg.model_copy(update={"max_steps": 3})  # stop early, same schedule
    head = losses(first)
    with tempfile.TemporaryDirectory() as d:
        kd_state.save(kd_state.state_dict(first), d)
        saved = kd_state.load(d)
    resumed = setup(cfg, device=dev, kept_layers=saved["kept_layers"])
    kd_state.load_state_dict(resumed, saved)
    tail = losses(resumed)
    msg = f"straight {straight}, resumed {head + tail}"
    if head + tail != straight:
        again = losses(setup(cfg, device=dev))  # tell a resume bug from kernel noise
        noise = "; two straight runs differ too: nondeterministic kernels" * (again != straight)
        raise AssertionError("resumed losses differ: " + msg + noise)
    if dev != "cuda":
        return msg + " (no CUDA RNG on CPU)"
    saved["rng"]["cuda"] = None  # control: the same resume without the CUDA RNG state
    control = setup(cfg, device=dev, kept_layers=saved["kept_layers"])
    kd_state.load_state_dict(control, saved)
    assert losses(control) != tail, "the check cannot see the dropout masks"
    return msg + "; without the CUDA RNG state the losses differ"


def check_bf16(args: argparse.Namespace) -> str:
    if args.device != "cuda":
        raise Skip("bf16 autocast runs only with use_gpu (CUDA)")
    run = setup(job(args, precision="bf16", max_steps=3), device="cuda")
    ids = run.train_data.batch([0, 1])["input_ids"].to("cuda")
    with run.autocast:
        dtype = run.student(input_ids=ids).logits.dtype
    assert dtype == torch.bfloat16 and not run.scaler.is_enabled(), (dtype, run.scaler)
    logged = losses(run)
    assert all(math.isfinite(v) for v in logged), logged
    return f"logits {dtype}, losses {[round(v, 3) for v in logged]}"


CHECKS = {
    "fp16_underflow": check_fp16_underflow,
    "fp16_training": check_fp16_training,
    "resume_exact": check_resume_exact,
    "bf16": check_bf16,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", choices=("cuda", "cpu"), default=default)
    ap.add_argument("--teacher", default="", help="teacher folder (default: a tiny Llama)")
    ap.add_argument("--dataset", default="embedded")
    ap.add_argument("--only", nargs="*", choices=list(CHECKS), help="run only these")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        # warn, not raise, on an op without a deterministic kernel: check 3 says if
        # two straight runs differ
        torch.use_deterministic_algorithms(True, warn_only=True)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        if not args.teacher:
            args.teacher = tiny_teacher(Path(tmp) / "teacher")
        for name in args.only or CHECKS:
            try:
                print(f"PASS {name}: {CHECKS[name](args)}", flush=True)
            except Skip as e:
                print(f"SKIP {name}: {e}", flush=True)
            except Exception as e:  # a check that breaks is a failed check
                failed += 1
                print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc()
    print(f"{'FAIL' if failed else 'PASS'}: {failed} of the checks failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
