"""One way to print a number in the reports, the progress lines and the HTML page.

Pure Python (no torch), so serve_app's report page uses it too.
"""

from __future__ import annotations

import json
from typing import Any

from kd.spec import LOSS_TERMS

# The progress line's leading keys; any other metric follows in its own order.
LINE_KEYS = ("step", "loss", *LOSS_TERMS.values(), "lr", "grad_norm", "tokens_per_s")


def fmt(v: Any, *, none: str = "n/a", grouped: bool = False) -> str:
    """4 significant digits for floats; `grouped` adds thousands separators (HTML page)."""
    if v is None:
        return none
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if grouped:
            return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}" if grouped else str(v)
    if isinstance(v, dict | list):
        return json.dumps(v)
    return str(v)


def metric_line(metrics: dict[str, Any]) -> str:
    """`step=5 loss=3.2 kd=1.1 lm=2.1 lr=0.001 ...` (epoch left out)."""
    keys = [k for k in LINE_KEYS if k in metrics]
    keys += [k for k in metrics if k not in LINE_KEYS and k != "epoch"]
    return " ".join(f"{k}={fmt(metrics[k])}" for k in keys)
