"""`python -m train_job`: one distillation as a Ray Train TorchTrainer.

    python -m train_job --config job.json [--job-id ID] [--storage PATH] [key=value ...]

Runs unchanged under `ray job submit --working-dir . -- python -m train_job ...`
(it joins that cluster) or standalone (it starts a local Ray). Running it again with
the same --job-id resumes from the last checkpoint under <storage>/ray/<job-id>.
--storage and --config may be s3:// URIs (see jobs.storage for the S3 settings).
Exit code 0 on success, 1 when the job failed (the reason is printed and recorded),
2 for an invalid config, job id or storage root (unreachable S3 endpoint, no bucket),
or a resume whose model- or data-defining fields changed (kd.spec.MODEL_DATA_FIELDS).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from jobs.paths import RAY_KEY, JobPaths, new_job_id
from jobs.results import job_result
from jobs.resume import resume_changes
from jobs.storage import StorageError, is_uri, read_json_uri
from kd.config import DistillConfig, load_config, parse_overrides, resume_refusal

DEFAULT_STORAGE = os.environ.get("LLM2SLM_STORAGE", "llm2slm-storage")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m train_job", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="", help="JSON file (path or s3:// URI), a DistillConfig")
    ap.add_argument("--job-id", default=None, help="job id; the same id resumes that job")
    ap.add_argument("--storage", default=DEFAULT_STORAGE, help="shared folder or s3:// URI")
    ap.add_argument("--registry", default=None, help="job registry actor as namespace/name")
    ap.add_argument("--trust-remote-code", action="store_true", help="off unless set here")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    return ap.parse_args(argv)


def read_config(path: str, overrides: list[str]) -> DistillConfig:
    if not is_uri(path):
        return load_config(path, overrides)
    data = read_json_uri(path)  # written to S3 by the service
    data.update(parse_overrides(overrides))
    return DistillConfig.model_validate(data)


def _short_reason(e: BaseException) -> str:
    """The innermost cause of a (possibly wrapped) Ray Train failure, in one line."""
    seen, cur = [], e
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or getattr(cur, "cause", None) or None
        if isinstance(cur, dict):  # TrainingFailedError keeps worker errors per rank
            cur = next(iter(cur.values()), None)
    root = seen[-1]
    text = str(root).strip().splitlines()
    last = [ln for ln in text if ln.strip()][-1] if text else ""
    return f"{type(root).__name__}: {last}"[:2000]


def preflight(cfg: DistillConfig) -> None:
    """Fail in seconds, not after the workers start, on sources that cannot work."""
    from transformers import AutoConfig

    from kd.models import ModelLoadError, resolve_source
    from kd.sources import dataset_source

    names = [cfg.teacher_model] + ([] if cfg.derives_student else [cfg.student_model])
    for name in names:
        if resolve_source(name).kind == "hub":  # a wrong id fails here, not in N retries
            try:
                AutoConfig.from_pretrained(name)
            except Exception as e:
                raise ModelLoadError(f"cannot load model '{name}': {e}") from e
    for field, ds in (("dataset", cfg.dataset), ("eval_dataset", cfg.eval_dataset)):
        if ds is None:
            continue
        dataset_source(ds, field)  # a missing or (in an API job) relative path fails here


def prepare_teacher_cache(cfg: DistillConfig, paths: JobPaths, trust: bool, guard) -> dict | None:
    """The teacher signal cache this job reads (built here when needed), or None."""
    if cfg.teacher_signal == "live":
        return None
    from train_job import teacher_cache

    blocks = teacher_cache.training_blocks(cfg, trust)
    return teacher_cache.prepare(cfg, paths.storage, blocks, trust_remote_code=trust, guard=guard)


def build_trainer(
    cfg: DistillConfig,
    paths: JobPaths,
    registry: str | None,
    trust: bool,
    *,  # the optional inputs by name: several are dicts, easy to pass in the wrong slot
    preflight_plan: dict | None = None,
    shape_search: dict | None = None,
    teacher_cache: dict | None = None,
    corpus: dict | None = None,
):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from train_job.stream import trainer_datasets
    from train_job.worker import train_loop_per_worker

    storage_path, storage_fs = paths.storage.ray_storage(RAY_KEY)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "job_id": paths.job_id,
            "storage": paths.root,
            "registry": registry,
            "trust_remote_code": trust,
            "preflight": preflight_plan,  # rank 0 stores it in before.json
            "shape_search": shape_search,  # rank 0 puts it in metrics and the report
            "teacher_cache": teacher_cache,  # train_job.teacher_cache.prepare
            "corpus": corpus,  # the corpus cache on data_pipeline='ray_data'
        },
        **trainer_datasets(cfg, paths.root, corpus),  # {} on data_pipeline='local'
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={
                "CPU": cfg.cpus_per_worker,
                **({"GPU": 1} if cfg.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=paths.job_id,
            storage_path=storage_path,
            storage_filesystem=storage_fs,  # S3 (with its endpoint) or None for a folder
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    job_id = args.job_id or new_job_id()
    try:
        paths = JobPaths(args.storage, job_id)
        paths.storage.check()
    except (StorageError, ValueError) as e:  # a bad --job-id, root or S3 setting
        print(f"invalid arguments: {e}", file=sys.stderr)
        return 2
    try:
        cfg = read_config(args.config, args.overrides)
    except Exception as e:
        print(f"invalid config: {e}", file=sys.stderr)
        return 2
    store = paths.storage
    config = cfg.model_dump(mode="json")
    refused, allowed = resume_changes(paths, config)  # both empty without a checkpoint
    if refused:
        print(f"invalid config: {resume_refusal(refused)}", file=sys.stderr)
        return 2
    if allowed:
        print(f"job {job_id}: resuming with changes: {'; '.join(allowed)}", flush=True)
    store.write_json(paths.config_key, config)

    import ray

    from kd.model_files import ModelFilesError
    from kd.preflight import PreflightError, cluster_check
    from train_job.cache_guard import CacheGuard
    from train_job.ingest import prepare as prepare_corpus
    from train_job.registry_client import RegistryClient
    from train_job.shape_search import resolve_budget

    ray.init(log_to_driver=True)  # joins a running cluster (RAY_ADDRESS) or starts one
    registry = RegistryClient.for_job(
        args.registry, job_id, cfg.model_dump(mode="json"), paths.root
    )
    try:  # tokenizers and memory per worker, from config files, before any worker starts
        plan = cluster_check(cfg, ray.nodes())
    except PreflightError as e:
        print(f"preflight refused job {job_id}: {e}", file=sys.stderr, flush=True)
        reason = f"preflight: {e}"[:2000]
        registry.update_sync(job_id, state="failed", error=reason, finished_at=time.time())
        return 2
    except ModelFilesError:  # preflight() below names the unreadable source
        plan = None
    record = registry.update_sync(job_id, state="running", started_at=time.time())
    if record is not None and record.get("state") == "cancelled":
        # Cancelled before this driver got here. Ray's stop signals the entrypoint's
        # shell and the children it has at that moment: a stop in the first instant of
        # a job, before the shell has started Python, leaves this process running with
        # nothing left to stop it. So the driver itself gives up here.
        print(f"job {job_id} was cancelled before training started: exiting", flush=True)
        return 0
    print(f"job {job_id}: training {cfg.num_workers} worker(s), storage {paths.root}", flush=True)
    t0 = time.time()
    try:
        preflight(cfg)
        cfg, search = resolve_budget(cfg, paths, registry, args.trust_remote_code)
        guard = CacheGuard(store, job_id, registry)  # one builder per missing cache
        cache = prepare_teacher_cache(cfg, paths, args.trust_remote_code, guard)
        corpus = prepare_corpus(cfg, store, args.trust_remote_code, guard)  # ray_data only
        trainer = build_trainer(
            cfg,
            paths,
            registry.spec,
            args.trust_remote_code,
            preflight_plan=plan,
            shape_search=search,
            teacher_cache=cache,
            corpus=corpus,
        )
        trainer.fit()
        result = job_result(paths)
        if result is None:
            raise RuntimeError(f"training ended without {paths.artifact_key('metrics.json')}")
    except Exception as e:  # everything a job can die of ends as `failed` with a reason
        reason = _short_reason(e)
        traceback.print_exc()
        print(f"job {job_id} failed: {reason}", file=sys.stderr, flush=True)
        try:  # storage may be the very thing that failed: the registry still hears
            store.write_json(paths.error_key, {"reason": reason, "time": time.time()})
        except OSError as write_error:
            print(f"could not write error.json: {write_error}", file=sys.stderr, flush=True)
        registry.update_sync(job_id, state="failed", error=reason, finished_at=time.time())
        return 1
    registry.update_sync(job_id, state="succeeded", finished_at=time.time(), **result)
    print(
        f"job {job_id} succeeded in {time.time() - t0:.0f}s; {len(result['artifacts'])} artifacts "
        f"in {store.uri(paths.artifacts_key)}",
        flush=True,
    )
    return 0
