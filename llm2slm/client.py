"""`Llm2SlmClient`: the service's HTTP API as typed Python calls (httpx, no Ray, no torch).

    from llm2slm import Llm2SlmClient

    with Llm2SlmClient("http://127.0.0.1:8000", token=None) as c:
        job = c.submit({"max_steps": 40})
        for st in c.follow(job.job_id):
            print(st.step, st.total_steps, st.state)
        c.download(job.job_id, "student/model.safetensors", "out/")

Every failure is a `ServiceError` subclass whose message says what to do: the service
is unreachable, the token is missing or wrong, a job or file does not exist, or the
config is invalid (`InvalidRequest.field_errors` lists each field with its problem).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

from jobs.schemas import (
    ArtifactList,
    CacheDeleted,
    CacheList,
    Health,
    JobPage,
    JobPublic,
    SubmitResponse,
)
from jobs.states import TERMINAL

DEFAULT_URL = "http://127.0.0.1:8000"
PART_SUFFIX = ".part"


class ServiceError(Exception):
    """Anything the service (or the way to it) refused; `str()` is the user message."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ConnectionFailed(ServiceError):
    pass


class Unauthorized(ServiceError):
    pass


class NotFound(ServiceError):
    pass


class Conflict(ServiceError):
    pass


class InvalidRequest(ServiceError):
    def __init__(self, message: str, field_errors: list[tuple[str, str]]):
        super().__init__(message, 422)
        self.field_errors = field_errors


def field_errors(detail: Any) -> list[tuple[str, str]]:
    """(field, message) pairs from a FastAPI 422 body's `detail`."""
    if not isinstance(detail, list):
        return [("body", str(detail))]
    out = []
    for err in detail:
        loc = [str(p) for p in err.get("loc", []) if p not in ("body", "query")]
        out.append((".".join(loc) or "body", str(err.get("msg", err))))
    return out


class Llm2SlmClient:
    """One llm2slm service. url/token default to LLM2SLM_URL / LLM2SLM_TOKEN."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self.url = (url or os.environ.get("LLM2SLM_URL") or DEFAULT_URL).rstrip("/")
        token = token or os.environ.get("LLM2SLM_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.has_token = bool(token)
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Llm2SlmClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # ---- plumbing ---------------------------------------------------------------
    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.ConnectError as e:
            raise ConnectionFailed(
                f"cannot reach the llm2slm service at {self.url} ({e}). Is it running? "
                "Start one with `llm2slm serve`, or point --url / LLM2SLM_URL at it."
            ) from e
        except httpx.TimeoutException as e:
            raise ConnectionFailed(f"the llm2slm service at {self.url} did not answer: {e}") from e
        self._raise_for(r)
        return r

    def _raise_for(self, r: httpx.Response) -> None:
        if r.status_code < 400:
            return
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        if r.status_code == 401:
            hint = (
                "the token was rejected; check --token / LLM2SLM_TOKEN"
                if self.has_token
                else "this service needs an API token; pass --token or set LLM2SLM_TOKEN"
            )
            raise Unauthorized(f"401 Unauthorized: {hint}", 401)
        if r.status_code == 404:
            raise NotFound(f"404 Not Found: {detail}", 404)
        if r.status_code == 409:
            raise Conflict(f"409 Conflict: {detail}", 409)
        if r.status_code == 422:
            errors = field_errors(detail)
            lines = "\n".join(f"  {f}: {m}" for f, m in errors)
            raise InvalidRequest(f"422 the service rejected the request:\n{lines}", errors)
        raise ServiceError(f"{r.status_code} {r.reason_phrase}: {detail}", r.status_code)

    # ---- the API ----------------------------------------------------------------
    def health(self) -> Health:
        return Health.model_validate(self._request("GET", "/healthz").json())

    def submit(self, config: dict[str, Any], job_id: str | None = None) -> SubmitResponse:
        """POST /distill. A `job_id` of a failed or cancelled job resumes it."""
        params = {"job_id": job_id} if job_id else None
        r = self._request("POST", "/distill", json=config, params=params)
        return SubmitResponse.model_validate(r.json())

    def status(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(self._request("GET", f"/status/{job_id}").json())

    def jobs(self, offset: int = 0, limit: int = 50, state: str | None = None) -> JobPage:
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if state:
            params["state"] = state
        return JobPage.model_validate(self._request("GET", "/jobs", params=params).json())

    def cancel(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(self._request("DELETE", f"/jobs/{job_id}").json())

    def artifacts(self, job_id: str) -> ArtifactList:
        return ArtifactList.model_validate(self._request("GET", f"/artifacts/{job_id}").json())

    def caches(self) -> CacheList:
        """GET /caches: the corpus and teacher-signal caches on the service's storage."""
        return CacheList.model_validate(self._request("GET", "/caches").json())

    def delete_cache(self, kind: str, key: str) -> CacheDeleted:
        """DELETE /caches/{kind}/{key}; a ServiceError (409) while a job uses it."""
        r = self._request("DELETE", f"/caches/{kind}/{key}")
        return CacheDeleted.model_validate(r.json())

    def report_html(self, job_id: str) -> str:
        return self._request("GET", f"/jobs/{job_id}/report").text

    def follow(
        self, job_id: str, every: float = 1.0, timeout: float | None = None
    ) -> Iterator[JobPublic]:
        """Yield the job's status every `every` seconds until it is terminal (included)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status(job_id)
            yield st
            if st.state in TERMINAL:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {st.state} after {timeout}s")
            time.sleep(every)

    def download(
        self,
        job_id: str,
        path: str,
        dest_dir: str | Path,
        progress: Callable[[int, int], None] | None = None,
        chunk_bytes: int = 1 << 20,
    ) -> Path:
        """Fetch one artifact to dest_dir/path; resumable.

        Bytes go to `<file>.part` first. A `.part` left by an interrupted download is
        continued with an HTTP Range request (a server answering 200 instead restarts
        it); the file is renamed into place when complete. progress(done, total) is
        called after every chunk.
        """
        rel = PurePosixPath(path)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"artifact path '{path}' must be relative, without '..'")
        target = Path(dest_dir, *rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + PART_SUFFIX)
        have = part.stat().st_size if part.is_file() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        url = f"/download/{job_id}/{path}"
        try:
            with self.http.stream("GET", url, headers=headers) as r:
                if r.status_code == 416:  # the .part is already whole (or longer)
                    r.read()
                    return self._finish_416(job_id, path, dest_dir, part, target)
                if r.status_code >= 400:
                    r.read()
                    self._raise_for(r)
                if r.status_code == 200:
                    have = 0  # the server sent the whole file
                total = have + int(r.headers.get("content-length", 0))
                with open(part, "ab" if have else "wb") as f:
                    done = have
                    for data in r.iter_bytes(chunk_bytes):
                        f.write(data)
                        done += len(data)
                        if progress:
                            progress(done, total)
        except httpx.ConnectError as e:
            raise ConnectionFailed(f"cannot reach the llm2slm service at {self.url}: {e}") from e
        part.replace(target)
        return target

    def _finish_416(
        self, job_id: str, path: str, dest_dir: str | Path, part: Path, target: Path
    ) -> Path:
        sizes = {a.path: a.size for a in self.artifacts(job_id).artifacts}
        if sizes.get(path) == part.stat().st_size:
            part.replace(target)
            return target
        part.unlink()  # not this file's bytes: start over
        return self.download(job_id, path, dest_dir)
