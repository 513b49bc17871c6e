"""How `llm2slm ... --follow` prints a job on a pipe: one line per (state, step) change,
with the last report's loss, tokens/s, eval perplexity and, while running, the ETA.

The end-to-end run is in test_cli.py; whether it catches a job between two steps
depends on the poll interval, so the line format is checked here on a fixed sequence.
"""

from __future__ import annotations

import io

from rich.console import Console

from jobs.schemas import JobPublic
from llm2slm import progress


class Scripted:
    """A client whose `follow` yields the given statuses (what the service answered)."""

    def __init__(self, states: list[JobPublic]):
        self.states = states

    def follow(self, job_id: str, every: float = 1.0):
        assert job_id == "kd-1"
        yield from self.states


def st(state, step=None, metrics=None, eta_s=None) -> JobPublic:
    return JobPublic(
        job_id="kd-1", state=state, created_at=0.0, updated_at=0.0, step=step,
        total_steps=6, metrics=metrics, eta_s=eta_s,
    )  # fmt: skip


def test_one_line_per_state_or_step_change_with_the_last_report():
    m = {"loss": 3.21456, "tokens_per_s": 1234.4, "eval_ppl": 45.678}
    seq = [
        st("pending"), st("pending"), st("running", 0),
        st("running", 2, m, eta_s=125.0), st("running", 2, m, eta_s=120.0),
        st("running", 4, m | {"eval_ppl": None}, eta_s=3700.0), st("succeeded", 6, m),
    ]  # fmt: skip
    out = io.StringIO()
    final = progress.follow(Scripted(seq), "kd-1", Console(file=out, width=200))
    assert final.state == "succeeded"
    assert out.getvalue().splitlines() == [
        "kd-1  pending    step 0/6",
        "kd-1  running    step 0/6  ETA ?",
        "kd-1  running    step 2/6  loss 3.215  1,234 tok/s  eval ppl 45.68  ETA 2m05s",
        "kd-1  running    step 4/6  loss 3.215  1,234 tok/s  ETA 1h01m",
        "kd-1  succeeded  step 6/6  loss 3.215  1,234 tok/s  eval ppl 45.68",
    ]
