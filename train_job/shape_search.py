"""The shape search under a parameter budget: one Ray Tune trial per candidate shape.

`kd.shapes.candidate_shapes` enumerates shapes within ±tol of `student_params`
(depth only, width only, depth + width). Each becomes a Ray Tune trial of a plain
function trainable: it prunes the teacher to that shape (kd.train.setup, which calls
kd.width), runs a short KD of `steps` optimizer steps (kd.train.train) and reports
held-out perplexity. Ray Tune places and runs the trials (in parallel when the
cluster has room; each asks for `cpus_per_worker` CPUs, and a GPU with use_gpu); we
write no scheduler. The trial with the lowest held-out perplexity wins;
`winner_config` turns it into the explicit-shape DistillConfig of the full run.

Everything that is not Ray lives in kd/; this file only builds the trial configs,
calls Tuner and reads the ResultGrid. Trials show up in the Ray dashboard under the
experiment `name`, and their results in `storage_path/name`.
"""

from __future__ import annotations

import time

from jobs.paths import RAY_KEY, SHAPE_SEARCH_FILE, JobPaths
from kd.config import DistillConfig
from kd.shapes import Shape, candidate_shapes, shape_params

METRIC = "eval_ppl"
SEARCH_FILE = SHAPE_SEARCH_FILE  # in the job's artifacts: the candidates and the winner


def teacher_config(cfg: DistillConfig, trust_remote_code: bool = False):
    """The teacher's HF config, without loading its weights."""
    from transformers import AutoConfig

    from kd.models import local_folder

    return AutoConfig.from_pretrained(
        local_folder(cfg.teacher_model), trust_remote_code=trust_remote_code
    )


def shape_fields(shape: Shape) -> dict[str, int | None]:
    """The DistillConfig fields that pin a derived student to `shape`."""
    return {
        "student_params": None,
        "student_layers": shape.layers,
        "student_hidden": shape.hidden,
        "student_ffn": shape.ffn,
        "student_heads": shape.heads,
        "student_kv_heads": shape.kv_heads,
    }


def trial_config(cfg: DistillConfig, shape: Shape, steps: int) -> DistillConfig:
    """The short-KD job of one candidate: same data, loss and seed, `steps` steps, one
    worker, no checkpoints or exports (a trial is thrown away after it reports)."""
    update = {
        **shape_fields(shape),
        "max_steps": steps,
        "warmup_steps": min(cfg.warmup_steps, steps - 1),
        "save_every": 0,
        "eval_every": 0,
        "num_workers": 1,
        "export_formats": ["safetensors"],
        "export_onnx": None,  # the deprecated switches, in case the job still used them
        "post_training_quant": None,
    }
    return DistillConfig.model_validate(cfg.model_dump() | update)


def winner_config(cfg: DistillConfig, shape: Shape) -> DistillConfig:
    """The full job at the winning shape (the budget resolved into explicit sizes)."""
    return DistillConfig.model_validate(cfg.model_dump() | shape_fields(shape))


def run_trial(config: dict) -> None:
    """The Ray Tune function trainable: prune, short KD, report held-out perplexity."""
    import ray.tune
    import torch

    from kd.train import eval_student_ppl, setup, train

    cfg = DistillConfig.model_validate(config["candidate"]["job"])  # re-validated, as in workers
    torch.set_num_threads(max(1, cfg.cpus_per_worker))
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    run = setup(cfg, device=device)
    before = eval_student_ppl(run)
    last = train(run)
    ray.tune.report(
        {
            METRIC: eval_student_ppl(run),
            "eval_ppl_before": before,
            "train_loss": float(last.get("loss", float("nan"))),
            "params": sum(p.numel() for p in run.student.parameters()),
            "steps": run.step,
            "trial_s": time.perf_counter() - t0,
        }
    )


def search_shapes(
    cfg: DistillConfig,
    *,
    steps: int = 25,
    tol: float = 0.03,
    shapes: list[Shape] | None = None,
    storage_path: str | None = None,
    name: str | None = None,
    max_concurrent: int | None = None,
    trust_remote_code: bool = False,
) -> dict[str, object]:
    """Run every candidate as a Ray Tune trial; the report names the winner.

    cfg.student_params is the budget (or pass `shapes` directly). Ray must be
    initialised (or `ray.init()` joins RAY_ADDRESS / starts a local one). Returns
    {"budget", "steps", "candidates": [{name, shape, params, eval_ppl, ...}],
    "winner", "winner_shape", "experiment_path"}.
    """
    from ray import tune

    t_cfg = teacher_config(cfg, trust_remote_code)
    if shapes is None:
        if cfg.student_params is None:
            raise ValueError("student_params: the shape search needs a budget, e.g. 60M")
        shapes = candidate_shapes(t_cfg, cfg.student_params, tol)
    if not shapes:
        raise ValueError(
            f"student_params: no shape of the teacher is within ±{tol:.0%} of "
            f"{cfg.student_params:,}; choose a budget between the smallest and the teacher"
        )
    jobs = [
        {"name": s.name, "job": trial_config(cfg, s, steps).model_dump(mode="json")} for s in shapes
    ]
    resources = {"cpu": cfg.cpus_per_worker, "gpu": 1 if cfg.use_gpu else 0}
    tuner = tune.Tuner(
        tune.with_resources(run_trial, resources),
        param_space={"candidate": tune.grid_search(jobs)},
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="min", max_concurrent_trials=max_concurrent
        ),
        run_config=tune.RunConfig(
            name=name or f"shape-search-{int(time.time())}",
            storage_path=storage_path,
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
        ),
    )
    grid = tuner.fit()
    return _report(cfg, t_cfg, shapes, grid, steps)


