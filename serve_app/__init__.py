"""The HTTP service: Ray Serve + FastAPI in front of Ray Jobs and a job registry actor.

Import path for `serve run` and Serve config files: `serve_app.app:app` (the bound
application with settings from the environment) or `serve_app.app:app_builder`. It
imports `jobs` (spec, states, schemas, storage, layout), never train_job: a job is
started through Ray's job API as `python -m train_job`.

Modules:
    app          the Serve deployment and FastAPI app; error handlers, body size limit
    routes       POST /distill, status, jobs, cancel, artifacts, health
    report_page  GET /jobs/{id}/report: the self-contained HTML report
    downloads    artifact downloads from a folder or S3, with HTTP Range
    security     the API token, allowed model/data sources, safe artifact paths
    preflight    kd.preflight against this Ray cluster's memory, before a job is queued
    service      the per-replica object routes reach (registry handle, settings)
    registry     the detached registry actor: job records, scheduling, reconciliation
    launcher     submitting, stopping and inspecting Ray jobs (JobSubmissionClient)
    metrics      job gauges for the Ray dashboard / Prometheus
    openapi      the documented error responses of each route
    settings     LLM2SLM_* settings (pydantic-settings)
    local        `python -m serve_app`: a local Ray and the app (what `llm2slm serve` runs)
"""
