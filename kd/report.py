"""The job's evaluation report (report.json, report.md) and the student's model card."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from kd import genquality, models
from kd.data import Packed
from kd.fmt import fmt


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def source_mb(name: str) -> float | None:
    """On-disk size of a model source (the GGUF file or the folder); None for hub ids."""
    src = models.resolve_source(name)
    if src.kind == "gguf":
        return Path(src.location).stat().st_size / 1e6
    if src.kind == "folder":
        return folder_bytes(Path(src.location)) / 1e6
    return None


@torch.no_grad()
def generation_speed(
    model: nn.Module, data: Packed, batch: int, new_tokens: int = 32, prompt_len: int = 32
) -> float:
    """Greedy generation tokens/s (new tokens only, KV cache on) at a batch size."""
    n = min(batch, len(data))
    ids = data.input_ids[:n, :prompt_len]
    if n < batch:  # tiny held-out sets: repeat rows to reach the batch size
        ids = ids.repeat((batch + n - 1) // n, 1)[:batch]
    mask = torch.ones_like(ids)
    model.eval()
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=model.config.eos_token_id,
    )
    model.generate(
        input_ids=ids[:, :8],
        attention_mask=mask[:, :8],
        max_new_tokens=2,
        do_sample=False,
        pad_token_id=model.config.eos_token_id,
    )  # warm-up
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return batch * new_tokens / (time.perf_counter() - t0)


@torch.no_grad()
def forward_speed(logits_fn, data: Packed, batch: int = 4, max_blocks: int = 8) -> float:
    """Tokens/s of full-sequence forward passes (what ONNX and PyTorch both do)."""
    n = min(len(data), max_blocks)
    idx = list(range(min(batch, n)))
    b = data.batch(idx)
    logits_fn(b["input_ids"], b["attention_mask"])  # warm-up
    t0, tokens = time.perf_counter(), 0
    for i in range(0, n, batch):
        b = data.batch(list(range(i, min(i + batch, n))))
        logits_fn(b["input_ids"], b["attention_mask"])
        tokens += int(b["attention_mask"].sum())
    return tokens / (time.perf_counter() - t0)


def param_summary(teacher: nn.Module, student: nn.Module) -> dict:
    t, s = models.count_params(teacher), models.count_params(student)
    return {
        "teacher_params": t,
        "student_params": s,
        "compression": t / max(s, 1),
        "teacher_layers": teacher.config.num_hidden_layers,
        "student_layers": student.config.num_hidden_layers,
    }


def split_lines(split: dict) -> list[str]:
    """Markdown lines that say where the held-out numbers come from."""
    if not split:
        return []
    lines = [f"Held-out data: {split['held_out_source']}."]
    if "train_tokens" in split:
        unit = split.get("unit", "document")
        lines.append(
            f"Training: {split['train_documents']:,} {unit}(s), {split['train_tokens']:,} "
            f"tokens; held out: {split['eval_documents']:,} {unit}(s), "
            f"{split['eval_tokens']:,} tokens ({split['method']})."
        )
    return [" ".join(lines), ""]


def render_markdown(report: dict) -> str:
    m, sz, sp = report["quality"], report["size"], report["speed"]
    lines = [
        "# Distillation report",
        "",
        f"Teacher `{report['config']['teacher_model']}` -> student "
        f"({sz['student_layers']}/{sz['teacher_layers']} layers), {report['steps']} steps, "
        f"{report['eval_tokens']} held-out tokens.",
        "",
        "## Quality (held-out)",
        "",
        *split_lines(report.get("split") or {}),
        "| model | perplexity | top-1 agreement with teacher | KL(teacher‖model) / token |",
        "|---|---|---|---|",
        f"| teacher | {fmt(m['teacher_ppl'])} | 1 | 0 |",
        f"| student before training | {fmt(m['student_ppl_before'])} | "
        f"{fmt(m['top1_agreement_before'])} | {fmt(m['kl_before'])} |",
        f"| student after training | {fmt(m['student_ppl_after'])} | "
        f"{fmt(m['top1_agreement_after'])} | {fmt(m['kl_after'])} |",
        "",
        "## Size",
        "",
        "| | parameters | on disk (MB) |",
        "|---|---|---|",
        f"| teacher | {sz['teacher_params']:,} | {fmt(sz.get('teacher_mb'))} |",
        f"| student | {sz['student_params']:,} | {fmt(sz['student_mb'])} |",
        "",
        "## Speed (this machine)",
        "",
        "| model | generate tokens/s, batch 1 | generate tokens/s, batch 8 |",
        "|---|---|---|",
        f"| teacher | {fmt(sp['teacher_gen_b1'])} | {fmt(sp['teacher_gen_b8'])} |",
        f"| student | {fmt(sp['student_gen_b1'])} | {fmt(sp['student_gen_b8'])} |",
    ]
    if report.get("exports"):
        lines += [
            "",
            "## Exports",
            "",
            "| export | perplexity | max abs logit diff vs PyTorch | top-1 agreement | "
            "forward tokens/s | MB |",
            "|---|---|---|---|---|---|",
        ]
        for name, e in report["exports"].items():
            lines.append(
                f"| {name} | {fmt(e['ppl'])} | {fmt(e['max_abs_logit_diff'])} | "
                f"{fmt(e['top1_agreement'])} | {fmt(e['forward_tokens_per_s'])} | "
                f"{fmt(e['mb'])} |"
            )
    lines += generation_lines(report.get("generation_quality"))
    return "\n".join(lines) + "\n"


def generation_lines(sec: dict | None) -> list[str]:
    """The generation-quality section (kd.genquality), or the reason it is missing."""
    if not sec:
        return []
    if "skipped" in sec:
        return ["", "## Generation quality", "", f"Not evaluated: {sec['skipped']}."]
    return ["", genquality.render_markdown(sec).rstrip("\n")]


def model_card(report: dict) -> str:
    return (
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags: [llm2slm, "
        "distillation]\n---\n\n# llm2slm student\n\n"
        f"Distilled from `{report['config']['teacher_model']}` by llm2slm "
        "(hybrid KD: temperature-scaled divergence, CE on teacher argmax, hidden-state "
        "terms). The resolved job config is in `distill_config.json`.\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained('student')\n"
        "tok = AutoTokenizer.from_pretrained('student')\n```\n\n"
        + render_markdown(report).replace("# Distillation report", "## Metrics", 1)
    )
