"""The OpenAPI `responses` entries of the error codes each route can answer with."""

from __future__ import annotations

from typing import Any

from jobs.schemas import Problem


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error codes a route can answer with."""
    words = {
        400: "the body is not valid JSON",
        401: "missing or wrong API token",
        404: "no such job or artifact",
        409: "the job already ended",
        413: "request body too large",
    }
    return {c: {"model": Problem, "description": words[c]} for c in codes}


def json_problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`problems` for a route whose success is not JSON (the HTML report page): FastAPI
    would document a `model` under the route's own media type, but errors stay JSON."""
    ref = {"$ref": "#/components/schemas/Problem"}
    return {
        c: {"description": v["description"], "content": {"application/json": {"schema": ref}}}
        for c, v in problems(*codes).items()
    }
