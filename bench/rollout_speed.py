"""Our sampling loop (kd.rollout._decode) against `model.generate` on the same prompts.

Both use the KV cache, the same left-padded batch and the same sampling settings; the
runs are interleaved (ours, HF, ours, HF, ...) so a noisy machine hurts both alike.
The first run of each is a warm-up and not counted.

    python bench/rollout_speed.py --batch 8 --new-tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from kd import models, student  # noqa: E402
from kd.prompts import embedded_heldout  # noqa: E402
from kd.rollout import GenSettings, generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", choices=("student", "teacher"), default="student")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher, tok = models.load_model_and_tokenizer("embedded:smollm2-135m")
    n = len(models.decoder_layers(teacher))
    lm = (
        teacher
        if args.model == "teacher"
        else student.derive_student(teacher, student.uniform_layers(n, n // 2))
    )
    lm.eval()
    prompts = embedded_heldout(tok).prompts[: args.batch]
    # min_new_tokens is not available in our loop: an EOS id that never occurs makes both
    # decode exactly new_tokens tokens, so the work is identical.
    gen = GenSettings(args.new_tokens, 1.0, 1.0)
    times: dict[str, list[float]] = {"ours": [], "hf_generate": []}
    for r in range(args.repeats + 1):
        for name in times:
            g = torch.Generator().manual_seed(r)
            t = time.perf_counter()
            b = generate(
                lm,
                prompts,
                gen,
                eos_id=-1,
                pad_id=tok.pad_token_id,
                generator=g,
                use_hf_generate=name == "hf_generate",
            )
            dt = time.perf_counter() - t
            assert int(b["loss_mask"].sum()) == args.batch * args.new_tokens
            if r:
                times[name].append(dt)
    tokens = args.batch * args.new_tokens
    out = {
        k: {"median_s": statistics.median(v), "tokens_per_s": tokens / statistics.median(v)}
        for k, v in times.items()
    }
    out["settings"] = vars(args)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
