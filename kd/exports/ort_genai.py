"""ONNX Runtime GenAI models of the student: KV-cached generation, weight-only INT4/INT8.

`build_genai(student_folder, out_dir, precision)` runs the `onnxruntime-genai` model
builder (`python -m onnxruntime_genai.models.builder`, its documented entry point) for
the CPU execution provider. The output folder (`model.onnx`, `model.onnx.data`,
`genai_config.json`, tokenizer files) is what `og.Model(folder)` loads.

Precisions: `fp32`; `int4` and `int8` are weight-only block-wise MatMulNBits
quantization with the builder's default algorithm (RTN, block 32, symmetric; on CPU the
activations of those MatMuls are quantized to int8, the builder's default accuracy
level 4). At int4 a tied embedding is shared with the LM head (GatherBlockQuantized) and
stored once; GatherBlockQuantized is INT4-only, so int8 keeps an fp32 embedding beside
an INT8 head (larger than one would expect of "int8").

The builder runs in a subprocess: it imports its own torch/transformers model, holds
the whole checkpoint in memory while it writes, and its failure then comes back as one
error with its last output lines.

`GenAILM(folder)` runs the artifact with og's own runtime: full-sequence logits for
parity (`og.Generator.get_output("logits")` after a prefill), greedy generation and
tokens/s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kd.exports.common import ExportError, ExportRequest, Writer
from kd.exports.parity import BlockLogits, artifact_row, parity, reference_logits

GENAI_PRECISIONS = ("fp32", "int8", "int4")


class GenAIExportError(RuntimeError):
    """The GenAI model builder failed; the message carries its last lines of output."""


def build_genai(
    student_folder: str | Path,
    out_dir: str | Path,
    precision: str = "int4",
    *,
    extra_options: dict[str, str] | None = None,
    cache_dir: str | Path | None = None,
    timeout_s: float = 3600,
) -> Path:
    """Build an onnxruntime-genai CPU model folder from a Hugging Face student folder."""
    if precision not in GENAI_PRECISIONS:
        raise GenAIExportError(f"precision '{precision}' is not one of {list(GENAI_PRECISIONS)}")
    out_dir = Path(out_dir)
    cache = Path(cache_dir) if cache_dir else out_dir.with_name(out_dir.name + ".cache")
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(Path(student_folder).resolve()),
        "-o", str(out_dir),
        "-p", precision,
        "-e", "cpu",
        "-c", str(cache),
    ]  # fmt: skip
    if extra_options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise GenAIExportError(f"onnxruntime-genai builder ran past {timeout_s:.0f} s") from e
    finally:
        _rmtree(cache)
    if proc.returncode != 0 or not (out_dir / "genai_config.json").is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise GenAIExportError(
            f"onnxruntime-genai builder ({precision}) failed with exit code {proc.returncode}:\n"
            f"{tail}"
        )
    return out_dir


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class GenAILM:
    """An onnxruntime-genai model folder, run with og's generator."""

    def __init__(self, folder: str | Path):
        import onnxruntime_genai as og

        self.og = og
        self.folder = Path(folder)
        self.model = og.Model(str(self.folder))

    def _generator(self, max_length: int, min_length: int = 0):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, min_length=min_length, do_sample=False)
        return self.og.Generator(self.model, params)

    @torch.no_grad()
    def __call__(self, ids: Tensor) -> Tensor:
        """Logits [B, L, V] of full blocks, one prefill per row (batch 1, as deployed)."""
        rows = []
        for row in ids.cpu().numpy().astype(np.int32):
            g = self._generator(max_length=len(row) + 1)
            g.append_tokens(row[None])
            rows.append(torch.from_numpy(np.array(g.get_output("logits"), dtype=np.float32)))
            del g
        return torch.cat(rows, 0)

    def generate(self, prompt: Tensor, new_tokens: int) -> tuple[list[int], float]:
        """Greedy continuation of `prompt` [L] for exactly `new_tokens`; (tokens, seconds)."""
        p = prompt.cpu().numpy().astype(np.int32)[None]
        total = p.shape[1] + new_tokens
        start = time.perf_counter()
        g = self._generator(max_length=total, min_length=total)
        g.append_tokens(p)
        while not g.is_done():
            g.generate_next_token()
        seconds = time.perf_counter() - start
        seq = list(g.get_sequence(0))[p.shape[1] :]
        return seq, seconds


