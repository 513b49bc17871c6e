"""How a job gets a cache (corpus or teacher signal) that it may have to build: once.

Two jobs that need the same missing cache at the same time must not both build it
(twice the teacher forwards, and two writers of one folder). The registry serialises
them: the first to claim the build lease builds; the other waits for the manifest and
reads it. A job with no registry (run by hand with none on the cluster) builds alone.

Every job that uses a cache also tells the registry (so `DELETE /caches/...` refuses
while it is active) and writes a use record beside the cache (jobs.caches), which
`GET /caches` lists as the jobs that used it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from jobs import caches
from jobs.storage import Storage

log = logging.getLogger(__name__)


class CacheGuard:
    """One job's access to caches. `registry` is a train_job.registry_client.RegistryClient
    (or None); `poll_s` is how often a waiting job looks for the builder's manifest."""

    def __init__(self, storage: Storage, job_id: str | None, registry=None, poll_s: float = 2.0):
        self.storage, self.job_id, self.registry, self.poll_s = storage, job_id, registry, poll_s

    def _call(self, method: str, *args):
        if self.registry is None or self.registry.handle is None or self.job_id is None:
            return None
        return self.registry.call(method, *args, self.job_id)

    def get(
        self,
        kind: str,
        key: str,
        load: Callable[[], dict | None],
        build: Callable[[], dict],
    ) -> tuple[dict, bool]:
        """(manifest, built_here). `load` returns the complete cache's manifest or None;
        `build` builds it and returns its manifest (run by one job at a time)."""
        cache = caches.check_name(kind, key)
        self._call("use_cache", cache)  # first: a delete after this is refused
        manifest, built = load(), False
        waited_for = None
        while manifest is None:
            holder = self._call("claim_cache_build", cache)
            if holder is None:  # ours (or no registry): build, unless it just appeared
                try:
                    manifest = load()
                    if manifest is None:
                        manifest, built = build(), True
                finally:
                    self._call("release_cache_build", cache)
                break
            if holder != waited_for:
                log.info("cache %s is being built by job %s: waiting for it", cache, holder)
                print(f"cache {cache}: job {holder} is building it; waiting", flush=True)
                waited_for = holder
            time.sleep(self.poll_s)
            manifest = load()
        if self.job_id is not None:
            caches.record_use(self.storage, kind, key, self.job_id, built)
        return manifest, built
