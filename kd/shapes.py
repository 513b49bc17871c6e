"""Student shapes: parameter counting from a config, and candidate shapes for a budget.

A `Shape` is the five numbers that size a Llama-style decoder: layers, hidden size,
FFN (intermediate) size, query heads and KV heads. `head_dim` always stays the
teacher's, so a pruned student's attention keeps the teacher's per-head geometry and
`hidden_size` no longer has to equal `heads * head_dim`.

`count_params(config)` is exact for the Llama family (Llama, Mistral, SmolLM): it
equals the number of distinct parameters of the Hugging Face model built from the
config, tied embeddings counted once. `candidate_shapes` enumerates a few shapes
that meet a parameter budget within a tolerance: depth only, width only (FFN only,
hidden + FFN, hidden + FFN + heads) and depth + width mixes. Nothing here needs
weights or data; it is cheap enough to call from a config validator.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace

from kd.spec import parse_params  # noqa: F401  (re-exported: shapes are given as '60M')


@dataclass(frozen=True)
class Shape:
    """Sizes of a Llama-style decoder; `name` says which family produced it."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    name: str = ""

    @classmethod
    def of(cls, config, name: str = "teacher") -> Shape:
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            ffn=config.intermediate_size,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            name=name,
        )

    def sizes(self) -> tuple[int, int, int, int, int]:
        return (self.layers, self.hidden, self.ffn, self.heads, self.kv_heads)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def prunes_width(self, teacher: Shape) -> bool:
        return self.sizes()[1:] != teacher.sizes()[1:]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def count_params(config) -> int:
    """Distinct parameters of the Llama-family model built from `config` (exact).

    embeddings V·H (+ an untied LM head V·H) + final norm H + per layer:
    q, o: H·A·D each; k, v: H·K·D each (+ biases when attention_bias: A·D + 2·K·D + H);
    gate, up, down: H·F each (+ biases when mlp_bias: 2·F + H); two norms: 2·H.
    """
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    a = config.num_attention_heads
    k = getattr(config, "num_key_value_heads", None) or a
    d = head_dim(config)
    attn = 2 * h * a * d + 2 * h * k * d
    if getattr(config, "attention_bias", False):
        attn += a * d + 2 * k * d + h
    mlp = 3 * h * f
    if getattr(config, "mlp_bias", False):
        mlp += 2 * f + h
    layer = attn + mlp + 2 * h
    head = 0 if getattr(config, "tie_word_embeddings", True) else v * h
    return v * h + head + h + config.num_hidden_layers * layer


def apply_shape(teacher_config, shape: Shape):
    """A copy of the teacher's config with the shape's sizes; head_dim kept explicit."""
    cfg = copy.deepcopy(teacher_config)
    cfg.head_dim = head_dim(teacher_config)  # hidden/heads no longer gives it
    cfg.num_hidden_layers = shape.layers
    cfg.hidden_size = shape.hidden
    cfg.intermediate_size = shape.ffn
    cfg.num_attention_heads = shape.heads
    cfg.num_key_value_heads = shape.kv_heads
    return cfg


def shape_params(teacher_config, shape: Shape) -> int:
    return count_params(apply_shape(teacher_config, shape))


def check_shape(shape: Shape, teacher: Shape) -> list[str]:
    """Every reason `shape` cannot be pruned out of `teacher`, each naming its field."""
    problems = []
    for field, mine, theirs in (
        ("student_layers", shape.layers, teacher.layers),
        ("student_hidden", shape.hidden, teacher.hidden),
        ("student_ffn", shape.ffn, teacher.ffn),
        ("student_heads", shape.heads, teacher.heads),
        ("student_kv_heads", shape.kv_heads, teacher.kv_heads),
    ):
        if not 1 <= mine <= theirs:
            problems.append(f"{field}: {mine} must be between 1 and the teacher's {theirs}")
    if problems:
        return problems
    group = teacher.heads // teacher.kv_heads
    if shape.hidden % shape.heads:
        lo = shape.hidden // shape.heads * shape.heads
        problems.append(
            f"student_hidden: {shape.hidden} is not a multiple of student_heads={shape.heads}; "
            "transformers' Llama config requires it even though head_dim stays the "
            f"teacher's. Use {lo or shape.heads} or {lo + shape.heads}"
        )
    if shape.heads % shape.kv_heads:
        problems.append(
            f"student_heads: {shape.heads} query heads cannot be split evenly over "
            f"{shape.kv_heads} KV heads; choose student_heads a multiple of student_kv_heads"
        )
    elif shape.heads // shape.kv_heads > group:
        problems.append(
            f"student_heads: {shape.heads} heads over {shape.kv_heads} KV heads is "
            f"{shape.heads // shape.kv_heads} per KV group but the teacher has {group}; "
            f"use at most {group * shape.kv_heads} heads or more KV heads"
        )
    return problems


# ---------------------------------------------------------------------------------
# Candidates under a budget
# ---------------------------------------------------------------------------------
def _round(x: float, align: int, hi: int) -> int:
    return max(align, min(hi, int(round(x / align)) * align)) if hi >= align else hi


def _fit_ffn(teacher_config, shape: Shape, target: int, align: int, hi: int) -> Shape:
    """The same shape with the FFN size (multiple of align, ≤ hi) closest to the budget."""
    options = [replace(shape, ffn=f) for f in range(align, hi + 1, align)] or [shape]
    return min(options, key=lambda s: abs(shape_params(teacher_config, s) - target))


