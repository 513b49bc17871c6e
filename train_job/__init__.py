"""The Ray Train entrypoint: `python -m train_job --config job.json`.

It runs kd's plain-torch loop on N workers with TorchTrainer, reports metrics,
checkpoints to shared storage, resumes after failures, and tells the job registry how
the job is doing. It imports `jobs` (storage, layout) and `kd`, never serve_app.

Modules:
    cli              the driver: validate and preflight the config, run TorchTrainer, exit code
    worker           what each rank runs: kd.train with one ray.train.report per event
    registry_client  progress updates to the job registry actor, when there is one
    shape_search     candidate student shapes under a parameter budget as Ray Tune trials
    teacher_cache    the teacher signal cache: built by a Ray Data actor pool, reused by key
    ingest           data_pipeline='ray_data': the corpus tokenized and packed once by Ray
                     Data into Parquet shards under a key of everything that shapes them
    stream           each rank's training blocks streamed from those shards, resumable
"""
