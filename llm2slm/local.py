"""The two commands that run the service's own code here, each in a child process:
`llm2slm serve` (`python -m serve_app`) and `llm2slm distill --local` (`python -m train_job`).

A child process keeps the command-line package free of serve_app, train_job, Ray and
torch imports; Ctrl-C reaches the child too, which shuts down on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

OPTIONS_ENV = "LLM2SLM_SERVE_OPTIONS"  # read (and removed) by serve_app/local.py


def run_module(module: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    """`python -m module *argv` with this interpreter; its exit code."""
    proc = subprocess.Popen([sys.executable, "-m", module, *argv], env=env)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # the child got the same signal: wait for its shutdown
            continue


def settings_from_args(args: argparse.Namespace) -> dict:
    """Serve app settings: LLM2SLM_* env vars, then these flags (flags win)."""
    from jobs.storage import is_uri  # pyarrow: only for this command

    settings: dict = {}
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


def serve(args: argparse.Namespace) -> int:
    """`llm2slm serve`: a local Ray and the API until Ctrl-C (see serve_app/local.py)."""
    opts = {
        "host": args.host,
        "port": args.port,
        "dashboard_port": args.dashboard_port,
        "address": args.address,
        "settings": settings_from_args(args),
    }
    # In the environment, not the command line: the options may hold the API token, and
    # a command line is visible to every user of the machine.
    return run_module("serve_app", [], env=os.environ | {OPTIONS_ENV: json.dumps(opts)})


def distill_local(config: dict, args: argparse.Namespace) -> int:
    """`llm2slm distill --local`: train_job's driver on a local Ray (no service, no registry)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    argv = ["--config", f.name, "--storage", args.storage]  # a folder or s3:// URI
    argv += ["--job-id", args.job_id] if args.job_id else []
    try:
        return run_module("train_job", argv)
    finally:
        os.unlink(f.name)
