"""Check a job before anything is loaded or queued: tokenizers and memory, in seconds.

    plan = preflight(cfg)                       # a local run: this machine's memory
    plan = preflight(cfg, budget=WorkerBudget.from_ray_nodes(ray.nodes(), cfg))

reads only config and tokenizer files (`kd.model_files`), never weights, and imports
no torch. It raises `PreflightError` (a ValueError: HTTP 422 / exit code 2) when

* teacher and student tokenizers differ: the message gives both vocabulary sizes;
* the worker's memory plan (`kd.memory_plan`) exceeds the worker's memory: the
  message gives the numbers and the settings that would fit.

Otherwise it returns the plan, a JSON-ready dict for `before.json` and the report.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from kd.config import DistillConfig
from kd.memory_plan import GIB, gib, plan_memory
from kd.model_files import ModelFiles, ModelFilesError, read_model

# Memory a worker process holds before any model: Python, torch, transformers, the
# tokenizer and the data (RSS measured after `import kd.train` on CPU, ~0.6 GiB).
RUNTIME_BYTES = int(0.75 * GIB)
# Keep this share of the worker's memory free: allocator fragmentation, other processes.
HEADROOM = 0.9


class PreflightError(ValueError):
    """The job cannot run as configured; the message lists every problem and its fix."""

    def __init__(self, problems: list[str], plan: dict | None = None):
        super().__init__("; ".join(problems))
        self.problems = problems
        self.plan = plan


@dataclass(frozen=True)
class WorkerBudget:
    """Memory one worker may use (bytes); None where unknown (then nothing is compared)."""

    host_bytes: int | None
    gpu_bytes: int | None = None
    where: str = "this machine"

    @classmethod
    def local(cls) -> WorkerBudget:
        """This machine's available memory (what a `python -m kd` run can still take)."""
        try:
            import psutil

            avail = int(psutil.virtual_memory().available)
        except ImportError:  # pragma: no cover - psutil ships with ray
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return cls(avail, None, "this machine (available memory)")

    @classmethod
    def from_ray_nodes(
        cls, nodes: list[dict], cfg: DistillConfig, gpu_bytes: int | None = None
    ) -> WorkerBudget:
        """Per-worker share of the tightest node that can host a worker.

        nodes: `ray.nodes()`. Ray packs workers, so a node with C CPUs (and G GPUs) runs
        up to min(num_workers, C // cpus_per_worker, G) of them and they split its Ray
        `memory` resource. gpu_bytes: one GPU's memory, which Ray does not report.
        """
        shares = []
        for node in nodes:
            res = node.get("Resources") or {}
            if not node.get("Alive", True) or "memory" not in res:
                continue
            fit = int(res.get("CPU", 0) // cfg.cpus_per_worker)
            if cfg.use_gpu:
                fit = min(fit, int(res.get("GPU", 0)))
            fit = min(fit, cfg.num_workers)
            if fit >= 1:
                shares.append(int(res["memory"] / fit))
        if not shares:  # an autoscaler may still add a node that fits: do not refuse
            need = f"{cfg.cpus_per_worker} CPUs" + (" and a GPU" if cfg.use_gpu else "")
            return cls(None, None, f"a Ray worker (no node with {need} up now)")
        return cls(min(shares), gpu_bytes if cfg.use_gpu else None, "a Ray worker")


# ---------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------
def _describe(m: ModelFiles) -> str:
    size = "?" if m.vocab.size is None else m.vocab.size
    return f"{size} tokens, {m.arch.vocab_rows} embedding rows"


def check_tokenizers(teacher: ModelFiles, student: ModelFiles | None) -> dict:
    """Shared tokenizer or not, from the files; raises PreflightError when they differ.

    student None: derived from the teacher (same files). Sizes may differ only by
    padding rows: the same token table, and embedding rows beyond it in either model.
    """
    t = teacher
    s = student or teacher
    info = {
        "teacher_tokens": t.vocab.size,
        "teacher_rows": t.arch.vocab_rows,
        "student_tokens": s.vocab.size,
        "student_rows": s.arch.vocab_rows,
        "shared_rows": min(t.arch.vocab_rows, s.arch.vocab_rows),
    }
    same = t.vocab.same_as(s.vocab)
    if not same and t.vocab.tokens is not None and s.vocab.tokens is not None:
        # One table may extend the other (added tokens): fine when the shorter is a prefix
        # of the longer and every token has a row in both models (kd.models does the same).
        n = min(len(t.vocab.tokens), len(s.vocab.tokens))
        prefix = {k: v for k, v in t.vocab.tokens.items() if v < n}
        extends = prefix == {k: v for k, v in s.vocab.tokens.items() if v < n}
        longest = max(len(t.vocab.tokens), len(s.vocab.tokens))
        same = extends and longest <= info["shared_rows"]
    if not same:
        raise PreflightError(
            [
                f"student_model: the teacher's tokenizer ({_describe(t)}, {t.where}) and the "
                f"student's ({_describe(s)}, {s.where}) differ, so their next-token "
                "distributions cannot be compared. Use a student with the teacher's "
                "tokenizer (same model family), or derive it from the teacher "
                "(student_model='teacher:layers=N')"
            ]
        )
    tokens = max(t.vocab.size or 0, s.vocab.size or 0)
    pad_t, pad_s = t.arch.vocab_rows - tokens, s.arch.vocab_rows - tokens
    if student is None:
        info["verdict"] = "derived student: the teacher's tokenizer"
    elif t.arch.vocab_rows == s.arch.vocab_rows:
        info["verdict"] = "same tokenizer, same embedding rows"
    else:
        info["verdict"] = (
            f"same tokenizer; the sizes differ only by padding rows (teacher {pad_t}, student "
            f"{pad_s} rows beyond the {tokens} tokens); the loss uses the first "
            f"{info['shared_rows']} rows"
        )
    return info


# ---------------------------------------------------------------------------------
# Memory: the plan, the budget and the settings that would fit
# ---------------------------------------------------------------------------------
def _need(plan: dict, budget: WorkerBudget, gpu: bool) -> tuple[int, int]:
    """(needed, available) bytes on the device that holds the training state.

    Callers check `budget.host_bytes is None` (unknown) first."""
    if gpu and budget.gpu_bytes is not None:
        return int(plan["peak_bytes"]), int(budget.gpu_bytes * HEADROOM)
    if gpu:  # GPU memory unknown: the host still has to hold both models once
        need = int(plan["bytes"]["teacher_weights"] + plan["bytes"]["student_weights"])
        return need + RUNTIME_BYTES, int(budget.host_bytes * HEADROOM)
    return int(plan["peak_bytes"]) + RUNTIME_BYTES, int(budget.host_bytes * HEADROOM)


def _need_for(cfg: DistillConfig, t: ModelFiles, s_arch, budget: WorkerBudget) -> int:
    return _need(plan_memory(cfg, t.arch, s_arch), budget, cfg.use_gpu)[0]


def suggestions(cfg: DistillConfig, t: ModelFiles, s_arch, budget: WorkerBudget) -> list[str]:
    """Settings that would make the job fit, each checked against the same plan."""
    have = _need(plan_memory(cfg, t.arch, s_arch), budget, cfg.use_gpu)[1]

    def fits(arch=s_arch, **update) -> bool:
        return _need_for(cfg.model_copy(update=update), t, arch, budget) <= have

    out = []
    per_step = cfg.per_device_batch_size * cfg.grad_accum_steps
    for b in range(cfg.per_device_batch_size - 1, 0, -1):
        if fits(per_device_batch_size=b):
            accum = math.ceil(per_step / b)
            out.append(
                f"per_device_batch_size={b} with grad_accum_steps={accum} (same blocks per step)"
            )
            break
    if cfg.lora_r is None:
        for r in (16, 8):
            if fits(lora_r=r):
                out.append(f"lora_r={r} (LoRA: only adapters get gradients and AdamW state)")
                break
    if cfg.loss_chunk_tokens > 64 and fits(loss_chunk_tokens=64):
        out.append("loss_chunk_tokens=64 (smaller vocabulary chunks in the loss)")
    if not cfg.fused_lm_head and fits(fused_lm_head=True):
        out.append("fused_lm_head=true (no [batch, seq, vocab] logits)")
    smallest = dict(per_device_batch_size=1, lora_r=cfg.lora_r or 8, loss_chunk_tokens=64)
    smallest["fused_lm_head"] = True
    if not out and cfg.derives_student:
        for n in range(s_arch.layers - 1, 0, -1):
            if fits(t.arch.with_layers(n), **smallest):
                out.append(
                    f"student_layers={n} with per_device_batch_size=1, lora_r="
                    f"{smallest['lora_r']} and loss_chunk_tokens=64"
                )
                break
    if not out:
        least = _need_for(cfg.model_copy(update=smallest), t, s_arch, budget)
        out.append(
            f"nothing smaller fits: even per_device_batch_size=1 with lora_r="
            f"{smallest['lora_r']} and loss_chunk_tokens=64 needs {gib(least)}; use a worker "
            f"with at least {gib(least / HEADROOM)} or a smaller teacher"
        )
    return out


NO_DDP_SAVINGS = (
    "more workers (num_workers) do not lower this: every DDP rank holds the whole teacher, "
    "student, gradients and optimizer state; they only let a smaller per_device_batch_size "
    "keep the blocks per step"
)


def check_memory(
    cfg: DistillConfig, t: ModelFiles, s_arch, budget: WorkerBudget
) -> tuple[dict, list[str]]:
    """(plan with the budget, problems): one problem when the plan exceeds the budget."""
    plan = plan_memory(cfg, t.arch, s_arch)
    if budget.host_bytes is None:
        plan["worker"] = {"where": budget.where, "note": "memory unknown: not compared"}
        return plan, []
    need, have = _need(plan, budget, cfg.use_gpu)
    plan["worker"] = {
        "where": budget.where,
        "host_bytes": budget.host_bytes,
        "gpu_bytes": budget.gpu_bytes,
        "needed_bytes": need,
        "usable_bytes": have,
        "runtime_bytes": RUNTIME_BYTES,
        "headroom": HEADROOM,
    }
    if cfg.use_gpu and budget.gpu_bytes is None:
        plan["worker"]["note"] = "GPU memory unknown: only the host's copy of the models checked"
    if need <= have:
        return plan, []
    parts = ", ".join(f"{k} {gib(v)}" for k, v in plan["bytes"].items() if v)
    total = budget.gpu_bytes if cfg.use_gpu and budget.gpu_bytes else budget.host_bytes
    fixes = suggestions(cfg, t, s_arch, budget)
    problem = (
        f"per_device_batch_size: the job needs about {gib(need)} per worker "
        f"({plan['peak_phase']} peak; {parts}) but {budget.where} has {gib(have)} usable "
        f"({HEADROOM:.0%} of {gib(total)}). "
        f"Would fit: {'; or '.join(fixes)}. Note: {NO_DDP_SAVINGS}"
    )
    return plan, [problem]


# ---------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------
def preflight(
    cfg: DistillConfig,
    budget: WorkerBudget | None = None,
    *,
    refuse: bool = True,
    relative_ok: bool | None = None,
) -> dict:
    """Tokenizer check and memory plan for `cfg`; raises PreflightError listing problems.

    budget: the worker's memory; None measures this machine (a local run).
    refuse: False returns the plan with its `problems` instead of raising (for
    before.json, written by a job that was already admitted).
    relative_ok: False reads no path that is not absolute (the API); None decides by
    the job's origin (`kd.names.readable`).
    Raises ModelFilesError when a model's config or tokenizer cannot be read.
    """
    teacher = read_model(cfg.teacher_model, relative_ok)
    student = None if cfg.derives_student else read_model(cfg.student_model, relative_ok)
    problems: list[str] = []
    try:
        tokenizers = check_tokenizers(teacher, student)
    except PreflightError as e:
        problems += e.problems
        tokenizers = None
    if student is None:
        n_keep = cfg.student_layers or max(1, teacher.arch.layers // 2)
        if n_keep > teacher.arch.layers:
            problems.append(
                f"student_layers: {n_keep} but the teacher has only {teacher.arch.layers} "
                f"layers; choose 1..{teacher.arch.layers}"
            )
        s_arch = teacher.arch.with_layers(min(n_keep, teacher.arch.layers))
    else:
        s_arch = student.arch
    plan, mem_problems = check_memory(cfg, teacher, s_arch, budget or WorkerBudget.local())
    problems += mem_problems
    plan["tokenizers"] = tokenizers
    plan["teacher"] = {"name": teacher.name, "read_from": teacher.where}
    plan["student"] = {
        "name": cfg.student_model,
        "read_from": teacher.where if student is None else student.where,
        "layers": s_arch.layers,
    }
    plan["problems"] = problems
    if problems and refuse:
        raise PreflightError(problems, plan)
    return plan


def cluster_check(
    cfg: DistillConfig, nodes: list[dict] | None, relative_ok: bool | None = None
) -> dict:
    """The plan for `cfg` on a Ray cluster whose `ray.nodes()` are `nodes` (None: not
    connected, nothing to compare with). Raises PreflightError (tokenizers, memory) or
    ModelFilesError (a model whose files cannot be read from here). The caller reads
    the nodes, so kd stays Ray-free."""
    if nodes is None:
        budget = WorkerBudget(None, None, "a Ray worker (not connected to a cluster)")
    else:  # Ray does not report GPU memory: a GPU job is checked against the host only
        budget = WorkerBudget.from_ray_nodes(nodes, cfg)
    return preflight(cfg, budget, relative_ok=relative_ok)


def http_problems(cfg: DistillConfig, nodes: list[dict] | None) -> list[dict]:
    """422 details for the API: one per problem, `loc` naming the field it starts with.

    A model the server cannot read (a Hub id or a path only the workers reach) is not
    refused here: the job's own preflight reports it where the files are.
    """
    try:  # the server reads no relative path, whatever its working directory holds
        cluster_check(cfg, nodes, relative_ok=False)
    except PreflightError as e:
        return [
            {"loc": ["body", p.split(":", 1)[0]], "msg": p, "type": "value_error"}
            for p in e.problems
        ]
    except ModelFilesError:
        return []
    return []


def summary(plan: dict) -> str:
    """One line for logs: the peak, what dominates it and the worker's memory."""
    w = plan.get("worker", {})
    usable = w.get("usable_bytes")
    has = f"has {gib(usable)} usable" if usable is not None else "memory unknown"
    top = sorted(plan["bytes"].items(), key=lambda kv: -kv[1])[:3]
    return (
        f"preflight: peak {gib(plan['peak_bytes'])} per worker ({plan['peak_phase']}; "
        + ", ".join(f"{k} {gib(v)}" for k, v in top)
        + f"); {w.get('where', '?')} {has}"
    )
