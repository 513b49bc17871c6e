"""The student: loaded from its own checkpoint, or derived from the teacher by keeping
some of its decoder layers.

`build_student` is what `kd.train.setup` calls. A derived student keeps `student_layers`
(default: half) of the teacher's layers, chosen by `layer_selection`: every strategy in
`kd.spec.LAYER_SELECTIONS` is measured on held-out blocks and logged first, so the
choice is visible in metrics.json (`student_selection`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from kd import evaluate, models, shapes, width
from kd.config import LAYER_SELECTIONS, DistillConfig
from kd.data import Packed
from kd.models import decoder_layers

log = logging.getLogger(__name__)


def build_student(
    cfg: DistillConfig,
    teacher: nn.Module,
    teacher_tok,
    train_data: Packed,
    eval_data: Packed,
    *,
    trust_remote_code: bool = False,
    kept_layers: list[int] | None = None,
    log_fn: Callable[[str], None] = log.info,
) -> tuple[nn.Module, object, list[int] | None, dict[str, object]]:
    """(student, tokenizer, kept_layers, selection report).

    A derived student keeps `student_layers` (default: half) of the teacher's layers,
    chosen by `layer_selection`. Every strategy's held-out perplexity is measured and
    reported before training so the choice is visible. `kept_layers` (from a
    checkpoint) skips the measurement and rebuilds the same student.
    """
    if not cfg.derives_student:
        student, tok = models.load_model_and_tokenizer(
            cfg.student_model, trust_remote_code=trust_remote_code
        )
        models.check_vocab_compatible(
            teacher_tok, tok, teacher.config.vocab_size, student.config.vocab_size
        )
        return student, tok, None, {}
    n_total = len(models.decoder_layers(teacher))
    shape = shapes.requested_shape(cfg, teacher.config)  # None: depth only
    if cfg.student_params is not None and kept_layers is None:
        # A Ray job resolves the budget by its shape search before the workers start
        # (train_job.shape_search), so only a run without Ray gets here with a budget.
        log_fn(
            f"student_params={cfg.student_params:,}: default shape {shape.name} "
            f"{shape.sizes()} (the shape search runs in Ray jobs: python -m train_job)"
        )
    n_keep = shape.layers if shape else cfg.student_layers or max(1, n_total // 2)
    if n_keep > n_total:
        raise ValueError(
            f"student_layers={n_keep} but the teacher has only {n_total} layers; choose "
            f"1..{n_total}"
        )
    if kept_layers is not None:  # a resume: the same layers and, by its importance, width
        pruned = width.derive_from_config(cfg, teacher, kept_layers, train_data)
        student = pruned[0] if pruned else derive_student(teacher, kept_layers)
        return student, teacher_tok, kept_layers, {}
    keep, report = choose_layers(cfg, teacher, train_data, eval_data, n_keep, log_fn)
    pruned = width.derive_from_config(cfg, teacher, keep, train_data, eval_data)
    if pruned is not None:  # width pruning of the kept layers (kd/width.py)
        report["width"] = pruned[1]
        log_fn(f"width-pruned student {pruned[1]['shape']}: {pruned[1]['params']:,} params")
        return pruned[0], teacher_tok, keep, report
    return derive_student(teacher, keep), teacher_tok, keep, report


def choose_layers(
    cfg: DistillConfig,
    teacher: nn.Module,
    train_data: Packed,
    eval_data: Packed,
    n_keep: int,
    log_fn: Callable[[str], None] = log.info,
) -> tuple[list[int], dict[str, object]]:
    """(kept layers, report): every strategy's layers and held-out perplexity before
    training, so the choice `layer_selection` made is visible in before.json."""
    n_total = len(models.decoder_layers(teacher))
    calib = [train_data.batch(list(range(i, min(i + 2, len(train_data))))) for i in (0, 2)]
    influence = block_influence(teacher, calib)
    report: dict[str, object] = {"block_influence": [round(x, 5) for x in influence]}
    candidates = {}
    for strategy in LAYER_SELECTIONS:
        keep = select_layers(strategy, n_total, n_keep, influence)
        candidates[strategy] = keep
        ppl = evaluate.perplexity(
            derive_student(teacher, keep),
            eval_data,
            max_blocks=min(cfg.max_eval_blocks, 8),
            batch_size=cfg.per_device_batch_size,
        )
        report[f"ppl_{strategy}"] = ppl
        log_fn(
            f"derived student ({n_keep}/{n_total} layers, {strategy}): layers {keep}, "
            f"held-out perplexity before training {ppl:.1f}"
        )
    keep = candidates[cfg.layer_selection]
    report["chosen"] = cfg.layer_selection
    report["kept_layers"] = keep
    return keep, report


def uniform_layers(n_total: int, n_keep: int) -> list[int]:
    """n_keep indices spread evenly over [0, n_total), first and last included."""
    if n_keep >= n_total:
        return list(range(n_total))
    if n_keep == 1:
        return [0]
    return sorted({round(i * (n_total - 1) / (n_keep - 1)) for i in range(n_keep)})


@torch.no_grad()
def block_influence(model: nn.Module, batches: list[dict[str, Tensor]]) -> list[float]:
    """Per layer: mean over real tokens of 1 − cos(input, output) hidden states.

    A block whose output is nearly its input (low influence) is the cheapest to drop
    (ShortGPT, Men et al. 2024). Measured with forward hooks so that it works for any
    decoder whose layers take hidden states first.
    """
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0.0
    captured: dict[int, Tensor] = {}
    current_mask: list[Tensor] = []

    def hook(i):
        def fn(mod, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            captured[i] = ((1 - cos) * current_mask[0]).sum()

        return fn

    handles = [ly.register_forward_hook(hook(i), with_kwargs=True) for i, ly in enumerate(layers)]
    try:
        model.eval()
        for b in batches:
            m = b["attention_mask"].float()
            current_mask[:] = [m]
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            for i, v in captured.items():
                sums[i] += float(v)
            count += float(m.sum())
    finally:
        for h in handles:
            h.remove()
    return (sums / max(count, 1.0)).tolist()


def select_layers(
    strategy: str, n_total: int, n_keep: int, influence: list[float] | None = None
) -> list[int]:
    if strategy == "uniform":
        return uniform_layers(n_total, n_keep)
    if strategy == "first":
        return list(range(min(n_keep, n_total)))
    if strategy == "block_influence":
        if influence is None:
            raise ValueError("block_influence needs influence scores")
        order = sorted(range(n_total), key=lambda i: influence[i], reverse=True)
        return sorted(order[:n_keep])
    raise ValueError(f"unknown layer selection '{strategy}'; use one of {LAYER_SELECTIONS}")


def derive_student(teacher: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of the teacher keeping the decoder layers at indices `keep`."""
    student = copy.deepcopy(teacher)
    layers = decoder_layers(student)
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(kept):
        # attention modules index the KV cache by layer_idx
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    base = student.get_decoder()
    base.layers = kept
    cfg = student.config
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    for p in student.parameters():
        p.requires_grad_(True)
    return student
