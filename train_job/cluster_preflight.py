"""The Ray side of `kd.preflight`: a worker's memory, read from the cluster's nodes.

`kd.preflight` never imports Ray; the API (before queueing) and `python -m train_job`
(before starting the trainer) call `check(cfg)` here, which passes the per-worker
share of the nodes' Ray `memory` resource (`ray.nodes()`) in as the budget.
"""

from __future__ import annotations

from kd.config import DistillConfig
from kd.preflight import PreflightError, WorkerBudget, preflight


def cluster_budget(cfg: DistillConfig) -> WorkerBudget:
    """Per-worker memory on the connected cluster. Ray does not report GPU memory, so
    a GPU job's plan is checked against the host only (stated in the plan)."""
    import ray

    if not ray.is_initialized():  # nothing to read the nodes from: compare nothing
        return WorkerBudget(None, None, "a Ray worker (not connected to a cluster)")
    return WorkerBudget.from_ray_nodes(ray.nodes(), cfg)


def check(cfg: DistillConfig) -> dict:
    """The plan for `cfg` on this cluster; raises PreflightError (tokenizers, memory) or
    kd.model_files.ModelFilesError (a model whose files cannot be read from here)."""
    return preflight(cfg, cluster_budget(cfg))


def http_problems(cfg: DistillConfig) -> list[dict]:
    """422 details for the API: one per problem, `loc` naming the field it starts with.

    A model the server cannot read (a Hub id or a path only the workers reach) is not
    refused here: the job's own preflight reports it where the files are.
    """
    from kd.model_files import ModelFilesError

    try:
        check(cfg)
    except PreflightError as e:
        return [
            {"loc": ["body", p.split(":", 1)[0]], "msg": p, "type": "value_error"}
            for p in e.problems
        ]
    except ModelFilesError:
        return []
    return []


__all__ = ["PreflightError", "check", "cluster_budget", "http_problems"]
