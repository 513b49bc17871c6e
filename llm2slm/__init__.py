"""The llm2slm command line and Python client for a running llm2slm service.

Importing this package loads neither Ray nor torch: `llm2slm distill --local` and
`llm2slm serve` import them only when they run.
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
