"""Width pruning (Minitron-style): activation importance, then weights sliced to fit.

Importance comes from one no-grad forward of the teacher over calibration blocks,
with hooks, averaged over real (non-padding) tokens:

* MLP neurons: mean |a| of the intermediate units (the input of down_proj), per layer;
* attention heads: mean L2 norm of each head's output (the input of o_proj, split
  per head, before the output projection mixes heads), per layer;
* embedding channels: mean |a| of the normalized hidden states (the outputs of every
  RMSNorm: both per layer and the final one), summed over all of them, because one
  hidden size is shared by the embeddings, every residual stream and the LM head.

GQA. Query head h reads KV head h // g (g = heads / kv_heads, Hugging Face's
`repeat_kv`). Pruning keeps that valid in two steps: a KV group's score is the sum of
its query heads' scores, and the top `kv_heads` groups are kept whole (their k/v
rows); then inside each kept group the top `heads / kv_heads` query heads are kept.
Every kept group keeps the same number of query heads, so `heads % kv_heads == 0`
holds and query head j of the student reads KV head j // (heads / kv_heads), as in
the teacher. Asking for fewer query heads with all KV heads prunes queries evenly per
group; asking for fewer KV heads drops whole groups.

The student is a fresh model of the teacher's class built from `shapes.apply_shape`
(head_dim stays the teacher's), loaded with the teacher's weights sliced to the kept
indices (kept indices stay in ascending order, so keeping everything gives the
teacher back exactly). Depth combines with width: the kept layers are chosen first
(block influence, `kd.models`), then each kept layer is sliced with its own scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kd.models import ModelLoadError, decoder_layers
from kd.shapes import Shape, apply_shape, head_dim


@dataclass
class Importance:
    """Activation importance of one teacher (L = teacher layers)."""

    hidden: Tensor  # [H] mean |normalized hidden| summed over every RMSNorm output
    ffn: Tensor  # [L, F] mean |intermediate activation| per layer
    heads: Tensor  # [L, A] mean per-head output norm per layer
    tokens: int  # real tokens the means are over


@dataclass
class WidthKeep:
    """Kept indices into the teacher's tensors, ascending; one list per kept layer."""

    layers: list[int]
    hidden: list[int]
    ffn: list[list[int]]
    heads: list[list[int]]  # query heads
    kv_heads: list[list[int]]


def _llama_parts(layer: nn.Module, i: int) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
    try:
        return (
            layer.self_attn.o_proj,
            layer.mlp.down_proj,
            [layer.input_layernorm, layer.post_attention_layernorm],
        )
    except AttributeError as e:
        raise ModelLoadError(
            f"width pruning needs Llama-style decoder layers (self_attn.o_proj, "
            f"mlp.down_proj, input_layernorm, post_attention_layernorm); layer {i} of this "
            f"model has none of {e.name!r}. Prune depth only (student_model='teacher:layers=N')"
        ) from e


