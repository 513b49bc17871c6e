"""What happens around the loop: the evaluation before training and the finish after.

Both `python -m kd` and the Ray job (rank 0) call these, so a job run either way
produces the same artifact folder:

    <out>/before.json        teacher and student held-out numbers before training
    <out>/metrics.json       before/after numbers, timings, the student selection, history
    <out>/student/           the merged student (save_dtype) with a model card (kd.exports)
    <out>/gguf/student-<type>.gguf   llama.cpp / Ollama            (export_formats gguf-<type>)
    <out>/ort-genai-<p>/     ONNX Runtime GenAI model folder       (ort-genai-<fp32|int8|int4>)
    <out>/onnx/, int8-dynamic/  logits-only ONNX graphs (fp32, dynamic INT8) + tokenizer
    <out>/curves.png, tensorboard/  training curves (see kd.curves)
    <out>/report.json, report.md, manifest.json

Every report has a generation-quality section (kd.genquality): the teacher and the
untrained student write before training (kept in before.json like the perplexities),
the trained student at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kd import curves, evaluate, exports, genquality, report
from kd.exports import write_json
from kd.rollout import GenSettings
from kd.run import Run

BEFORE = "before.json"
METRICS = "metrics.json"
REPORT = "report.json"


def eval_kwargs(run: Run) -> dict:
    return {
        "batch_size": run.cfg.per_device_batch_size,
        "max_blocks": run.cfg.max_eval_blocks,
        "device": run.device,
    }


def evaluate_before(run: Run, out: Path, preflight: dict | None = None) -> dict:
    """Held-out numbers of teacher and untrained student; kept in out/before.json so a
    resumed job still reports them. preflight: kd.preflight's plan, stored with them."""
    path = out / BEFORE
    exports.check_formats(run.cfg, run.student.config)  # fail before training, not after
    if path.is_file():
        return json.loads(path.read_text())
    was = run.student.training
    run.student.eval()
    before = evaluate.compare(run.teacher, run.student, run.eval_data, **eval_kwargs(run))
    run.student.train(was)
    before["student_selection"] = run.selection
    before["split"] = run.eval_data.split  # how the held-out data was chosen
    before["generation"] = generation_before(run)
    if preflight is not None:
        before["preflight"] = preflight
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, before)
    return before


def finalize(
    run: Run,
    out: Path,
    before: dict,
    history: list[dict],
    train_seconds: float,
    started: float,
    extra: dict | None = None,
) -> dict:
    """Evaluate the trained student, save it, and write metrics.json. Returns metrics."""
    run.student.eval()
    after = evaluate.compare(run.teacher, run.student, run.eval_data, **eval_kwargs(run))
    plain = exports.plain_student(run.student)
    written = exports.export(
        plain,
        ["safetensors"],
        out,
        tokenizer=run.tokenizer,
        cfg=run.cfg,
        extra={"kept_layers": run.kept_layers},
    )
    metrics = {
        "teacher_ppl": before["teacher_ppl"],
        "student_ppl_before": before["student_ppl"],
        "student_ppl_after": after["student_ppl"],
        "top1_agreement_before": before["top1_agreement"],
        "top1_agreement_after": after["top1_agreement"],
        "kl_before": before["kl_teacher_student"],
        "kl_after": after["kl_teacher_student"],
        "eval_tokens": after["eval_tokens"],
        "steps": run.step,
        "train_seconds": train_seconds,
        "wall_seconds": time.time() - started,
        "student_selection": before.get("student_selection", run.selection),
        "split": before.get("split", run.eval_data.split),
        "history": history,
    }
    metrics.update(extra or {})
    write_json(out / METRICS, metrics)
    curves.write_all(out, history, run.cfg.model_dump(mode="json"), reference=metrics)
    generation = generation_after(run, before.get("generation"))
    write_report(
        run,
        plain,
        out,
        written,
        metrics,
        preflight=before.get("preflight"),
        generation=generation,
    )
    return metrics


# ---------------------------------------------------------------------------------
# Generation quality (kd.genquality), in every report
# ---------------------------------------------------------------------------------
def _gen_prompts(run: Run):
    cfg = run.cfg
    return genquality.heldout_prompts(
        cfg, run.tokenizer, run.eval_data, n=cfg.gen_eval_prompts, seed=cfg.seed
    )


def _gen_row(run: Run, model, prompts) -> dict:
    tok = run.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with run.autocast:
        return genquality.evaluate_model(
            model,
            run.teacher,
            prompts,
            GenSettings.from_config(run.cfg),
            eos_id=tok.eos_token_id,
            pad_id=pad,
            seed=run.cfg.seed,
            batch_size=8,
            device=run.device,
        )


