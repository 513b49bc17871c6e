"""Caches as a service-level object (jobs.caches, the registry's cache methods), on real
files, without Ray. The HTTP side, with two jobs that need one missing corpus cache at
once, is in tests/test_service.py::test_two_jobs_build_one_cache_then_list_and_delete."""

from __future__ import annotations

import asyncio
import json

import pytest

from jobs import caches
from jobs.storage import Storage
from serve_app.registry import CacheInUse, JobRegistry
from train_job.cache_guard import CacheGuard

KEY = "0123456789abcdef0123"


def _teacher_cache(storage: Storage, key: str = KEY, parts: int = 2) -> None:
    """A complete teacher-signal cache as train_job.teacher_cache.build lays it out."""
    for i in range(parts):
        storage.write_bytes(f"teacher_signal/{key}/train/part-{i:09d}.npz", b"x" * (100 + i))
    storage.write_json(
        f"teacher_signal/{key}/manifest.json",
        {"key": key, "created_at": 5.0, "mode": "exact", "tokens": 512,
         "fingerprint": {"teacher": {"name": "embedded:smollm2-135m"}, "corpus": "c" * 20}},
    )  # fmt: skip


def test_list_describe_record_and_delete_on_files(tmp_path):
    storage = Storage(tmp_path)
    assert caches.list_caches(storage) == []
    _teacher_cache(storage)
    caches.record_use(storage, "teacher_signal", KEY, "job-a", built=True)
    caches.record_use(storage, "teacher_signal", KEY, "job-b", built=False)
    # a corpus cache whose build died before its manifest: listed as incomplete
    other = "f" * 20
    storage.write_bytes(f"corpus/{other}/train/shard-00000.parquet", b"y" * 50)
    storage.write_bytes("corpus/not-a-key/stray.txt", b"z")  # not a cache: never listed
    found = {c["key"]: c for c in caches.list_caches(storage)}
    assert set(found) == {KEY, other}
    c = found[KEY]
    size = sum(p.stat().st_size for p in (tmp_path / "teacher_signal" / KEY).rglob("*.*"))
    assert (c["kind"], c["complete"], c["teacher"], c["mode"], c["tokens"]) == (
        "teacher_signal", True, "embedded:smollm2-135m", "exact", 512)  # fmt: skip
    assert c["bytes"] == size and c["files"] == 5
    assert [(j["job_id"], j["built"]) for j in c["jobs"]] == [("job-a", True), ("job-b", False)]
    assert found[other]["complete"] is False and found[other]["bytes"] == 50
    assert caches.delete(storage, "teacher_signal", KEY) == size
    assert not (tmp_path / "teacher_signal" / KEY).exists()
    assert caches.describe(storage, "teacher_signal", KEY) is None
    assert caches.delete(storage, "teacher_signal", KEY) is None  # nothing left to free


@pytest.mark.parametrize(
    "kind,key", [("teacher_signal", "../../jobs"), ("teacher_signal", KEY.upper()),
                 ("registry", KEY), ("corpus", KEY[:-1])],
)  # fmt: skip
def test_a_name_that_is_not_a_cache_is_refused(kind, key):
    with pytest.raises(caches.CacheNameError):
        caches.check_name(kind, key)


def _registry(tmp_path) -> JobRegistry:
    return JobRegistry({"storage_root": str(tmp_path), "max_concurrent_jobs": 0})


def test_registry_refuses_to_delete_a_cache_an_active_job_uses(tmp_path):
    cache = caches.check_name("teacher_signal", KEY)

    async def scenario():
        reg = _registry(tmp_path)
        _teacher_cache(reg.storage)
        await reg.create("j1", {"max_steps": 3})
        await reg.update("j1", {"state": "running"})
        await reg.use_cache(cache, "j1")
        assert await reg.caches_in_use() == {cache: {"in_use_by": ["j1"], "building_by": []}}
        with pytest.raises(CacheInUse, match="j1"):
            await reg.delete_cache("teacher_signal", KEY)
        assert (tmp_path / "teacher_signal" / KEY / "manifest.json").is_file()
        await reg.update("j1", {"state": "succeeded"})
        assert await reg.caches_in_use() == {}
        assert await reg.delete_cache("teacher_signal", KEY) > 0
        assert await reg.delete_cache("teacher_signal", KEY) is None  # gone: the API's 404

    asyncio.run(scenario())


def test_build_lease_is_one_jobs_and_passes_on_when_its_holder_dies(tmp_path):
    cache = caches.check_name("corpus", KEY)

    async def scenario():
        reg = _registry(tmp_path)
        for job in ("j1", "j2"):
            await reg.create(job, {"max_steps": 3})
            await reg.update(job, {"state": "running"})
        assert await reg.claim_cache_build(cache, "j1") is None  # j1 builds
        assert await reg.claim_cache_build(cache, "j2") == "j1"  # j2 waits
        assert (await reg.caches_in_use())[cache]["building_by"] == ["j1"]
        with pytest.raises(CacheInUse):  # nor can it be deleted mid-build
            await reg.delete_cache("corpus", KEY)
        # the lease is kept across a registry restart
        state = json.loads((tmp_path / "registry" / "state.json").read_text())
        assert state["cache_builds"] == {cache: "j1"}
        reg = _registry(tmp_path)
        assert await reg.claim_cache_build(cache, "j2") == "j1"
        await reg.update("j1", {"state": "failed", "error": "killed"})  # the builder died
        assert await reg.claim_cache_build(cache, "j2") is None  # j2 builds instead
        await reg.release_cache_build(cache, "j1")  # a late release of the dead one: no-op
        assert reg.cache_builds == {cache: "j2"}
        await reg.release_cache_build(cache, "j2")
        assert reg.cache_builds == {}

    asyncio.run(scenario())


def test_guard_without_a_registry_builds_once_and_records_the_job(tmp_path):
    storage, built = Storage(tmp_path), []

    def build():
        built.append(1)
        _teacher_cache(storage)
        return storage.read_json(f"teacher_signal/{KEY}/manifest.json")

    def load():
        key = f"teacher_signal/{KEY}/manifest.json"
        return storage.read_json(key) if storage.is_file(key) else None

    m1, b1 = CacheGuard(storage, "j1").get("teacher_signal", KEY, load, build)
    m2, b2 = CacheGuard(storage, "j2").get("teacher_signal", KEY, load, build)
    assert (b1, b2, len(built)) == (True, False, 1) and m1 == m2
    jobs = caches.describe(storage, "teacher_signal", KEY)["jobs"]
    assert [(j["job_id"], j["built"]) for j in jobs] == [("j1", True), ("j2", False)]