def _report(cfg: DistillConfig, t_cfg, shapes: list[Shape], grid, steps: int) -> dict:
    by_name = {s.name: s for s in shapes}
    rows, errors = [], []
    for result in grid:
        cand = result.config["candidate"]
        shape = by_name[cand["name"]]
        row = {"name": shape.name, "shape": shape.to_dict()}
        row["params"] = shape_params(t_cfg, shape)
        if result.error is not None:
            errors.append(f"{shape.name}: {result.error}")
            row["error"] = str(result.error)[:500]
        else:
            keys = (METRIC, "eval_ppl_before", "train_loss", "trial_s")
            row.update({k: result.metrics.get(k) for k in keys})
        rows.append(row)
    ok = [r for r in rows if "error" not in r]
    if not ok:
        raise RuntimeError("every shape-search trial failed: " + "; ".join(errors))
    best = min(ok, key=lambda r: r[METRIC])
    return {
        "budget": cfg.student_params,
        "steps": steps,
        "candidates": sorted(rows, key=lambda r: r.get(METRIC) or float("inf")),
        "winner": best["name"],
        "winner_shape": best["shape"],
        "experiment_path": grid.experiment_path,
    }


def resolve_budget(
    cfg: DistillConfig, paths: JobPaths, registry, trust_remote_code: bool = False
) -> tuple[DistillConfig, dict | None]:
    """The job's config with a parameter budget turned into an explicit shape.

    With `student_params` and `search_steps` > 0 the driver runs the search before the
    TorchTrainer starts: one Ray Tune trial per candidate (visible in the dashboard as
    the experiment `<job_id>-shape-search`), the candidates and scores stored as the
    artifact shape_search.json and shown in the job's status. A resumed job reads that
    file and keeps its winner, so the search runs once per job and the checkpoints
    always match the shape. Without a budget, or with search_steps 0, `cfg` is returned
    unchanged (kd.shapes.default_shape then picks the shape in the workers).
    """
    if cfg.student_params is None or cfg.search_steps == 0:
        return cfg, None
    store, key = paths.storage, paths.artifact_key(SEARCH_FILE)
    if store.is_file(key):
        result = store.read_json(key)
        print(f"shape search: reusing {SEARCH_FILE} (winner {result['winner']})", flush=True)
    else:
        t_cfg = teacher_config(cfg, trust_remote_code)
        shapes = candidate_shapes(t_cfg, cfg.student_params)
        registry.update_sync(
            paths.job_id, metrics={"phase": "shape_search", "candidates": len(shapes)}
        )
        if len(shapes) == 1:  # nothing to compare: no trial is worth its model loads
            result = _only(cfg, t_cfg, shapes[0])
        else:
            storage_path, storage_fs = store.ray_storage(RAY_KEY)
            result = search_shapes(
                cfg,
                steps=cfg.search_steps,
                shapes=shapes or None,  # none: search_shapes says which budgets work
                # Tune keeps its trial folders on a shared folder; on S3 they stay on
                # the driver's disk and only the summary below is uploaded
                storage_path=storage_path if storage_fs is None else None,
                name=f"{paths.job_id}-shape-search",
                trust_remote_code=trust_remote_code,
            )
        store.write_json(key, result)
        for row in result["candidates"]:
            print(f"shape search: {_row_line(row)}", flush=True)
    winner = Shape(**result["winner_shape"])
    registry.update_sync(paths.job_id, metrics={"phase": "training", "shape": result["winner"]})
    return winner_config(cfg, winner), result


def _only(cfg: DistillConfig, t_cfg, shape: Shape) -> dict:
    """The search's record when the budget admits one shape (no trial was run)."""
    row = {"name": shape.name, "shape": shape.to_dict(), "params": shape_params(t_cfg, shape)}
    return {
        "budget": cfg.student_params,
        "steps": 0,
        "candidates": [row],
        "winner": shape.name,
        "winner_shape": shape.to_dict(),
        "experiment_path": None,
    }


def _row_line(row: dict) -> str:
    s = row["shape"]
    score = f"{row[METRIC]:.2f}" if row.get(METRIC) is not None else row.get("error", "?")
    return (
        f"{row['name']}: layers={s['layers']} hidden={s['hidden']} ffn={s['ffn']} "
        f"heads={s['heads']}/{s['kv_heads']} params={row['params']:,} held-out ppl {score}"
    )
