"""The job spec: `kd.config.DistillConfig`, under the contract's name.

The spec's fields are declared once, in kd/config.py (pydantic only, no torch): the HTTP
body is validated into it, the Ray job receives it as JSON and every worker re-validates
it. The client and the server import it from here.
"""

from __future__ import annotations

from kd.config import (
    DERIVED_STUDENT,
    EMBEDDED_DATASET,
    EMBEDDED_TEACHER,
    DistillConfig,
    load_config,
    parse_overrides,
)

__all__ = [
    "DERIVED_STUDENT",
    "EMBEDDED_DATASET",
    "EMBEDDED_TEACHER",
    "DistillConfig",
    "load_config",
    "parse_overrides",
]
