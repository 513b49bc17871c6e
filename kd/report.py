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


def source_bytes(name: str) -> int | None:
    """On-disk size of a model source (the GGUF file or the folder); None for hub ids."""
    src = models.resolve_source(name)
    if src.kind == "gguf":
        return Path(src.location).stat().st_size
    if src.kind == "folder":
        return folder_bytes(Path(src.location))
    return None


def source_mb(name: str) -> float | None:
    n = source_bytes(name)
    return None if n is None else n / 1e6


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


# ---- sizes and exports (like with like: parameters, bytes at one precision, files) ----
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def size_summary(teacher: nn.Module, student: nn.Module, teacher_name: str, student_dir: Path):
    """Parameters; both models' bytes at the student's saved precision (the teacher's own
    unless save_dtype says otherwise); then files, starting with the teacher's source."""
    import json

    size = param_summary(teacher, student)
    saved = json.loads((student_dir / "distill_config.json").read_text())
    dtype = saved.get("saved_dtype", "fp32")
    size |= {
        "precision": dtype,
        "precision_from": saved.get("saved_dtype_from", ""),
        "teacher_bytes_at_precision": size["teacher_params"] * _BYTES[dtype],
        "student_bytes_at_precision": size["student_params"] * _BYTES[dtype],
        "student_mb": folder_bytes(student_dir) / 1e6,  # kept for older readers
        "teacher_mb": source_mb(teacher_name),
    }
    src = models.resolve_source(teacher_name)
    teacher_file = {"artifact": "teacher source", "what": f"{teacher_name} ({src.kind})"}
    student_file = {"artifact": "student/", "what": f"safetensors, {dtype}"}
    teacher_file["bytes"] = source_bytes(teacher_name)
    student_file["bytes"] = folder_bytes(student_dir)
    student_file["size_ratio_fp32"] = student_file["bytes"] / (4 * size["student_params"])
    size["files"] = [teacher_file, student_file]
    return size


def artifact_size(path: Path, fp32_bytes: int) -> dict:
    """Bytes, MB, size vs the fp32 student and sha256 of an export file or folder."""
    from kd.exports.parity import artifact_row

    row = artifact_row(path, fp32_bytes)
    row["mb"] = row["bytes"] / 1e6
    return row


def export_files(entries: dict[str, dict], out: Path) -> list[dict]:
    """Size-table rows of the exports (their paths relative to the artifact folder)."""
    rows = []
    for name, e in entries.items():
        rel = Path(e["path"]).relative_to(out).as_posix() + (
            "/" if Path(e["path"]).is_dir() else ""
        )
        rows.append(
            {"artifact": rel, "what": name, "bytes": e["bytes"],
             "size_ratio_fp32": e.get("size_ratio_fp32")}
        )  # fmt: skip
    return rows


def size_lines(sz: dict) -> list[str]:
    """The Size section: parameters, bytes at one precision, then every file."""
    t, s = sz["teacher_params"], sz["student_params"]
    lines = ["## Size", ""]
    if "precision" not in sz:  # a report written before sizes were compared like with like
        return lines + [
            "| | parameters | on disk (MB) |",
            "|---|---|---|",
            f"| teacher | {t:,} | {fmt(sz.get('teacher_mb'))} |",
            f"| student | {s:,} | {fmt(sz['student_mb'])} |",
            "",
        ]
    p = sz["precision"]
    tb, sb = sz["teacher_bytes_at_precision"], sz["student_bytes_at_precision"]
    lines += [
        "| | teacher | student | student / teacher |",
        "|---|---|---|---|",
        f"| parameters | {t:,} | {s:,} | {fmt(s / t)} |",
        f"| MB at {p} | {fmt(tb / 1e6)} | {fmt(sb / 1e6)} | {fmt(sb / tb)} |",
        "",
        f"Precision {p}: {sz.get('precision_from') or 'save_dtype'}.",
        "",
        "| file | what | MB | × fp32 student |",
        "|---|---|---|---|",
    ]
    for f in sz["files"]:
        mb = None if f["bytes"] is None else f["bytes"] / 1e6
        lines.append(
            f"| {f['artifact']} | {f['what']} | {fmt(mb)} | {fmt(f.get('size_ratio_fp32'))} |"
        )
    return lines + [""]


def export_lines(exports: dict) -> list[str]:
    """The Exports section: each artifact loaded back with its own runtime or reader."""
    if not exports:
        return []
    lines = [
        "",
        "## Exports",
        "",
        "Each artifact loaded back with its own runtime (GGUF: transformers' GGUF reader) "
        "and compared with the PyTorch student on held-out blocks.",
        "",
        "| export | perplexity | ppl / student | max abs logit diff vs PyTorch | top-1 "
        "agreement | forward tokens/s | generate tokens/s, batch 1 | MB | × fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in exports.items():
        lines.append(
            f"| {name} | {fmt(e['ppl'])} | {fmt(e.get('ppl_ratio'))} | "
            f"{fmt(e['max_abs_logit_diff'])} | {fmt(e['top1_agreement'])} | "
            f"{fmt(e.get('forward_tokens_per_s'))} | {fmt(e.get('gen_tokens_per_s_b1'))} | "
            f"{fmt(e['mb'])} | {fmt(e.get('size_ratio_fp32'))} |"
        )
    return lines


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
        *size_lines(sz),
        "## Speed (this machine)",
        "",
        "| model | generate tokens/s, batch 1 | generate tokens/s, batch 8 |",
        "|---|---|---|",
        f"| teacher | {fmt(sp['teacher_gen_b1'])} | {fmt(sp['teacher_gen_b8'])} |",
        f"| student | {fmt(sp['student_gen_b1'])} | {fmt(sp['student_gen_b8'])} |",
    ]
    lines += export_lines(report.get("exports") or {})
    lines += shape_search_lines(report.get("shape_search"))
    lines += generation_lines(report.get("generation_quality"))
    return "\n".join(lines) + "\n"


def shape_search_lines(search: dict | None) -> list[str]:
    """The shape search's candidates (train_job.shape_search), best first, and the winner."""
    if not search:
        return []
    how = (
        f"each candidate pruned from the teacher and distilled for {search['steps']} steps "
        f"as a Ray Tune trial; the lowest held-out perplexity (`{search['winner']}`) trained "
        "to the end."
        if search["steps"]
        else f"only `{search['winner']}` is within ±3%, so no trial was run."
    )
    lines = [
        "",
        "## Shape search",
        "",
        f"Budget {search['budget']:,} parameters; {how}",
        "",
        "| candidate | layers | hidden | ffn | heads/kv | parameters | ppl before | "
        "ppl after the short run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in search["candidates"]:
        s = row["shape"]
        name = f"**{row['name']}**" if row["name"] == search["winner"] else row["name"]
        after = fmt(row.get("eval_ppl")) if "error" not in row else "failed"
        lines.append(
            f"| {name} | {s['layers']} | {s['hidden']} | {s['ffn']} | "
            f"{s['heads']}/{s['kv_heads']} | {row['params']:,} | "
            f"{fmt(row.get('eval_ppl_before'))} | {after} |"
        )
    return lines


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
