"""`GET /jobs/{job_id}/report`: one self-contained HTML page per job.

The page shows the job's progress, its training curves (the job's `curves.png`, inlined
as base64 so the page needs nothing else), the evaluation tables of `report.json`, its
generation quality (the teacher's, untrained and trained student's greedy continuations
side by side) and the config. It is plain HTML and CSS, no script, and greyscale apart
from the chart.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from html import escape
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from kd.fmt import fmt
from serve_app.openapi import json_problems
from serve_app.routes import Svc, job_or_404
from serve_app.security import job_paths

router = APIRouter(responses=json_problems(401))

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1060px;
       color: #222; background: #fff; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { border: 1px solid #ccc; padding: 3px 10px; text-align: left; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { width: 420px; height: 14px; background: #e6e6e6; border: 1px solid #bbb; }
.bar > div { height: 100%; background: #555; }
.muted { color: #777; } .error { border: 1px solid #999; padding: 8px; white-space: pre-wrap; }
img#curves { width: 1000px; max-width: 100%; border: 1px solid #ddd; }
table#side-by-side { width: 100%; }
table#side-by-side td { vertical-align: top; white-space: pre-wrap; width: 25%; }
"""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{escape(fmt(c, none="–", grouped=True))}</td>'
            if isinstance(c, int | float) and not isinstance(c, bool)
            else f"<td>{escape(fmt(c, none='–', grouped=True))}</td>"
            for c in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _progress(job: dict) -> str:
    step, total = job.get("step") or 0, job.get("total_steps") or 0
    share = min(1.0, step / total) if total else 0.0
    m = job.get("metrics") or {}
    eta = job.get("eta_s")
    rows = [
        ["state", job["state"]],
        ["step", f"{step} / {total or '?'}"],
        ["loss (last report)", m.get("loss")],
        ["tokens/s (all ranks)", m.get("tokens_per_s")],
        ["ETA", f"{eta:.0f} s" if eta is not None and job["state"] == "running" else None],
        ["attempt", job.get("attempt", 0)],
        ["created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["created_at"]))],
    ]
    bar = f'<div class="bar"><div style="width:{share * 100:.1f}%"></div></div>'
    error = f'<p class="error">{escape(job["error"])}</p>' if job.get("error") else ""
    return bar + _table(["", ""], rows) + error


def _size(sz: dict) -> str:
    """Parameters, both models at one precision, then every file (kd.report.size_lines)."""
    t, s = sz["teacher_params"], sz["student_params"]
    if "precision" not in sz:  # a report written before sizes were compared like with like
        return _table(
            ["model", "parameters", "on disk (MB)"],
            [["teacher", t, sz.get("teacher_mb")], ["student", s, sz.get("student_mb")]],
        )
    tb, sb = sz["teacher_bytes_at_precision"], sz["student_bytes_at_precision"]
    files = [
        [f["artifact"], f["what"], None if f["bytes"] is None else f["bytes"] / 1e6,
         f.get("size_ratio_fp32")]
        for f in sz["files"]
    ]  # fmt: skip
    return _table(
        ["", "teacher", "student", "student / teacher"],
        [["parameters", t, s, s / t], [f"MB at {sz['precision']}", tb / 1e6, sb / 1e6, sb / tb]],
    ) + _table(["file", "what", "MB", "× fp32 student"], files)


def _exports(exports: dict) -> list[str]:
    """Each export loaded back with its own runtime, against the PyTorch student."""
    if not exports:
        return []
    rows = [
        [name, e["ppl"], e.get("ppl_ratio"), e["max_abs_logit_diff"], e["top1_agreement"],
         e.get("forward_tokens_per_s"), e.get("gen_tokens_per_s_b1"), e["mb"],
         e.get("size_ratio_fp32")]
        for name, e in exports.items()
    ]  # fmt: skip
    head = ["export", "perplexity", "ppl / student", "max |Δlogit|", "top-1",
            "forward tokens/s", "generate tokens/s b1", "MB", "× fp32"]  # fmt: skip
    return ["<h3>Exports</h3>", _table(head, rows)]


def _evaluation(report: dict | None, summary: dict | None) -> str:
    if report is None:
        if not summary:
            return '<p class="muted">The evaluation appears when the job has finished.</p>'
        return _table(["metric", "value"], [[k, v] for k, v in summary.items()])
    q, sz, sp = report["quality"], report["size"], report["speed"]
    parts = [
        "<h3>Quality (held-out)</h3>",
        _table(
            ["model", "perplexity", "top-1 agreement with teacher", "KL(teacher‖model) / token"],
            [
                ["teacher", q["teacher_ppl"], 1.0, 0.0],
                [
                    "student before",
                    q["student_ppl_before"],
                    q["top1_agreement_before"],
                    q["kl_before"],
                ],
                ["student after", q["student_ppl_after"], q["top1_agreement_after"], q["kl_after"]],
            ],
        ),
        "<h3>Size</h3>",
        _size(sz),
        "<h3>Generation speed (tokens/s)</h3>",
        _table(
            ["model", "batch 1", "batch 8"],
            [[n, sp[f"{n}_gen_b1"], sp[f"{n}_gen_b8"]] for n in ("teacher", "student")],
        ),
    ]
    parts += _exports(report.get("exports") or {})
    parts += _shape_search(report.get("shape_search"))
    return "".join(parts)


def _shape_search(search: dict | None) -> list[str]:
    """The candidates of a parameter-budget job's Ray Tune search, best first."""
    if not search:
        return []
    rows = [
        [
            f"{c['name']} (winner)" if c["name"] == search["winner"] else c["name"],
            "{layers} × {hidden}, ffn {ffn}, heads {heads}/{kv_heads}".format(**c["shape"]),
            c["params"],
            c.get("eval_ppl_before"),
            c.get("eval_ppl") if "error" not in c else "failed",
        ]
        for c in search["candidates"]
    ]
    head = ["candidate", "shape", "parameters", "ppl before", "ppl after short KD"]
    return [
        f"<h3>Shape search ({search['steps']} steps per candidate)</h3>",
        _table(head, rows),
    ]


# Rows of kd.genquality's section (not imported: kd.genquality needs torch).
GEN_LABELS = {
    "teacher": "teacher (floor)",
    "untrained_student": "untrained student (ceiling)",
    "student": "trained student",
}


def _generation(report: dict | None) -> str:
    """report.json's generation-quality section: the metrics per writer and, side by
    side, the teacher's, untrained and trained student's greedy continuations."""
    sec = (report or {}).get("generation_quality")
    if not sec:
        return '<p class="muted">The generation quality appears when the job has finished.</p>'
    if "skipped" in sec:
        return f'<p class="muted">Not evaluated: {escape(sec["skipped"])}.</p>'
    intro = (
        f"<p>{sec['n_prompts']} held-out prompts, up to {sec['max_new_tokens']} new tokens, "
        f"sampled at temperature {sec['temperature']}, top-p {sec['top_p']}. Teacher NLL and "
        "reverse KL (writer ‖ teacher) per token of the sampled text: lower means the "
        "model writes what the teacher would.</p>"
    )
    keys = ["teacher_nll", "reverse_kl", "mean_len", "repeat_4gram", "distinct_2"]
    metrics = _table(
        ["writer", "teacher NLL", "reverse KL", "mean length", "repeated 4-grams", "distinct-2"],
        [[GEN_LABELS.get(n, n), *(r.get(k) for k in keys)] for n, r in sec["rows"].items()],
    )
    names = [n for n in GEN_LABELS if n in sec["rows"]]
    head = "".join(f"<th>{escape(h)}</th>" for h in ["prompt", *(GEN_LABELS[n] for n in names)])
    body = "".join(
        "<tr>"
        + "".join(f"<td>{escape(item.get(k) or '(empty)')}</td>" for k in ["prompt", *names])
        + "</tr>"
        for item in sec["side_by_side"]
    )
    samples = f'<table id="side-by-side"><tr>{head}</tr>{body}</table>'
    return f"{intro}{metrics}<h3>Greedy continuations, side by side</h3>{samples}"


def render(job: dict, report: dict | None, curves_png: bytes | None) -> str:
    """The whole page for one job record (as the registry holds it)."""
    if curves_png:
        b64 = base64.b64encode(curves_png).decode("ascii")
        chart = f'<img id="curves" alt="training curves" src="data:image/png;base64,{b64}">'
    else:
        chart = '<p class="muted" id="no-curves">The curves appear when the job has finished.</p>'
    config = job.get("config") or {}
    job_id = escape(job["job_id"])
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>llm2slm {job_id}</title>"
        f"<style>{CSS}</style></head><body>"
        f"<h1>llm2slm job {job_id}</h1><p class='muted'>{escape(job['state'])}</p>"
        f"<h2>Progress</h2>{_progress(job)}"
        f"<h2>Training curves</h2>{chart}"
        f"<h2>Evaluation</h2>{_evaluation(report, job.get('summary'))}"
        f"<h2>Generation quality</h2>{_generation(report)}"
        f"<h2>Config</h2>{_table(['field', 'value'], [[k, v] for k, v in config.items()])}"
        "</body></html>"
    )


@router.get(
    "/jobs/{job_id}/report",
    response_class=HTMLResponse,
    tags=["jobs"],
    responses=json_problems(404),
)
async def report_page(job_id: str, svc: Svc) -> HTMLResponse:
    """The job's progress, curves, evaluation and config as one HTML page."""
    job = await job_or_404(svc, job_id)
    paths = job_paths(svc.settings, job_id)

    def read(name: str) -> bytes | None:  # from a shared folder or S3
        key = paths.artifact_key(name)
        return paths.storage.read_bytes(key) if paths.storage.is_file(key) else None

    report, curves = await asyncio.gather(
        asyncio.to_thread(read, "report.json"), asyncio.to_thread(read, "curves.png")
    )
    return HTMLResponse(render(job, json.loads(report) if report else None, curves))