@torch.no_grad()
def torch_generate(model: nn.Module, prompt: Tensor, new_tokens: int) -> tuple[list[int], float]:
    """PyTorch eager greedy generation with the KV cache; (new tokens, seconds)."""
    ids = prompt[None].long()
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=model.config.eos_token_id,
    )
    return out[0, ids.shape[1] :].tolist(), time.perf_counter() - start


def greedy_match(a: list[int], b: list[int]) -> float:
    """Fraction of positions where two greedy continuations agree."""
    n = min(len(a), len(b))
    return sum(x == y for x, y in zip(a[:n], b[:n], strict=True)) / max(n, 1)


def generation_speed(
    model: nn.Module, lm: GenAILM, prompts: list[Tensor], new_tokens: int = 64
) -> dict[str, float]:
    """Batch-1 greedy tokens/s of og's generator against PyTorch eager, and output match.

    One warm-up run each; tokens/s counts new tokens over wall time including prefill.
    """
    torch_generate(model, prompts[0], 4)
    lm.generate(prompts[0], 4)
    t_sec = g_sec = match = 0.0
    for p in prompts:
        t_tok, t = torch_generate(model, p, new_tokens)
        g_tok, g = lm.generate(p, new_tokens)
        t_sec, g_sec, match = t_sec + t, g_sec + g, match + greedy_match(t_tok, g_tok)
    n = new_tokens * len(prompts)
    return {
        "tokens_per_s": n / g_sec,
        "torch_tokens_per_s": n / t_sec,
        "speedup_vs_torch": t_sec / g_sec,
        "greedy_match": match / len(prompts),
    }


def check_genai(
    folder: str | Path,
    student: nn.Module | BlockLogits,
    blocks: Tensor,
    *,
    fp32_bytes: int | None = None,
) -> dict[str, object]:
    """Load the GenAI folder with og and compare with the PyTorch `student` on `blocks`."""
    lm = GenAILM(folder)
    row = parity(reference_logits(student), lm, blocks, batch_size=1)
    model_bytes = sum(f.stat().st_size for f in Path(folder).glob("model.onnx*"))
    return {
        "format": "ort-genai",
        **row,
        **artifact_row(folder, fp32_bytes),
        "model_bytes": model_bytes,
    }


# ---- the job's formats "ort-genai-<precision>": one folder each --------------------
def genai_dir(out: Path, precision: str) -> Path:
    return Path(out) / f"ort-genai-{precision}"


def writer(precision: str) -> Writer:
    """The export writer of format `ort-genai-<precision>`; built from the fp32 student
    (the builder quantizes from it), returns the model folder."""

    def write(req: ExportRequest) -> Path:
        try:
            return build_genai(req.fp32_folder(), genai_dir(req.out, precision), precision)
        except GenAIExportError as e:
            raise ExportError(
                f"export_formats: ort-genai-{precision} failed: {e}\n"
                "(or drop it from export_formats)"
            ) from e

    return write


class GenAIRuntime:
    """A GenAI folder as `(input_ids, attention_mask) -> logits [B, L, V]`: each row's
    real (left-aligned) tokens are one prefill with og's generator; padding gets 0."""

    def __init__(self, folder: str | Path):
        self.lm = GenAILM(folder)

    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        lengths = attention_mask.sum(-1).tolist()
        rows = []
        for ids, n, m in zip(input_ids, lengths, attention_mask, strict=True):
            if not bool(m[: int(n)].all()):
                raise ValueError("GenAIRuntime needs right padding (real tokens first)")
            rows.append(self.lm(ids[None, : int(n)])[0])
        out = torch.zeros(*input_ids.shape, rows[0].shape[-1])
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
        return out

    def generate_speed(self, prompt: Tensor, new_tokens: int = 32) -> float:
        """Greedy tokens/s at batch 1 (new tokens over wall time, prefill included)."""
        self.lm.generate(prompt[:8], 2)  # warm-up
        _, seconds = self.lm.generate(prompt, new_tokens)
        return new_tokens / seconds
