"""Talking to the job registry actor from a job, when there is one.

A job started by the service finds the registry by name ("namespace/name"); a job run
by hand has none and only writes its files. Progress updates are fire-and-forget: a
registry restarting must never stall or fail training.
"""

from __future__ import annotations

import logging
import time

import ray

log = logging.getLogger(__name__)


class RegistryClient:
    def __init__(self, handle=None):
        self.handle = handle

    @classmethod
    def connect(cls, spec: str | None, wait_s: float = 20.0) -> RegistryClient:
        """The named registry; looked up again for up to `wait_s`, since a busy GCS (or
        a registry being restarted) can fail one lookup of an actor that exists."""
        if not spec:
            return cls(None)
        namespace, _, name = spec.rpartition("/")
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return cls(ray.get_actor(name, namespace=namespace or None))
            except ValueError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(1.0)
        log.warning("job registry %s not found; progress goes to the job's files only", spec)
        return cls(None)

    def update(self, job_id: str, **fields) -> None:
        if self.handle is None:
            return
        try:
            self.handle.update.remote(job_id, fields)
        except Exception as e:  # the registry being down must not fail training
            log.warning("registry update failed: %s", e)

    def update_sync(self, job_id: str, timeout: float = 30.0, **fields) -> None:
        """For terminal states: wait until the registry has stored them."""
        if self.handle is None:
            return
        try:
            ray.get(self.handle.update.remote(job_id, fields), timeout=timeout)
        except Exception as e:
            log.warning("registry update (%s) failed: %s", fields.get("state"), e)
