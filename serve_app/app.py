"""The Ray Serve application: a FastAPI ingress deployment.

    serve run serve_app.app:app                        # settings from LLM2SLM_* env vars
    serve run serve_app.app:app_builder storage_root=/data max_concurrent_jobs=4

The same import path goes into a Serve config file (`serve build`) and the RayService
manifest's serveConfigV2.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app import report_page, routes, service
from serve_app.settings import Settings


class BodyLimit:
    """413 for request bodies over the settings' max_body_bytes, declared or streamed.

    The body is read here, up to the limit, before the app sees it: an app that hit
    the limit while parsing would answer 400 ("error parsing the body") instead.
    """

    def __init__(self, app: ASGIApp):
        self.app = app
        self.limit = Settings.model_fields["max_body_bytes"].default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        svc = service.current_or_none()
        if svc is not None:
            self.limit = svc.settings.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._reject(scope, receive, send)
        buffered, seen = [], 0
        while True:
            msg = await receive()
            buffered.append(msg)
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                return await self._reject(scope, receive, send)
            if msg["type"] != "http.request" or not msg.get("more_body"):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send) -> None:
        resp = JSONResponse({"detail": f"request body larger than {self.limit} bytes"}, 413)
        await resp(scope, receive, send)


class PathGuard:
    """404 for any URL with '.' or '..' segments, raw or percent-encoded, before routing.

    Without it a proxy or the router may normalise such a URL and answer with a
    redirect; the download route checks containment again on its own.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = (scope.get("raw_path") or b"").decode("latin-1").lower()
            decoded = unquote(unquote(raw)).replace("\\", "/")
            segments = decoded.split("?")[0].split("/") + scope["path"].split("/")
            if any(seg in (".", "..") for seg in segments) or "\x00" in decoded:
                resp = JSONResponse({"detail": "not found"}, 404)
                return await resp(scope, receive, send)
        await self.app(scope, receive, send)


def _finite(value: Any) -> Any:
    """NaN and ±inf as strings: JSON has no such numbers and the encoder refuses them."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, except that an echoed NaN input cannot turn it into a 500."""
    return JSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, 422)


def create_api() -> FastAPI:
    api = FastAPI(
        title="llm2slm",
        version="0.1.0",
        description="Distil a large causal LM into a small one. Jobs run as Ray Jobs.",
    )
    api.add_exception_handler(RequestValidationError, validation_error)
    api.include_router(routes.public)
    api.include_router(routes.router)
    api.include_router(report_page.router)
    api.add_middleware(BodyLimit)
    api.add_middleware(PathGuard)
    return api


api = create_api()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=200)
@serve.ingress(api)
class Llm2SlmAPI:
    def __init__(self, settings: dict[str, Any] | None = None):
        service.install(service.Service(Settings(**(settings or {}))))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Typed builder for `serve run serve_app.app:app_builder key=value ...`."""
    settings = Settings(**args)
    return Llm2SlmAPI.bind(settings.model_dump(mode="json") | _token(settings))


def _token(settings: Settings) -> dict[str, Any]:
    return {"api_token": settings.api_token.get_secret_value() if settings.api_token else None}


app = Llm2SlmAPI.bind()
