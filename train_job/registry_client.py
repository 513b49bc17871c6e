"""Talking to the job registry actor from a job, when there is one.

A job started by the service finds the registry by the name it was given (--registry
"namespace/name"); the service created its record. A job started any other way
(`ray job submit -- python -m train_job ...`, or a driver run by hand against a cluster)
looks for the registry under its usual name (jobs.results.registry_spec) and, when the
actor exists, registers itself, so every distillation on the cluster shows in one list.
With no registry the job only writes its files. Progress updates are fire-and-forget: a
registry restarting must never stall or fail training.
"""

from __future__ import annotations

import logging
import time

import ray

from jobs.results import registry_spec

log = logging.getLogger(__name__)


class RegistryClient:
    def __init__(self, handle=None, spec: str | None = None):
        self.handle = handle
        self.spec = spec if handle is not None else None  # what the workers connect to

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
                return cls(ray.get_actor(name, namespace=namespace or None), spec)
            except ValueError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(1.0)
        log.warning("job registry %s not found; progress goes to the job's files only", spec)
        return cls(None)

    @classmethod
    def for_job(
        cls, spec: str | None, job_id: str, config: dict, storage_root: str
    ) -> RegistryClient:
        """The registry this job reports to. With `spec` (the service started the job)
        that one; otherwise the cluster's registry, if it runs, with the job registered
        in it as running. Ray must be initialised."""
        if spec:
            return cls.connect(spec)
        client = cls.connect(registry_spec(), wait_s=0)  # one look: most runs have none
        if client.handle is None:
            return client
        ray_job_id = ray.get_runtime_context().get_job_id()
        try:
            call = client.handle.register.remote(job_id, config, storage_root, ray_job_id)
            registered = ray.get(call, timeout=30)
        except Exception as e:  # the registry being down must not fail training
            log.warning("could not register job %s with %s: %s", job_id, client.spec, e)
            return cls(None)
        if not registered:
            log.warning(
                "registry %s already has a queued, active or succeeded job %s: this run "
                "is not reported there (use another --job-id to see it in the list)",
                client.spec,
                job_id,
            )
            return cls(None)
        print(f"job {job_id}: registered with the job registry {client.spec}", flush=True)
        return client

    def update(self, job_id: str, **fields) -> None:
        if self.handle is None:
            return
        try:
            self.handle.update.remote(job_id, fields)
        except Exception as e:  # the registry being down must not fail training
            log.warning("registry update failed: %s", e)

    def call(self, method: str, *args, timeout: float = 30.0):
        """The answer of registry method `method(*args)`; None without a registry or
        when it cannot be reached (the caller then goes on alone, as with no registry)."""
        if self.handle is None:
            return None
        try:
            return ray.get(getattr(self.handle, method).remote(*args), timeout=timeout)
        except Exception as e:
            log.warning("registry call %s failed: %s", method, e)
            return None

    def update_sync(self, job_id: str, timeout: float = 30.0, **fields) -> dict | None:
        """For state changes: wait until the registry has stored them. Returns the job's
        record as the registry holds it after the update (None without a registry, or
        when it cannot be reached): a refused change shows as the state it kept."""
        if self.handle is None:
            return None
        try:
            return ray.get(self.handle.update.remote(job_id, fields), timeout=timeout)
        except Exception as e:
            log.warning("registry update (%s) failed: %s", fields.get("state"), e)
            return None