def _scaled(teacher: Shape, layers: int, s: float, heads_too: bool, align: int) -> Shape:
    """Hidden, FFN (and query heads per group) scaled by s.

    The hidden size is rounded to a multiple of lcm(heads, 8): transformers' Llama
    config rejects a hidden size that the head count does not divide."""
    group = teacher.heads // teacher.kv_heads
    per_group = max(1, round(s * group)) if heads_too else group
    heads = per_group * teacher.kv_heads
    step = math.lcm(heads, 8)
    return Shape(
        layers=layers,
        hidden=_round(s * teacher.hidden, step, teacher.hidden),
        ffn=_round(s * teacher.ffn, align, teacher.ffn),
        heads=heads,
        kv_heads=teacher.kv_heads,
    )


def _width_family(
    teacher_config, teacher: Shape, layers: int, target: int, heads_too: bool, align: int
) -> Shape:
    """Proportional hidden/FFN(/heads) closest to the budget, then the FFN fine-tuned."""
    scales = [i / 200 for i in range(10, 201)]
    shapes = [_scaled(teacher, layers, s, heads_too, align) for s in scales]
    shapes = [s for s in shapes if s.hidden % s.heads == 0]
    best = min(shapes, key=lambda s: abs(shape_params(teacher_config, s) - target))
    return _fit_ffn(teacher_config, best, target, align, teacher.ffn)


def candidate_shapes(
    teacher_config, target_params: int, tol: float = 0.03, align: int | None = None
) -> list[Shape]:
    """Distinct shapes within ±tol of target_params, named by family.

    depth               fewer layers, teacher width
    width_ffn           all layers, smaller FFN
    width_hidden_ffn    all layers, hidden and FFN scaled together (Minitron's best)
    width_all           as above, query heads per KV group scaled too
    depth_width_{1,2}   layers 1/3 and 2/3 of the way from the depth-only count to the
                        teacher's, then hidden + FFN scaled to fit
    Sizes are multiples of `align` (default 32, or 8 for teachers narrower than 256).
    """
    teacher = Shape.of(teacher_config)
    align = align or (32 if teacher.hidden >= 256 else 8)
    n = teacher.layers

    def near(s: Shape) -> bool:
        return abs(shape_params(teacher_config, s) - target_params) <= tol * target_params

    depth = min(
        (replace(teacher, layers=k) for k in range(1, n + 1)),
        key=lambda s: abs(shape_params(teacher_config, s) - target_params),
    )
    found = [replace(depth, name="depth")]
    ffn_only = _fit_ffn(teacher_config, teacher, target_params, align, teacher.ffn)
    found.append(replace(ffn_only, name="width_ffn"))
    for name, heads_too in (("width_hidden_ffn", False), ("width_all", True)):
        s = _width_family(teacher_config, teacher, n, target_params, heads_too, align)
        found.append(replace(s, name=name))
    for i, frac in enumerate((1 / 3, 2 / 3), start=1):
        layers = round(depth.layers + frac * (n - depth.layers))
        s = _width_family(teacher_config, teacher, layers, target_params, False, align)
        found.append(replace(s, name=f"depth_width_{i}"))
    out: list[Shape] = []
    for s in found:
        if near(s) and all(s.sizes() != o.sizes() for o in out):
            out.append(s)
    return out


def default_shape(candidates: list[Shape]) -> Shape:
    """The shape used for a budget when no search runs (`python -m kd`, search_steps=0).

    Measured (bench/pruning.py, BENCHMARKS.md: SmolLM2-135M, wikitext-2, 32 KD steps):
    depth + width, a third of the way from the depth-only layer count to the teacher's,
    was the best shape after KD at ~81M (53.87 vs depth only 53.92, width only 59.53+)
    and second at ~50M (152.5; depth_width_2 110.8, depth only 164.1, width only 230+).
    Pure width pruning, Minitron's pick after billions of tokens, came behind both at
    this training budget. The search (a Ray job) trains each candidate and picks for
    the budget at hand; this is the fallback.
    """
    if not candidates:
        raise ValueError("no candidate shapes: the budget cannot be met within the tolerance")
    by_name = {s.name: s for s in candidates}
    for name in ("depth_width_1", "depth_width_2", "depth", "width_hidden_ffn"):
        if name in by_name:
            return by_name[name]
    return candidates[0]


def requested_shape(cfg, teacher_config) -> Shape | None:
    """The shape a DistillConfig asks for, or None when it asks for no width change
    (the depth-only student of today, sized by student_layers).

    student_params picks `default_shape` of the candidates; explicit student_* fields
    override the teacher's sizes one by one.
    """
    teacher = Shape.of(teacher_config)
    if cfg.student_params is not None:
        return default_shape(candidate_shapes(teacher_config, cfg.student_params))
    fields = (cfg.student_hidden, cfg.student_ffn, cfg.student_heads, cfg.student_kv_heads)
    if all(v is None for v in fields):
        return None
    hidden, ffn, heads, kv = (
        mine if mine is not None else theirs
        for mine, theirs in zip(fields, teacher.sizes()[1:], strict=True)
    )
    # Width given without layers keeps every layer (what is not given stays the
    # teacher's); the plain 'teacher' spec keeps its default of half the layers.
    layers = cfg.student_layers or teacher.layers
    shape = Shape(layers, hidden, ffn, heads, kv, name="requested")
    problems = check_shape(shape, teacher)
    if problems:
        raise ValueError("; ".join(problems))
    return shape
