"""`llm2slm`: submit, follow and fetch distillation jobs of an llm2slm service.

    llm2slm serve                                   # a local Ray + the API on :8000
    llm2slm distill --config job.json --follow      # or flags / key=value overrides
    llm2slm distill --local max_steps=40            # in this process, on a local Ray
    llm2slm status JOB [--follow]
    llm2slm jobs | artifacts JOB | cancel JOB
    llm2slm download JOB [PATH] -o DIR              # resumable (HTTP Range)
    llm2slm report JOB -o report.html               # the job's HTML report page

The service URL and token come from --url / --token or LLM2SLM_URL / LLM2SLM_TOKEN.
Exit codes: 0 ok, 1 the service refused or the job failed, 2 invalid config or usage.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from llm2slm import local, progress
from llm2slm.client import InvalidRequest, Llm2SlmClient, ServiceError

# Flags that set a DistillConfig field; any other field is a key=value override.
CONFIG_FLAGS = {
    "teacher": "teacher_model",
    "student": "student_model",
    "dataset": "dataset",
    "max_steps": "max_steps",
    "num_workers": "num_workers",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="llm2slm",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    _connection_flags(ap, None)
    # The same flags after the command too (`llm2slm jobs --url ...`), without defaults
    # there so that a value given before the command survives.
    common = argparse.ArgumentParser(add_help=False)
    _connection_flags(common, argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, parents=[common])

    d = add("distill", help="submit a job (or run it here with --local)")
    d.add_argument("--config", default="", help="JSON file with a DistillConfig")
    d.add_argument("--teacher", help="teacher_model")
    d.add_argument("--student", help="student_model")
    d.add_argument("--dataset", help="dataset")
    d.add_argument("--max-steps", type=int, help="max_steps")
    d.add_argument("--num-workers", type=int, help="num_workers")
    d.add_argument("--job-id", help="id for the job; an id of a failed job resumes it")
    d.add_argument("--follow", action="store_true", help="show progress until it ends")
    d.add_argument("--every", type=float, default=1.0, help="--follow: seconds between polls")
    d.add_argument("--local", action="store_true", help="run here on a local Ray, no service")
    d.add_argument("--storage", default="llm2slm-storage", help="--local: storage root")
    d.add_argument("overrides", nargs="*", help="key=value config fields")

    s = add("status", help="a job's state and progress")
    s.add_argument("job")
    s.add_argument("--follow", action="store_true", help="live progress until it ends")
    s.add_argument("--every", type=float, default=1.0, help="seconds between polls")

    j = add("jobs", help="list jobs, newest first")
    j.add_argument("--state", help="only jobs in this state")
    j.add_argument("--limit", type=int, default=20)
    j.add_argument("--offset", type=int, default=0)

    add("artifacts", help="a job's files and sizes").add_argument("job")
    add("cancel", help="stop a job").add_argument("job")

    dl = add("download", help="fetch artifacts (all, or one PATH); resumable")
    dl.add_argument("job")
    dl.add_argument("path", nargs="?", help="one artifact path, or a folder prefix")
    dl.add_argument("-o", "--out", default=".", help="destination folder")

    rp = add("report", help="save the job's HTML report page")
    rp.add_argument("job")
    rp.add_argument("-o", "--out", default=None, help="file (default: <job>-report.html)")

    ca = add("caches", help="list corpus and teacher-signal caches; or delete one")
    ca.add_argument("action", nargs="?", choices=["list", "delete"], default="list")
    ca.add_argument("cache", nargs="?", help="delete: KIND/KEY as the list shows it")

    sv = add("serve", help="start a local Ray and the llm2slm API")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--storage", default=None, help="storage root (LLM2SLM_STORAGE_ROOT)")
    sv.add_argument("--address", default=None, help="join this Ray cluster instead")
    sv.add_argument("--dashboard-port", type=int, default=8265)
    sv.add_argument(
        "--allow-local-root", action="append", default=[], help="folder for local models/data"
    )
    sv.add_argument("--max-concurrent-jobs", type=int, default=None)
    return ap


def _connection_flags(ap: argparse.ArgumentParser, default: object) -> None:
    ap.add_argument("--url", default=default, help="service URL (LLM2SLM_URL; :8000 locally)")
    ap.add_argument("--token", default=default, help="API token (LLM2SLM_TOKEN)")
    ap.add_argument(
        "--json",
        action="store_true",
        default=False if default is None else default,
        help="print the service's JSON answers",
    )


def job_config(args: argparse.Namespace) -> dict[str, Any]:
    """--config file, then the flags, then key=value overrides (later wins)."""
    from jobs.spec import parse_overrides

    data = json.loads(Path(args.config).read_text()) if args.config else {}
    for flag, field in CONFIG_FLAGS.items():
        if getattr(args, flag, None) is not None:
            data[field] = getattr(args, flag)
    data.update(parse_overrides(args.overrides))
    return data


def _dump(console: Console, obj: Any) -> None:
    data = obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj
    console.print_json(json.dumps(data))


def _final(console: Console, st) -> int:
    if st.state == "succeeded":
        s = st.summary or {}
        if "student_ppl_after" in s:
            console.print(
                f"held-out perplexity: teacher {s['teacher_ppl']:.2f}, student "
                f"{s['student_ppl_before']:.2f} -> {s['student_ppl_after']:.2f}",
                highlight=False,
            )
        console.print(f"artifacts: llm2slm artifacts {st.job_id}", highlight=False)
        return 0
    console.print(f"job {st.job_id} {st.state}: {st.error or 'no reason recorded'}")
    return 1


def cmd_distill(args, client: Llm2SlmClient, console: Console) -> int:
    config = job_config(args)
    if args.local:
        return local.distill_local(config, args)
    sub = client.submit(config, job_id=args.job_id)
    if args.json and not args.follow:
        _dump(console, sub)
        return 0
    console.print(f"submitted {sub.job_id} ({sub.state})", highlight=False)
    if not args.follow:
        console.print(f"follow it: llm2slm status {sub.job_id} --follow", highlight=False)
        return 0
    return _final(console, progress.follow(client, sub.job_id, console, every=args.every))


def cmd_status(args, client: Llm2SlmClient, console: Console) -> int:
    if args.follow:
        return _final(console, progress.follow(client, args.job, console, every=args.every))
    st = client.status(args.job)
    if args.json:
        _dump(console, st)
    else:
        console.print(progress.status_line(st), highlight=False, markup=False)
        if st.error:
            console.print(f"error: {st.error}", highlight=False, markup=False)
    return 0


def cmd_jobs(args, client: Llm2SlmClient, console: Console) -> int:
    page = client.jobs(offset=args.offset, limit=args.limit, state=args.state)
    if args.json:
        _dump(console, page)
        return 0
    table = Table("job", "state", "step", "created", "loss", title=f"{page.total} job(s)")
    for j in page.jobs:
        loss = (j.metrics or {}).get("loss")
        table.add_row(
            j.job_id,
            j.state,
            f"{j.step or 0}/{j.total_steps or '?'}",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.created_at)),
            f"{loss:.4g}" if loss is not None else "",
        )
    console.print(table)
    return 0


def cmd_artifacts(args, client: Llm2SlmClient, console: Console) -> int:
    arts = client.artifacts(args.job)
    if args.json:
        _dump(console, arts)
        return 0
    for a in arts.artifacts:
        console.print(f"{a.size:>14,}  {a.path}", highlight=False, markup=False)
    total = sum(a.size for a in arts.artifacts)
    console.print(f"{len(arts.artifacts)} files, {total:,} bytes", highlight=False)
    return 0


def cmd_download(args, client: Llm2SlmClient, console: Console) -> int:
    arts = client.artifacts(args.job).artifacts
    files = [(a.path, a.size) for a in arts]
    if args.path:
        prefix = args.path.rstrip("/") + "/"
        files = [(p, s) for p, s in files if p == args.path or p.startswith(prefix)]
        if not files:
            raise ServiceError(f"job {args.job} has no artifact '{args.path}'", 404)
    out = Path(args.out)
    got = progress.download(client, args.job, files, out, console)
    console.print(f"{len(got)} file(s) in {out}", highlight=False)
    return 0


def cmd_cancel(args, client: Llm2SlmClient, console: Console) -> int:
    st = client.cancel(args.job)
    console.print(f"{st.job_id} {st.state}", highlight=False)
    return 0


def cmd_report(args, client: Llm2SlmClient, console: Console) -> int:
    out = Path(args.out or f"{args.job}-report.html")
    out.write_text(client.report_html(args.job))
    console.print(f"report written to {out}", highlight=False)
    return 0


def cmd_caches(args, client: Llm2SlmClient, console: Console) -> int:
    if args.action == "delete":
        kind, _, key = (args.cache or "").partition("/")
        if not key:
            raise ServiceError("caches delete needs KIND/KEY, e.g. teacher_signal/<key>", 400)
        gone = client.delete_cache(kind, key)
        console.print(f"deleted {kind}/{key}: {gone.bytes_freed:,} bytes freed", highlight=False)
        return 0
    found = client.caches()
    if args.json:
        _dump(console, found)
        return 0
    table = Table("cache", "teacher / corpus", "tokens", "bytes", "jobs", "state",
                  title=f"{len(found.caches)} cache(s), {found.total_bytes:,} bytes")  # fmt: skip
    for c in found.caches:
        state = "complete" if c.complete else "incomplete"
        state = "building" if c.building_by else "in use" if c.in_use_by else state
        table.add_row(
            f"{c.kind}/{c.key}",
            " / ".join(x for x in (c.teacher, c.corpus) if x),
            f"{c.tokens:,}" if c.tokens is not None else "",
            f"{c.bytes:,}",
            ", ".join(j.job_id for j in c.jobs),
            state,
        )
    console.print(table)
    return 0


def cmd_serve(args, client: Llm2SlmClient | None, console: Console) -> int:
    return local.serve(args)


COMMANDS = {
    "distill": cmd_distill,
    "status": cmd_status,
    "jobs": cmd_jobs,
    "artifacts": cmd_artifacts,
    "download": cmd_download,
    "cancel": cmd_cancel,
    "report": cmd_report,
    "caches": cmd_caches,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    client = None if args.command == "serve" else Llm2SlmClient(args.url, args.token)
    try:
        return COMMANDS[args.command](args, client, console)
    except (InvalidRequest, ValueError) as e:  # 422, a bad config file or override
        err.print(f"error: {e}", markup=False, highlight=False)
        return 2
    except (ServiceError, OSError) as e:
        err.print(f"error: {e}", markup=False, highlight=False)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    finally:
        if client is not None:
            client.close()


if __name__ == "__main__":
    sys.exit(main())
