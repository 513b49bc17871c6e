"""The cross-field rules of a DistillConfig: the problems no single field shows.

`DistillConfig`'s model validator calls `cross_field_problems` once pydantic has checked
each field on its own. Two spellings are normalised first, in place: a derived-student
spec ('teacher:layers=2,select=first') becomes the student_* fields and
layer_selection, and the deprecated export_onnx / post_training_quant booleans become
export_formats. Every problem is one line that starts with the field it concerns and
names the fix; the validator joins them into one error, so a request learns all of
them at once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kd.spec import (
    DERIVED_STUDENT,
    LOSS_WEIGHTS,
    SIZE_KEYS,
    legacy_export_formats,
    parse_derived_student,
)

if TYPE_CHECKING:  # annotations only: kd.config imports this module at load time
    from kd.config import DistillConfig

# Warnings of a config's validation keep the logger name of the model they validate,
# as when these rules were its methods, so a filter on 'kd.config' still sees them.
log = logging.getLogger("kd.config")


def cross_field_problems(cfg: DistillConfig) -> list[str]:
    """Normalise `cfg`'s derived-student spec and legacy export booleans, then list
    every cross-field problem (empty when there is none)."""
    problems: list[str] = []
    _normalize_student(cfg, problems)
    _check_shape_fields(cfg, problems)
    if all(getattr(cfg, w) == 0 for w in LOSS_WEIGHTS):
        problems.append(
            f"{', '.join(LOSS_WEIGHTS)}: all loss weights are 0; set at least one above 0 "
            "(e.g. alpha_kl=1)"
        )
    if cfg.warmup_steps >= cfg.max_steps and cfg.warmup_steps > 0:
        problems.append(
            f"warmup_steps: {cfg.warmup_steps} must be smaller than max_steps ({cfg.max_steps})"
        )
    if cfg.eval_subset is not None and cfg.eval_dataset is None:
        problems.append(
            "eval_subset: applies to eval_dataset, which is not set; set eval_dataset or "
            "drop eval_subset (subset names the config of dataset)"
        )
    if (
        cfg.eval_dataset is None
        and cfg.eval_split is not None
        and (cfg.eval_split.split("[")[0].strip() == cfg.split.split("[")[0].strip())
    ):
        problems.append(
            f"eval_split: '{cfg.eval_split}' is the training split too; choose another "
            "split of dataset, or set eval_dataset"
        )
    if cfg.use_qat:
        problems.append(
            "use_qat: quantization-aware training is not supported; set use_qat=false and "
            "list a quantized format in export_formats (e.g. gguf-q8_0, ort-genai-int4; "
            "it replaces post_training_quant)"
        )
    if cfg.precision in ("bf16", "fp16") and not cfg.use_gpu:
        problems.append(
            f"precision: {cfg.precision} needs use_gpu=true; on CPU use 'fp32' or 'auto' "
            "(bf16 matmuls are far slower than fp32 on CPUs without AMX)"
        )
    if cfg.max_seq_len * cfg.per_device_batch_size > 4_194_304:
        problems.append(
            "per_device_batch_size: per_device_batch_size × max_seq_len "
            f"= {cfg.max_seq_len * cfg.per_device_batch_size} tokens exceeds 4,194,304; "
            "lower one of them or raise grad_accum_steps"
        )
    _check_generation(cfg, problems)
    _legacy_exports(cfg, problems)
    _check_teacher_signal(cfg, problems)
    return problems


def _normalize_student(cfg: DistillConfig, problems: list[str]) -> None:
    """Fold 'teacher:layers=N,select=S,hidden=H,ffn=F,heads=A,kv_heads=K,params=P'
    into the student_* fields and layer_selection; null means 'teacher'."""
    spec = cfg.student_model
    if spec is None:
        cfg.student_model = DERIVED_STUDENT
        return
    parsed = parse_derived_student(spec)
    if parsed is None:  # a model name: a Hub id, a folder or a .gguf file
        return
    fields, unreadable = parsed
    cfg.student_model = DERIVED_STUDENT
    for name, value in fields.items():
        setattr(cfg, name, value)
    problems.extend(unreadable)


def _check_shape_fields(cfg: DistillConfig, problems: list[str]) -> None:
    """A budget excludes explicit sizes; heads must split evenly over KV heads."""
    sizes = {f: getattr(cfg, f) for f in SIZE_KEYS.values()}
    given = [f for f, v in sizes.items() if v is not None]
    if cfg.student_params is not None and given:
        problems.append(
            f"student_params: give a parameter budget or explicit sizes ({', '.join(given)})"
            ", not both; drop one"
        )
    width = [f for f in given if f != "student_layers"]
    if (width or cfg.student_params is not None) and not cfg.derives_student:
        problems.append(
            f"{(width or ['student_params'])[0]}: size fields apply to a student derived "
            "from the teacher; set student_model='teacher' or drop them"
        )
    heads, kv = cfg.student_heads, cfg.student_kv_heads
    if heads is not None and kv is not None and heads % kv:
        problems.append(
            f"student_heads: {heads} is not a multiple of student_kv_heads={kv}; every "
            "KV head serves the same number of query heads"
        )


def _check_generation(cfg: DistillConfig, problems: list[str]) -> None:
    """Cross-field rules of on-policy / sequence-level KD (only when they are used)."""
    if not (cfg.generates or cfg.prompt_column is not None):
        return
    if cfg.lmbda > 0 and cfg.alpha_kl == 0 and cfg.beta_ce == 0:
        problems.append(
            "lmbda: the student's own continuations are scored only by the teacher (the "
            "data CE lm_ce is skipped on them); set alpha_kl > 0 or lmbda=0"
        )
    if cfg.prompt_column is None and cfg.prompt_tokens + cfg.max_new_tokens > cfg.max_seq_len:
        problems.append(
            f"prompt_tokens: prompt_tokens + max_new_tokens = "
            f"{cfg.prompt_tokens + cfg.max_new_tokens} exceeds max_seq_len "
            f"({cfg.max_seq_len}); lower prompt_tokens or max_new_tokens, or raise "
            "max_seq_len"
        )
    if cfg.prompt_column is not None and cfg.max_new_tokens >= cfg.max_seq_len:
        problems.append(
            f"max_new_tokens: {cfg.max_new_tokens} leaves no room for the prompt in "
            f"max_seq_len ({cfg.max_seq_len}); lower it or raise max_seq_len"
        )
    if cfg.prompt_column is not None and cfg.prompt_column == cfg.text_column:
        problems.append(
            f"prompt_column: '{cfg.prompt_column}' is also text_column; text_column "
            "must name the response column"
        )


def _legacy_exports(cfg: DistillConfig, problems: list[str]) -> None:
    """export_onnx / post_training_quant still work: they set export_formats."""
    if cfg.export_onnx is None and cfg.post_training_quant is None:
        return
    legacy = legacy_export_formats(cfg.export_onnx, cfg.post_training_quant)
    if "export_formats" in cfg.model_fields_set and cfg.export_formats != legacy:
        problems.append(
            f"export_formats: {cfg.export_formats} contradicts the deprecated "
            f"export_onnx={cfg.export_onnx} / post_training_quant="
            f"{cfg.post_training_quant}; drop those two and list every format in "
            "export_formats"
        )
        return
    log.warning(
        "export_onnx/post_training_quant are deprecated; they mean export_formats=%s",
        legacy,
    )
    cfg.export_formats = legacy


def _check_teacher_signal(cfg: DistillConfig, problems: list[str]) -> None:
    """A cached teacher signal covers the packed data blocks and no attention map."""
    if cfg.teacher_signal == "live":
        return
    if cfg.epsilon_attn > 0:
        problems.append(
            "epsilon_attn: the attention term needs a live teacher (attention maps are "
            "not cached); set epsilon_attn=0 or teacher_signal=live"
        )
    if cfg.teacher_cache_mode == "topk" and cfg.needs_hidden:
        problems.append(
            "teacher_cache_mode: topk stores no hidden states, so gamma_mse/delta_cos "
            "cannot use it; use teacher_cache_mode=exact or set both weights to 0"
        )
    if cfg.generates or cfg.prompt_column is not None:
        problems.append(
            "teacher_signal: the cache covers the corpus's packed blocks, not generated "
            "(lmbda, seq_kd) or prompt_column batches; set teacher_signal=live"
        )
    if cfg.teacher_signal == "cache" and cfg.data_pipeline == "ray_data":
        problems.append(
            "teacher_signal: the cache is read beside data_pipeline='local' blocks; the "
            "streamed ray_data corpus does not carry it yet. Use data_pipeline=local "
            "with teacher_signal=cache, or teacher_signal=live"
        )
    if cfg.teacher_signal == "cache" and not cfg.needs_teacher:
        problems.append(
            "teacher_signal: lm_ce alone runs no teacher, so there is nothing to cache; "
            "set teacher_signal=live or a teacher loss weight (alpha_kl)"
        )
