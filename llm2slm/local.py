"""`llm2slm serve`: a local Ray (with its dashboard and job API) and the Serve app.

Imported only by that command: it is the one part of the CLI that loads Ray.
"""

from __future__ import annotations

import argparse
import os
import time

from rich.console import Console

from train_job.storage import is_uri


def settings_from_args(args: argparse.Namespace, dashboard: str) -> dict:
    """Serve app settings: LLM2SLM_* env vars, then these flags (flags win)."""
    settings: dict = {"ray_dashboard_address": dashboard}
    if args.storage or not os.environ.get("LLM2SLM_STORAGE_ROOT"):
        root = args.storage or "llm2slm-storage"
        settings["storage_root"] = root if is_uri(root) else os.path.abspath(root)
    if args.token:
        settings["api_token"] = args.token
    if args.allow_local_root:
        settings["allowed_local_roots"] = [os.path.abspath(p) for p in args.allow_local_root]
    if args.max_concurrent_jobs:
        settings["max_concurrent_jobs"] = args.max_concurrent_jobs
    return settings


def serve_forever(args: argparse.Namespace, console: Console) -> int:
    import ray
    from ray import serve

    from serve_app.app import app_builder

    if args.address:  # an existing cluster brings its own dashboard
        ctx = ray.init(address=args.address)
    else:
        # A new local cluster: give Serve's proxy time to start on a small, busy machine
        # (Serve kills one that is not ready within 5 s by default).
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
        ctx = ray.init(
            address="local",  # a new cluster, never one some `ray start` left running
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=args.dashboard_port,
        )
    dashboard = "http://" + ctx.dashboard_url
    settings = settings_from_args(args, dashboard)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app_builder(settings), name="llm2slm", route_prefix="/")
    url = f"http://{args.host}:{args.port}"
    console.print(
        f"llm2slm API on {url} (docs {url}/docs), Ray dashboard {dashboard}, storage "
        f"{settings.get('storage_root') or os.environ['LLM2SLM_STORAGE_ROOT']}. Ctrl-C stops.",
        highlight=False,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
    return 0