def generation_before(run: Run) -> dict:
    """The teacher's row (the floor) and the untrained student's (the ceiling), or
    {"skipped": reason}. Kept in before.json, so a resumed job reports the same ones."""
    if run.cfg.gen_eval_prompts == 0:
        return {"skipped": "gen_eval_prompts is 0; set it > 0 for this section"}
    prompts = _gen_prompts(run)
    if len(prompts) == 0:
        return {"skipped": "the held-out data has no prompts (no held-out blocks)"}
    t0 = time.perf_counter()
    writers = {"teacher": run.teacher, "untrained_student": run.student}
    rows = {name: _gen_row(run, m, prompts) for name, m in writers.items()}
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def generation_after(run: Run, before: dict | None) -> dict:
    """report.json's generation-quality section (kd.genquality.section) with the trained
    student's row added, or {"skipped": reason}."""
    if run.cfg.gen_eval_prompts == 0:
        return {"skipped": "gen_eval_prompts is 0; set it > 0 for this section"}
    if before is None:  # a before.json written before this section existed
        before = {"rows": {"teacher": _gen_row(run, run.teacher, _gen_prompts(run))}}
    if "skipped" in before:
        return before
    prompts = _gen_prompts(run)
    t0 = time.perf_counter()
    rows = {**before["rows"], "student": _gen_row(run, run.student, prompts)}
    gen = GenSettings.from_config(run.cfg)
    sec = genquality.section(rows, prompts, run.tokenizer, gen)
    sec["seconds"] = before.get("seconds", 0.0) + time.perf_counter() - t0
    return sec


def _eval_batches(data, n_blocks: int = 4, batch: int = 2):
    n = min(len(data), n_blocks)
    for i in range(0, n, batch):
        b = data.batch(list(range(i, min(i + batch, n))))
        yield b["input_ids"], b["attention_mask"]


def _export_entry(run: Run, name: str, path: Path, plain, student_ppl: float) -> dict:
    """Round trip of one artifact, loaded back with its own runtime or reader: logits
    parity with the torch student, held-out perplexity, speed, size and sha256."""
    lm = exports.RUNTIMES[name](path)
    torch_fn = evaluate.logits_fn(plain)
    entry = evaluate.logits_parity(torch_fn, lm, _eval_batches(run.eval_data))
    entry["ppl"] = evaluate.perplexity(
        lm,
        run.eval_data,
        batch_size=run.cfg.per_device_batch_size,
        max_blocks=run.cfg.max_eval_blocks,
    )
    entry["ppl_ratio"] = entry["ppl"] / student_ppl
    # a GGUF file is read back into PyTorch (no llama.cpp here): its speed would be torch's
    if not name.startswith("gguf-"):
        entry["forward_tokens_per_s"] = report.forward_speed(lm, run.eval_data)
    if hasattr(lm, "generate_speed"):  # GenAI: og's generator, batch 1, as student_gen_b1
        entry["gen_tokens_per_s_b1"] = lm.generate_speed(run.eval_data.input_ids[0, :32], 32)
    fp32_bytes = 4 * sum(p.numel() for p in plain.parameters())
    return entry | report.artifact_size(path, fp32_bytes)


def write_exports(run: Run, plain, out: Path, written: dict[str, Path], student_ppl: float) -> dict:
    """The formats export_formats asks for beside student/, each loaded back and
    checked (see _export_entry). An export failure raises ExportError (the job fails)."""
    kw = dict(tokenizer=run.tokenizer, cfg=run.cfg, written=written)
    seconds: dict[str, float] = {}
    paths = exports.export(plain, exports.formats_for(run.cfg), out, seconds=seconds, **kw)
    entries = {}
    for name, path in paths.items():
        t0 = time.perf_counter()
        entries[name] = _export_entry(run, name, path, plain, student_ppl)
        entries[name]["export_s"] = seconds[name]
        entries[name]["check_s"] = time.perf_counter() - t0
    return entries


def write_report(
    run: Run,
    plain,
    out: Path,
    written: dict[str, Path],
    metrics: dict,
    preflight: dict | None = None,
    generation: dict | None = None,
) -> dict:
    """The exports, report.json, report.md, the model card and manifest.json.
    preflight: kd.preflight's plan (before.json keeps it for resumed jobs).
    generation: the generation-quality section (generation_after)."""
    student_dir = written["safetensors"]
    speed = {}
    for name, model in (("teacher", run.teacher), ("student", plain)):
        for b in (1, 8):
            speed[f"{name}_gen_b{b}"] = report.generation_speed(model, run.eval_data, b)
    export_entries = write_exports(run, plain, out, written, metrics["student_ppl_after"])
    size = report.size_summary(run.teacher, plain, run.cfg.teacher_model, student_dir)
    size["files"] += report.export_files(export_entries, out)
    rep = {
        "config": run.cfg.model_dump(mode="json"),
        "steps": metrics["steps"],
        "eval_tokens": metrics["eval_tokens"],
        "split": metrics.get("split", {}),
        "quality": {
            k: metrics[k]
            for k in (
                "teacher_ppl",
                "student_ppl_before",
                "student_ppl_after",
                "top1_agreement_before",
                "top1_agreement_after",
                "kl_before",
                "kl_after",
            )
        },
        "size": size,
        "speed": speed,
        "train_seconds": metrics["train_seconds"],
        "exports": export_entries,
        "preflight": preflight,
        "shape_search": metrics.get("shape_search"),
        "generation_quality": generation,
    }
    write_json(out / REPORT, rep)
    (out / "report.md").write_text(report.render_markdown(rep))
    (student_dir / "README.md").write_text(report.model_card(rep))
    exports.write_manifest(out)
    return rep


def summary_line(m: dict) -> str:
    return (
        f"held-out perplexity  teacher {m['teacher_ppl']:.2f} | student before "
        f"{m['student_ppl_before']:.2f} -> after {m['student_ppl_after']:.2f} | top-1 agreement "
        f"{m['top1_agreement_before']:.3f} -> {m['top1_agreement_after']:.3f}"
    )
