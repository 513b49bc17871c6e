"""The llm2slm command line and Python client for a running llm2slm service.

It imports only `jobs` (the spec and the response schemas), never serve_app, train_job,
Ray or torch: `llm2slm serve` and `llm2slm distill --local` run `python -m serve_app` /
`python -m train_job` in a child process.

Modules:
    cli       the `llm2slm` command: distill, status, jobs, artifacts, download, cancel, ...
    client    `Llm2SlmClient`: the HTTP API as typed Python calls (httpx)
    progress  rich progress bars on a terminal, one plain line per change otherwise
    local     `serve` and `distill --local`: the service's own code in a child process
"""

from llm2slm.client import (
    ConnectionFailed,
    InvalidRequest,
    Llm2SlmClient,
    NotFound,
    ServiceError,
    Unauthorized,
)

__all__ = [
    "ConnectionFailed",
    "InvalidRequest",
    "Llm2SlmClient",
    "NotFound",
    "ServiceError",
    "Unauthorized",
]
