"""Peak memory of one training worker, computed from the two models' shapes: no torch.

`plan_memory(cfg, teacher, student)` returns every component in bytes and the peaks of
the three phases of a job that can run out of memory:

* train: both models' weights, optimizer state (from step 2 on), then the larger of
  (student activations + the loss's saved buffers + one vocabulary chunk's transients)
  at the end of the forward, and (gradients + AdamW's foreach temporary) at the step;
* eval: `kd.evaluate.compare` before and after training materializes both models'
  [batch, seq, vocab] logits and their log-softmaxes (~7 such fp32 tensors), while the
  optimizer state and the last step's gradients are still alive (the "after" eval);
* the worst of the two is `peak_bytes`.

Activations per token and decoder layer (Llama, SDPA, fp32, autograd's saved tensors),
counted with `torch.autograd.graph.saved_tensors_hooks` on SmolLM2-shaped layers:

    full fine-tuning:  5H + 3·q + 2·kv + n_heads + 4I            (+ 2·(q − kv) + L
                       when the batch has padding: GQA keys/values are repeated and
                       the float mask [B, 1, L, L] is materialized per layer)
    LoRA:              the same − (H + q) + 7r   (frozen linears keep no input)

with q = n_heads·head_dim and kv = n_kv_heads·head_dim. Data blocks are packed, so only
the last block of an epoch has padding; the plan assumes it (the worst batch).

On GPU (bf16 autocast) activations are counted at 2 bytes plus the fp32 copies that
RMSNorm makes, and autocast caches a bf16 copy of each trainable weight. These GPU
numbers are derived, not measured here (no GPU on the development machine).
"""

from __future__ import annotations

from kd.config import DistillConfig
from kd.model_files import Arch

FP32 = 4
GIB = 1024**3
# [chunk, V] fp32 tensors alive at once inside kd.vocab_chunk._chunk_terms (forward KL with the
# data CE: s, g, t_logp, s_logp, p_t); reverse KL and JSD keep a couple more.
CHUNK_BUFFERS = {"forward_kl": 5, "reverse_kl": 6, "jsd": 8}
# [B, L, V] fp32 tensors alive at the peak of kd.evaluate.compare.
EVAL_LOGIT_BUFFERS = 7


def activation_floats_per_token(arch: Arch, seq_len: int, lora_r: int | None) -> int:
    """Saved-for-backward elements per token of one decoder layer (see module doc)."""
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    n = 5 * arch.hidden + 3 * q + 2 * kv + arch.heads + 4 * arch.intermediate
    n += 2 * (q - kv) + seq_len  # padded batch: repeated K/V and the float mask
    if lora_r is not None:
        n += -(arch.hidden + q) + 7 * lora_r
    return n


def forward_transient_floats(arch: Arch, tokens: int, seq_len: int, batch: int) -> int:
    """Largest tensors alive inside one no-grad layer forward (teacher, evaluation)."""
    q = arch.heads * arch.head_dim
    per_token = 3 * arch.intermediate + 3 * arch.hidden + 2 * q
    return tokens * per_token + batch * seq_len * seq_len  # + the float mask


def plan_memory(
    cfg: DistillConfig, teacher: Arch, student: Arch, *, gpu: bool | None = None
) -> dict[str, object]:
    """Bytes per worker for `cfg` with these shapes; JSON-ready (ints and strings)."""
    gpu = cfg.use_gpu if gpu is None else gpu
    low = gpu and cfg.precision != "fp32"  # bf16/fp16 autocast
    c, trainable, adapters = _components(cfg, teacher, student, low)
    tokens = cfg.per_device_batch_size * cfg.max_seq_len
    weights = c["teacher_weights"] + c["student_weights"]
    forward_end = (
        c["activations"]
        + c["autocast_weight_cache"]
        + c["teacher_forward"]
        + c["loss_saved"]
        + c["loss_chunk_buffers"]
    )
    step = c["gradients"] + c["optimizer_step_temp"]
    train = weights + c["optimizer_state"] + max(forward_end, step)
    student_forward = forward_transient_floats(
        student, tokens, cfg.max_seq_len, cfg.per_device_batch_size
    )
    evaluation = (
        weights
        + c["optimizer_state"]
        + c["gradients"]
        + c["eval_logits"]
        + student_forward * (2 if low else FP32)
    )
    return {
        "device": "gpu (bf16 autocast)" if low else ("gpu (fp32)" if gpu else "cpu (fp32)"),
        "tokens_per_micro_batch": tokens,
        "params": {
            "teacher": teacher.params(),
            "student": student.params(),
            "trainable": trainable,
            "lora_adapters": adapters,
        },
        "bytes": c,
        "train_peak_bytes": train,
        "eval_peak_bytes": evaluation,
        "peak_bytes": max(train, evaluation),
        "peak_phase": "train" if train >= evaluation else "eval",
        "calibrated": not gpu,
    }


def _components(
    cfg: DistillConfig, teacher: Arch, student: Arch, low: bool
) -> tuple[dict[str, int], int, int]:
    """(bytes of each component, trainable params, LoRA adapter params)."""
    act_bytes = 2 if low else FP32
    b, seq = cfg.per_device_batch_size, cfg.max_seq_len
    tokens = b * seq
    vocab = min(teacher.vocab_rows, student.vocab_rows)
    s_params = student.params()
    lora = cfg.lora_r is not None
    adapters = student.lora_params(cfg.lora_r) if lora else 0
    trainable = adapters if lora else s_params
    c = {}
    c["teacher_weights"] = teacher.params() * FP32 if cfg.needs_teacher else 0
    c["student_weights"] = (s_params + adapters) * FP32
    c["gradients"] = trainable * FP32
    c["optimizer_state"] = 2 * trainable * FP32  # AdamW exp_avg, exp_avg_sq
    c["optimizer_step_temp"] = trainable * FP32  # foreach sqrt(exp_avg_sq) buffer
    c["autocast_weight_cache"] = trainable * 2 if low else 0
    per_layer = activation_floats_per_token(student, seq, cfg.lora_r)
    norm_copies = 4 * student.hidden * 2 if low else 0  # RMSNorm's fp32 upcasts
    final = 0 if lora else 2 * student.hidden
    c["activations"] = tokens * (
        student.layers * (per_layer * act_bytes + norm_copies) + final * act_bytes
    )
    c["teacher_forward"] = (
        (forward_transient_floats(teacher, tokens, seq, b) + tokens * teacher.hidden) * act_bytes
        if cfg.needs_teacher
        else 0
    )
    chunk = min(cfg.loss_chunk_tokens, tokens)
    # saved by the fused loss until backward: dL/dh_S and, for a trainable head, dL/dW_S
    saved = tokens * (student.hidden + teacher.hidden) * FP32 + tokens * student.hidden * FP32
    if not lora:  # the head trains too
        saved += student.vocab_rows * student.hidden * FP32
    if not cfg.fused_lm_head:  # both [B, L, V] logits and the loss's gradient buffer
        saved += 3 * tokens * vocab * FP32
    c["loss_saved"] = saved
    c["loss_chunk_buffers"] = CHUNK_BUFFERS[cfg.objective] * chunk * vocab * FP32
    c["eval_logits"] = EVAL_LOGIT_BUFFERS * tokens * vocab * FP32
    return c, trainable, adapters


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"