@torch.no_grad()
def importance(model: nn.Module, batches: list[dict[str, Tensor]]) -> Importance:
    """One forward over `batches` (input_ids, attention_mask [B, T]) with hooks."""
    layers = decoder_layers(model)
    cfg = model.config
    n, a, d = len(layers), cfg.num_attention_heads, head_dim(cfg)
    hidden = torch.zeros(cfg.hidden_size, dtype=torch.float64)
    ffn = torch.zeros(n, cfg.intermediate_size, dtype=torch.float64)
    heads = torch.zeros(n, a, dtype=torch.float64)
    mask: list[Tensor] = []  # [B, T, 1] of the current batch, set before each forward

    def masked_sum(x: Tensor) -> Tensor:  # [B, T, X] -> [X], padding excluded
        return (x.float() * mask[0]).sum(dim=(0, 1)).double()

    def on_heads(i):
        def fn(mod, args):
            x = args[0]  # [B, T, A·D]
            heads[i] += masked_sum(x.unflatten(-1, (a, d)).float().norm(dim=-1))

        return fn

    def on_ffn(i):
        def fn(mod, args):
            ffn[i] += masked_sum(args[0].abs())  # [B, T, F]

        return fn

    def on_norm(mod, args, out):
        hidden.add_(masked_sum(out.abs()))  # [B, T, H]

    handles = []
    for i, layer in enumerate(layers):
        o_proj, down, norms = _llama_parts(layer, i)
        handles.append(o_proj.register_forward_pre_hook(on_heads(i)))
        handles.append(down.register_forward_pre_hook(on_ffn(i)))
        handles += [m.register_forward_hook(on_norm) for m in norms]
    handles.append(model.get_decoder().norm.register_forward_hook(on_norm))
    tokens = 0
    was_training = model.training
    decoder = model.get_decoder()  # no LM head: the [B, T, V] logits are not needed
    try:
        model.eval()
        for b in batches:
            mask[:] = [b["attention_mask"].float()[..., None]]
            decoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            tokens += int(b["attention_mask"].sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    t = max(tokens, 1)
    return Importance(hidden / t, ffn / t, heads / t, tokens)


# ---------------------------------------------------------------------------------
# Choosing what to keep
# ---------------------------------------------------------------------------------
def top_k(scores: Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, ascending (ties: the lower index wins)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def select_heads(
    scores: Tensor, kv_total: int, heads: int, kv_heads: int
) -> tuple[list[int], list[int]]:
    """(kept query heads, kept KV heads) for one layer; see the module docstring.

    scores: [A] per query head. Query head h belongs to KV group h // (A / kv_total).
    """
    group = len(scores) // kv_total
    per_group = heads // kv_heads
    group_scores = scores.view(kv_total, group).sum(dim=1)  # [K]
    kv = top_k(group_scores, kv_heads)
    q = [g * group + j for g in kv for j in top_k(scores[g * group : (g + 1) * group], per_group)]
    return q, kv


def select(imp: Importance, layers: list[int], shape: Shape, kv_total: int) -> WidthKeep:
    """Kept indices for `shape` from the teacher's importance, for the kept `layers`."""
    picks = [select_heads(imp.heads[i], kv_total, shape.heads, shape.kv_heads) for i in layers]
    return WidthKeep(
        layers=list(layers),
        hidden=top_k(imp.hidden, shape.hidden),
        ffn=[top_k(imp.ffn[i], shape.ffn) for i in layers],
        heads=[q for q, _ in picks],
        kv_heads=[kv for _, kv in picks],
    )


def first_k(layers: list[int], shape: Shape, kv_total: int, group: int) -> WidthKeep:
    """The no-importance baseline: the first k of everything (groups kept whole first)."""
    kv = list(range(shape.kv_heads))
    q = [g * group + j for g in kv for j in range(shape.heads // shape.kv_heads)]
    return WidthKeep(
        layers=list(layers),
        hidden=list(range(shape.hidden)),
        ffn=[list(range(shape.ffn)) for _ in layers],
        heads=[q for _ in layers],
        kv_heads=[kv for _ in layers],
    )


# ---------------------------------------------------------------------------------
# Slicing
# ---------------------------------------------------------------------------------
_LAYER_KEY = re.compile(r"^(?P<pre>.*\.layers\.)(?P<i>\d+)\.(?P<rest>.+)$")


def _rows(heads: list[int], d: int) -> Tensor:
    """Row indices of the kept heads in a [heads·D, ...] projection."""
    return torch.tensor([h * d + j for h in heads for j in range(d)], dtype=torch.long)


def _slice_layer(name: str, w: Tensor, hid: Tensor, ffn: Tensor, q: Tensor, kv: Tensor) -> Tensor:
    """One per-layer tensor cut to the kept (out rows, in columns)."""
    rules = {  # module suffix -> (rows, cols); None keeps that dimension whole
        "self_attn.q_proj": (q, hid),
        "self_attn.k_proj": (kv, hid),
        "self_attn.v_proj": (kv, hid),
        "self_attn.o_proj": (hid, q),
        "mlp.gate_proj": (ffn, hid),
        "mlp.up_proj": (ffn, hid),
        "mlp.down_proj": (hid, ffn),
        "input_layernorm": (hid, None),
        "post_attention_layernorm": (hid, None),
    }
    module, _, kind = name.rpartition(".")
    if module not in rules:
        raise ModelLoadError(
            f"width pruning does not know how to slice '{name}'; it supports Llama-style "
            "layers (q/k/v/o_proj, gate/up/down_proj, two RMSNorms). Prune depth only"
        )
    rows, cols = rules[module]
    w = w.index_select(0, rows)
    if kind == "weight" and w.ndim == 2 and cols is not None:
        w = w.index_select(1, cols)
    return w


def sliced_state(teacher: nn.Module, keep: WidthKeep) -> dict[str, Tensor]:
    """The teacher's state dict with every tensor cut to `keep`, layers renumbered."""
    d = head_dim(teacher.config)
    hid = torch.tensor(keep.hidden, dtype=torch.long)
    new_index = {old: new for new, old in enumerate(keep.layers)}
    out: dict[str, Tensor] = {}
    for name, w in teacher.state_dict().items():
        m = _LAYER_KEY.match(name)
        if m is None:  # embeddings, final norm, LM head: [V, H] or [H]
            out[name] = w.index_select(w.ndim - 1, hid).clone()
            continue
        old = int(m.group("i"))
        if old not in new_index:
            continue
        j = new_index[old]
        ffn = torch.tensor(keep.ffn[j], dtype=torch.long)
        q, kv = _rows(keep.heads[j], d), _rows(keep.kv_heads[j], d)
        key = f"{m.group('pre')}{j}.{m.group('rest')}"
        out[key] = _slice_layer(m.group("rest"), w, hid, ffn, q, kv).clone()
    return out


def prune(teacher: nn.Module, keep: WidthKeep) -> nn.Module:
    """A new model of the teacher's class with the kept layers, channels and heads."""
    t_cfg = teacher.config
    shape = Shape(
        len(keep.layers),
        len(keep.hidden),
        len(keep.ffn[0]) if keep.ffn else t_cfg.intermediate_size,
        len(keep.heads[0]) if keep.heads else t_cfg.num_attention_heads,
        len(keep.kv_heads[0]) if keep.kv_heads else t_cfg.num_key_value_heads,
    )
    cfg = apply_shape(t_cfg, shape)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [t_cfg.layer_types[i] for i in keep.layers]
    student = type(teacher)(cfg).to(dtype=next(teacher.parameters()).dtype)
    missing, unexpected = student.load_state_dict(sliced_state(teacher, keep), strict=False)
    tied = getattr(cfg, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ModelLoadError(f"width pruning mismatch: missing={missing} unexpected={unexpected}")
    if tied:
        student.tie_weights()
    for p in student.parameters():
        p.requires_grad_(True)
    return student


# ---------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------
def _stats(x: Tensor) -> dict[str, float]:
    x = x.flatten().float()
    q = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9])).tolist()
    return {
        "min": round(float(x.min()), 5),
        "p10": round(q[0], 5),
        "median": round(q[1], 5),
        "p90": round(q[2], 5),
        "max": round(float(x.max()), 5),
    }


def summary(imp: Importance, keep: WidthKeep) -> dict[str, object]:
    """Scores summarised (per-layer head scores in full) and the kept indices."""
    kept_ffn = torch.stack([imp.ffn[i, k] for i, k in zip(keep.layers, keep.ffn, strict=True)])
    return {
        "calibration_tokens": imp.tokens,
        "scores": {
            "hidden": _stats(imp.hidden),
            "hidden_kept": _stats(imp.hidden[keep.hidden]),
            "ffn": _stats(imp.ffn),
            "ffn_kept": _stats(kept_ffn),
            "heads_per_layer": [[round(float(v), 4) for v in row] for row in imp.heads],
        },
        "kept": {
            "layers": keep.layers,
            "hidden": keep.hidden,
            "heads": keep.heads,
            "kv_heads": keep.kv_heads,
            "ffn": keep.ffn,
        },
    }


# ---------------------------------------------------------------------------------
# The entry point used when a student is derived
# ---------------------------------------------------------------------------------
def derive_student(
    teacher: nn.Module,
    layers: list[int],
    shape: Shape,
    calib: list[dict[str, Tensor]],
    eval_data=None,
    *,
    max_blocks: int = 8,
    batch_size: int = 4,
) -> tuple[nn.Module, dict[str, object]]:
    """(pruned student, report for before.json): importance on `calib`, keep `layers`
    and the top-k of everything else to `shape`. With `eval_data`, the report also has
    the held-out perplexity before training of this student and of the first-k
    baseline (same shape, no importance), so the effect of the ranking is visible."""
    import time

    from kd.evaluate import perplexity
    from kd.shapes import count_params

    t0 = time.perf_counter()
    imp = importance(teacher, calib)
    seconds = time.perf_counter() - t0
    kv_total = teacher.config.num_key_value_heads
    keep = select(imp, layers, shape, kv_total)
    student = prune(teacher, keep)
    report: dict[str, object] = {
        "shape": shape.to_dict(),
        "params": count_params(student.config),
        "importance_seconds": round(seconds, 2),
        **summary(imp, keep),
    }
    if eval_data is not None:
        group = teacher.config.num_attention_heads // kv_total
        baseline = prune(teacher, first_k(layers, shape, kv_total, group))
        for key, model in (("ppl_width", student), ("ppl_width_first_k", baseline)):
            report[key] = perplexity(model, eval_data, max_blocks=max_blocks, batch_size=batch_size)
    return student, report


def calibration_batches(data, n_blocks: int = 16, batch_size: int = 4) -> list[dict[str, Tensor]]:
    """The first n_blocks packed blocks of `data` (a kd.data.Packed) in batches.

    16 blocks of 256 tokens (4k tokens) rank SmolLM2-135M's channels in well under a
    minute on 2 cores; Minitron uses 1024 samples, which this can take on a GPU.
    """
    n = min(len(data), n_blocks)
    return [data.batch(list(range(i, min(i + batch_size, n)))) for i in range(0, n, batch_size)]


def derive_from_config(
    cfg, teacher: nn.Module, layers: list[int], train_data, eval_data=None
) -> tuple[nn.Module, dict[str, object]] | None:
    """The width-pruned student a DistillConfig asks for, or None when it asks for no
    width change (the caller then keeps today's depth-only student)."""
    from kd.shapes import requested_shape

    shape = requested_shape(cfg, teacher.config)
    if shape is None or not shape.prunes_width(Shape.of(teacher.config)):
        return None
    calib = calibration_batches(train_data, batch_size=cfg.per_device_batch_size)
    return derive_student(
        teacher,
        layers,
        shape,
        calib,
        eval_data,
        max_blocks=min(cfg.max_eval_blocks, 8),
        batch_size=cfg.per_device_batch_size,
    )
