"""The contract between the API (serve_app), the Ray job (train_job) and the client
(llm2slm): neither torch nor Ray is imported here.

Modules:
    spec      the job spec: `kd.config.DistillConfig` (pydantic only) under the contract's name
    states    `JobState`, the allowed TRANSITIONS, which states are ACTIVE or TERMINAL
    schemas   the HTTP API's response bodies (JobPublic, SubmitResponse, ArtifactList, ...)
    storage   `Storage`: a shared folder or an S3 prefix, over keys relative to the root
    paths     the storage layout: `JobPaths` (config, artifacts, error), job ids, fixed keys
    resume    a resubmitted job against its latest checkpoint's config: what may change
    results   a finished job's outcome read from its files; where the registry actor lives
"""
