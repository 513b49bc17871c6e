"""Deployable formats of one student: size, quality and batch-1 generation speed.

For a student folder (Hugging Face Llama) and a held-out text, writes every format and
measures each against the fp32 PyTorch student on the same held-out blocks:
size and ratio to the fp32 safetensors, perplexity (and ratio to the student's), top-1
agreement, max |Δlogit|; for ONNX Runtime GenAI also greedy tokens/s at batch 1 with
og's generator against PyTorch eager `generate` (KV cache) on the same machine, and how
often the two greedy continuations agree.

GGUF files are read back with transformers' GGUF loader (no llama.cpp here, so no
GGUF tokens/s). Quick run (about 5 minutes on 2 busy cores):

    python bench/formats.py --student ~/.cache/llm2slm/gguf/SmolLM2-135M-Instruct.Q4_1-* \
        --text ../shared/data/wikitext-2/valid.txt --blocks 8 --block-len 256 \
        --prompts 2 --new-tokens 32 --log bench/results/formats_$(date +%F).log

Full run on a quiet machine: --blocks 32 --prompts 8 --new-tokens 128. Formats are
gguf-<f32|f16|bf16|q8_0|q5_0|q5_1|q4_0|q4_1> and genai-<fp32|int8|int4> (or the job's
ort-genai-<...>). --student takes any student folder, e.g. runs/default/student of
`make demo` (a bf16/fp16 folder is read in fp32: the reference is what was saved).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from kd.exports import gguf as kgguf  # noqa: E402
from kd.exports import ort_genai  # noqa: E402
from kd.exports.parity import memoized, torch_logits  # noqa: E402

# the artifacts that meet (or test) the issue's targets first, so a cut run has them
DEFAULT_FORMATS = [
    "gguf-q8_0", "gguf-q4_0", "genai-int4", "gguf-f16", "genai-int8", "genai-fp32",
]  # fmt: skip


def eval_blocks(tokenizer, text_file: Path, n: int, length: int) -> torch.Tensor:
    """The first n·length tokens of the text as [n, length] contiguous blocks."""
    text = text_file.read_text(encoding="utf-8")
    ids = tokenizer(text[: n * length * 12])["input_ids"]
    if len(ids) < n * length:
        raise SystemExit(f"{text_file} has {len(ids)} tokens; need {n * length}")
    return torch.tensor(ids[: n * length]).view(n, length)


def prompts_from(blocks: torch.Tensor, count: int, length: int = 32) -> list[torch.Tensor]:
    return [blocks[i % len(blocks), :length] for i in range(count)]


def run_format(fmt, args, student, ref, blocks, prompts, fp32_bytes, work: Path) -> dict:
    kind, variant = fmt.removeprefix("ort-").split("-", 1)  # the job's names work too
    t0 = time.perf_counter()
    if kind == "gguf":
        path = kgguf.write_gguf(args.student, work / f"student-{variant}.gguf", variant)
        t_export = time.perf_counter() - t0
        row = kgguf.check_gguf(path, ref, blocks, fp32_bytes=fp32_bytes)
    elif kind == "genai":
        path = ort_genai.build_genai(args.student, work / f"genai-{variant}", variant)
        t_export = time.perf_counter() - t0
        row = ort_genai.check_genai(path, ref, blocks, fp32_bytes=fp32_bytes)
        if args.prompts:
            lm = ort_genai.GenAILM(path)
            row |= ort_genai.generation_speed(student, lm, prompts, args.new_tokens)
            del lm
    else:
        raise SystemExit(f"unknown format {fmt}; known: {DEFAULT_FORMATS}")
    t_total = time.perf_counter() - t0
    return {"name": fmt, "export_s": round(t_export, 1), "total_s": round(t_total, 1), **row}


def log_line(log: Path | None, line: str) -> None:
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(line + "\n")


def fmt_row(r: dict) -> str:
    def f(key, spec):
        v = r.get(key)
        return format(v, spec) if isinstance(v, int | float) else "-"

    return (
        f"| {r['name']} | {r['bytes'] / 1e6:.1f} | {f('size_ratio_fp32', '.3f')} | "
        f"{f('ppl', '.3f')} | {f('ppl_ratio', '.4f')} | {f('top1_agreement', '.4f')} | "
        f"{f('max_abs_logit_diff', '.4g')} | {f('tokens_per_s', '.1f')} | "
        f"{f('torch_tokens_per_s', '.1f')} | {f('speedup_vs_torch', '.2f')} | "
        f"{f('greedy_match', '.3f')} | {r['export_s']} |"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--student", required=True, help="Hugging Face Llama folder")
    ap.add_argument("--text", required=True, type=Path, help="held-out text file")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--block-len", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=2, help="generation prompts (0: skip)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-formats"))
    ap.add_argument("--log", type=Path, help="append the JSON rows and the table here")
    ap.add_argument("--keep", action="store_true", help="keep the written artifacts")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(args.student)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32).eval()
    fp32_bytes = sum(p.numel() * 4 for p in student.parameters())  # tied weights once
    blocks = eval_blocks(tok, args.text, args.blocks, args.block_len)
    prompts = prompts_from(blocks, args.prompts)
    ref = memoized(torch_logits(student))  # the fp32 student runs once for all formats
    args.work.mkdir(parents=True, exist_ok=True)
    header = {
        "bench": "formats",
        "student": str(args.student),
        "params": sum(p.numel() for p in student.parameters()),
        "fp32_bytes": fp32_bytes,
        "eval": f"{args.blocks}x{args.block_len} tokens of {args.text}",
        "generation": f"{args.prompts} prompts x {args.new_tokens} new tokens, batch 1",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads "
        f"{torch.get_num_threads()}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    lines = [json.dumps(header)]
    print(lines[0], flush=True)
    log_line(args.log, lines[0])
    rows = []
    for fmt in args.formats:
        try:
            row = run_format(fmt, args, student, ref, blocks, prompts, fp32_bytes, args.work)
        except Exception as e:  # one failing format must not hide the others
            row = {"name": fmt, "error": f"{type(e).__name__}: {e}"[:2000]}
        rows.append(row)
        lines.append(json.dumps(row, default=str))
        print(lines[-1], flush=True)
        log_line(args.log, lines[-1])  # each row as soon as it exists: a long run can be cut
        gc.collect()
    table = [
        "| format | MB | ×fp32 | ppl | ppl/fp32 | top-1 agr. | max abs dlogit | tok/s | "
        "torch tok/s | speed-up | greedy match | export s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    table += [fmt_row(r) for r in rows if "error" not in r]
    table += [f"| {r['name']} | error: {r['error'][:200]} |" for r in rows if "error" in r]
    print("\n".join(table))
    log_line(args.log, "\n" + "\n".join(table) + "\n")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
