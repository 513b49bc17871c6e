"""The per-replica service object that routes reach through a dependency."""

from __future__ import annotations

import asyncio

from fastapi import HTTPException

from serve_app.registry import get_or_create_registry
from serve_app.settings import Settings

_current: Service | None = None


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry = get_or_create_registry(settings)

    async def registry_alive(self, timeout: float = 5.0) -> bool:
        try:
            return bool(await asyncio.wait_for(self.registry.ping.remote(), timeout))
        except Exception:
            return False


def install(service: Service) -> None:
    global _current
    _current = service


def current_or_none() -> Service | None:
    return _current


def current() -> Service:
    if _current is None:
        raise HTTPException(503, detail="service is starting")
    return _current
