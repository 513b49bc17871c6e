"""`python -m serve_app`: a local Ray (dashboard, job API) and the Serve app.

`llm2slm serve` starts this module in a child process, so the command-line package
never imports serve_app or Ray. Its options come as JSON in the environment variable
LLM2SLM_SERVE_OPTIONS (not the command line, which every user can read: the settings
may hold the API token): host, port, dashboard_port, address (an existing cluster, or
null) and settings (the app's settings without the dashboard address).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

OPTIONS_ENV = "LLM2SLM_SERVE_OPTIONS"  # set by llm2slm/local.py


def submit_command(dashboard: str, storage: str, python: str = "python") -> str:
    """The `ray job submit` line that runs a job without the API on this cluster.

    Ray 2.60 turns token authentication on for a cluster it starts, but the `ray job`
    CLI sends the token (from ~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)
    only when RAY_AUTH_MODE=token is set in its own shell; without it the job API
    answers 'Unauthorized: Missing authentication token'.
    """
    token = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"  # ray.init set it
    return (
        ("RAY_AUTH_MODE=token " if token else "")
        + f"ray job submit --address {shlex.quote(dashboard)} --working-dir . -- "
        + f"{shlex.quote(python)} -m train_job --config job.json --storage {shlex.quote(storage)}"
    )


def serve_forever(opts: dict) -> int:
    import ray
    from ray import serve

    from serve_app.app import app_builder

    if opts.get("address"):  # an existing cluster brings its own dashboard
        ctx = ray.init(address=opts["address"])
    else:
        # A new local cluster: give Serve's proxy time to start on a small, busy machine
        # (Serve kills one that is not ready within 5 s by default).
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
        ctx = ray.init(
            address="local",  # a new cluster, never one some `ray start` left running
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=opts["dashboard_port"],
        )
    dashboard = "http://" + ctx.dashboard_url
    settings = {"ray_dashboard_address": dashboard, **opts["settings"]}
    host, port = opts["host"], opts["port"]
    serve.start(http_options={"host": host, "port": port})
    serve.run(app_builder(settings), name="llm2slm", route_prefix="/")
    url = f"http://{host}:{port}"
    storage = settings.get("storage_root") or os.environ["LLM2SLM_STORAGE_ROOT"]
    print(
        f"llm2slm API on {url} (docs {url}/docs), Ray dashboard {dashboard}, storage "
        f"{storage}. Ctrl-C stops.\nA job without the API, on this cluster:\n  "
        f"{submit_command(dashboard, storage)}",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
    return 0


def main() -> int:
    raw = os.environ.pop(OPTIONS_ENV, None)  # popped: Ray workers need not inherit it
    if raw is None:
        print(f"python -m serve_app needs {OPTIONS_ENV}; use `llm2slm serve`", file=sys.stderr)
        return 2
    return serve_forever(json.loads(raw))
