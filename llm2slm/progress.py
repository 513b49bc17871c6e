"""How the CLI shows a job and a download: rich progress bars on a terminal, one plain
line per change otherwise (logs, pipes, CI)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TransferSpeedColumn,
)

from jobs.schemas import JobPublic
from llm2slm.client import Llm2SlmClient


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def describe(st: JobPublic) -> str:
    """`loss 3.21  1,234 tok/s  ETA 0m06s` from the last report; '' before the first."""
    m = st.metrics or {}
    parts = []
    if m.get("loss") is not None:
        parts.append(f"loss {m['loss']:.4g}")
    if m.get("tokens_per_s") is not None:
        parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
    if m.get("eval_ppl") is not None:
        parts.append(f"eval ppl {m['eval_ppl']:.4g}")
    if st.state == "running":
        parts.append(f"ETA {_eta(st.eta_s)}")
    return "  ".join(parts)


def status_line(st: JobPublic) -> str:
    step = f"step {st.step or 0}/{st.total_steps or '?'}"
    return f"{st.job_id}  {st.state:<9}  {step}  {describe(st)}".rstrip()


def follow(client: Llm2SlmClient, job_id: str, console: Console, every: float = 1.0) -> JobPublic:
    """Show the job until it ends; returns its final status."""
    if not console.is_terminal:
        last_key, st = None, None
        for st in client.follow(job_id, every=every):
            key = (st.state, st.step or 0)
            if key != last_key:
                console.print(status_line(st), markup=False, highlight=False)
                last_key = key
        return st
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(job_id, total=None, info="")
        for st in client.follow(job_id, every=every):
            bar.update(
                task,
                description=f"{job_id} {st.state}",
                completed=st.step or 0,
                total=st.total_steps,
                info=describe(st),
            )
    return st


def download(
    client: Llm2SlmClient, job_id: str, files: list[tuple[str, int]], out: Path, console: Console
) -> list[Path]:
    """Fetch (path, size) files into out/, resuming any .part; a bar per file on a terminal."""
    done: list[Path] = []
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
    ]
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        for path, size in files:
            task = bar.add_task(path, total=size)
            part = Path(out, *path.split("/")).with_name(Path(path).name + ".part")
            resumed = part.stat().st_size if part.is_file() else 0
            target = client.download(
                job_id, path, out, progress=lambda n, t, task=task: bar.update(task, completed=n)
            )
            done.append(target)
            if not console.is_terminal:
                note = f" (resumed at byte {resumed:,})" if resumed else ""
                console.print(f"{target}  {size:,} bytes{note}", markup=False, highlight=False)
    return done
