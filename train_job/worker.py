"""The function each Ray Train worker runs: kd's loop plus the few lines that touch Ray.

Ray-specific parts only: device and rank from the train context, DDP through
`prepare_model`, exactly one `ray.train.report` per `kd.train.Event` (a collective in
Train V2: every rank sees the same events, because the schedule lives only in
`kd.train.schedule`), a checkpoint attached by rank 0 to the report of a save step, and
resume through `ray.train.get_checkpoint()`. Rank 0 writes the artifact
folder with plain file APIs into `Storage.staged` (on S3: a local copy, then uploaded).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from jobs.paths import RAY_KEY, JobPaths
from kd import pipeline, rollout
from kd.config import DistillConfig
from kd.exports import write_json
from kd.state import load as load_state
from kd.state import load_state_dict, save, state_dict
from kd.train import Event, Run, setup, train
from train_job import stream, teacher_cache
from train_job.ingest import summary as corpus_summary
from train_job.registry_client import RegistryClient


class CheckpointWriteError(RuntimeError):
    """Storage refused a checkpoint; the message names the step, folder and OS error."""


def _gather(obj: object) -> list[object]:
    if dist.is_available() and dist.is_initialized():
        out: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _load_checkpoint() -> dict | None:
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:  # safetensors + JSON; a pickled state.pt is refused
        return load_state(d)


def _report_with_checkpoint(run: Run, metrics: dict, history: list[dict], rank: int) -> None:
    """One `ray.train.report`; rank 0 attaches the state_dict and the resolved config."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            save(state_dict(run, history), tmp)
            write_json(Path(tmp) / "distill_config.json", run.cfg.model_dump(mode="json"))
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = DistillConfig.model_validate(loop_config["config"])  # workers re-validate
    paths = JobPaths(loop_config["storage"], loop_config["job_id"])
    registry = RegistryClient.connect(loop_config.get("registry"))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.cpus_per_worker))
    device = ray.train.torch.get_device()
    started = time.time()

    state = _load_checkpoint()
    cache = loop_config.get("teacher_cache")  # train_job.teacher_cache.prepare
    signal = teacher_cache.load(paths.storage, cache["key"]) if cache else None
    run = setup(
        cfg,
        device=device,
        rank=rank,
        world=world,
        trust_remote_code=bool(loop_config.get("trust_remote_code", False)),
        wrap_model=ray.train.torch.prepare_model,
        kept_layers=state["kept_layers"] if state else None,
        signal=signal,
        **stream.worker_data(loop_config, cfg, rank, world),  # {} on data_pipeline='local'
    )
    history: list[dict] = list(state.get("history", [])) if state else []
    before: dict = {}
    if rank == 0:
        with paths.storage.staged(paths.artifacts_key) as out:  # keeps before.json for resumes
            before = pipeline.evaluate_before(run, out, preflight=loop_config.get("preflight"))
    if state is not None:
        load_state_dict(run, state)
    resumed_from = run.step
    if rank == 0:
        registry.update(
            paths.job_id,
            state="running",
            step=run.step,
            total_steps=cfg.max_steps,
            resumed_from_step=resumed_from if state else None,
            before={k: before.get(k) for k in ("teacher_ppl", "student_ppl")},
        )
    # What each report carries: the last logged metrics. kd.train already reduced them
    # over the ranks (token-weighted loss terms, tokens/s summed), so every rank holds
    # the same numbers and rank 0's are the job's.
    reported: dict[str, float] = {"step": float(run.step)}
    t0, step0 = time.time(), run.step
    run_uri = paths.storage.uri(f"{RAY_KEY}/{paths.job_id}")

    def on_event(event: Event) -> None:
        nonlocal reported
        if event.due.log:
            m = dict(event.metrics)
            reported = m
            if rank == 0:
                history.append(m)
                rate = (run.step - step0) / max(time.time() - t0, 1e-9)
                eta = (cfg.max_steps - run.step) / rate if rate > 0 else None
                registry.update(paths.job_id, step=run.step, eta_s=eta, metrics=m)
        if not event.due.save:
            ray.train.report(dict(reported))
            return
        try:  # Ray copies the checkpoint to storage inside report()
            _report_with_checkpoint(run, dict(reported), history, rank)
        except OSError as e:  # full disk, read-only or unreachable storage
            raise CheckpointWriteError(
                f"could not write the step-{run.step} checkpoint under {run_uri}: {e}; "
                "earlier checkpoints are kept"
            ) from None

    source = rollout.BatchSource(run)
    t_train = time.perf_counter()
    train(run, on_event, source)
    train_s = time.perf_counter() - t_train
    blocks_by_rank = _gather(run.sampler.served)  # collectives: every rank calls them
    # this job's teacher forwards: the cache build's plus every rank's live ones
    forwards = (cache or {}).get("teacher_forwards", 0) + sum(_gather(run.teacher_forwards))
    # each rank's rollouts (count, digest of the continuations): every worker writes its own
    rollouts_by_rank = _gather([source.generated, source.digest.hexdigest()[:16]])
    if rank == 0:
        registry.update(paths.job_id, state="exporting", step=run.step)
        extra = {
            "world_size": world,
            "blocks_seen_by_rank": blocks_by_rank,
            "rollouts_by_rank": rollouts_by_rank if cfg.generates else None,
            "resumed_from_step": resumed_from if state else None,
            "teacher_forwards": forwards,
            "teacher_cache": cache,
        }
        if loop_config.get("corpus"):  # the corpus cache (data_pipeline='ray_data')
            extra["ingest"] = corpus_summary(loop_config["corpus"])
        if loop_config.get("shape_search"):  # the driver's Ray Tune search that chose the shape
            extra["shape_search"] = loop_config["shape_search"]
        with paths.storage.staged(paths.artifacts_key) as out:
            metrics = pipeline.finalize(run, out, before, history, train_s, started, extra=extra)
        print(json.dumps({"final": pipeline.summary_line(metrics)}), flush=True)
