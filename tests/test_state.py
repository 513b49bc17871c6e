"""Checkpoints (kd/state.py): safetensors + JSON on disk, never unpickled; an exact resume
through the file, with the history; fp16 loss scaling and its state (issue 16, items 4,
10 and 12). The GPU side of item 12 is scripts/gpu_checks.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import ray.train
import torch

from kd import cli
from kd import state as kd_state
from kd.config import DistillConfig
from kd.losses import LossWeights
from kd.train import on_log, setup, train, train_step
from tests.conftest import tiny_cfg
from train_job import worker

ROOT = Path(__file__).resolve().parents[1]


class _RunsCode:
    """Unpickling this runs code (it writes `marker`): what anyone who can write to the
    checkpoint storage could plant."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 1, "kept_layers": None, "payload": _RunsCode(marker)}, path)


def _call(fn, *args):
    """fn(*args), or the exception it raised: the tests look at the marker first."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - the caller asserts what it must be
        return e


def test_cli_resume_refuses_a_pickled_checkpoint_and_runs_none_of_it(tmp_path, tiny_job, capsys):
    out, marker = tmp_path / "run", tmp_path / "ran"
    _plant(out / "checkpoint" / "state.pt", marker)
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps(tiny_job(max_steps=2)))
    rc = _call(cli.main, ["--config", str(cfg), "--out", str(out), "--resume"])
    assert not marker.exists(), "resuming unpickled the checkpoint and ran the planted code"
    err = capsys.readouterr().err
    assert rc == 2, rc
    assert "cannot resume" in err and "state.pt is a pickled checkpoint" in err, err
    assert "Start a new run" in err, err


@pytest.mark.parametrize("name", ["state.pt", "state.safetensors"])
def test_worker_refuses_a_pickled_checkpoint_and_runs_none_of_it(monkeypatch, tmp_path, name):
    """The Ray worker's resume path: a planted pickle under the old name, or under the
    new one (safetensors parses no pickle), is refused with CheckpointError."""
    folder, marker = tmp_path / "checkpoint_000001", tmp_path / "ran"
    _plant(folder / name, marker)
    ckpt = ray.train.Checkpoint.from_directory(str(folder))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ckpt)
    got = _call(worker._load_checkpoint)
    assert not marker.exists(), "the worker unpickled the checkpoint and ran the planted code"
    assert isinstance(got, kd_state.CheckpointError), got
    assert name in str(got) and "new run" in str(got), got


def test_checkpoint_file_round_trip_resumes_exactly_with_lora_dropout(
    tmp_path, tiny_teacher, corpus
):
    """4 steps straight == 2 steps, a checkpoint file, a fresh Run, 2 steps: loss for
    loss and weight for weight, with dropout drawing from the restored RNG."""
    cfg = tiny_cfg(
        tiny_teacher, corpus, max_steps=4, warmup_steps=1, logging_steps=1,
        lora_r=4, lora_dropout=0.1,
    )  # fmt: skip
    straight_run = setup(cfg)
    straight: list[dict] = []
    train(straight_run, on_log(straight.append))
    first = setup(cfg)
    first.cfg = cfg.model_copy(update={"max_steps": 2})  # stop early, same schedule
    head: list[dict] = []
    train(first, on_log(head.append))
    path = kd_state.save(kd_state.state_dict(first, head), tmp_path / "checkpoint")
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.safetensors"]
    assert path.read_bytes()[:2] != b"PK"  # not a torch.save zip (a pickle inside)
    state = kd_state.load(path.parent)
    assert state["history"] == head and state["step"] == 2
    resumed = setup(cfg, kept_layers=state["kept_layers"])
    kd_state.load_state_dict(resumed, state)
    tail: list[dict] = []
    train(resumed, on_log(tail.append))
    key = ("loss", "kd", "ce", "cos", "grad_norm", "lr")
    assert [[m[k] for k in key] for m in head + tail] == [[m[k] for k in key] for m in straight]
    a, b = straight_run.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_checkpoint_is_refused_with_the_file_named(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "state.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(kd_state.CheckpointError, match="not a readable safetensors"):
        kd_state.load(folder)
    (folder / "state.safetensors").unlink()
    with pytest.raises(kd_state.CheckpointError, match="no checkpoint"):
        kd_state.load(folder)


@pytest.mark.parametrize(
    ("precision", "device", "scaled"),
    [("fp16", "cuda", True), ("bf16", "cuda", False), ("auto", "cuda", False),
     ("fp32", "cuda", False), ("fp16", "cpu", False)],
)  # fmt: skip
def test_loss_scaling_is_on_for_fp16_autocast_only(tiny_job, precision, device, scaled):
    from kd.train import loss_scaling

    cfg = DistillConfig.model_validate(tiny_job(precision=precision, use_gpu=True))
    assert loss_scaling(cfg, torch.device(device)) is scaled


def test_fp16_loss_scaler_in_the_loop(tmp_path, tiny_teacher, corpus):
    """The loop with the real GradScaler, on the CPU (fp16 autocast needs CUDA; that
    part is scripts/gpu_checks.py): an overflowed step is skipped, not fatal; a scaled
    step equals an unscaled one; the scale survives a checkpoint file; gradients that
    are non-finite at any scale stop the run."""
    cfg = tiny_cfg(tiny_teacher, corpus, max_steps=3, warmup_steps=0)
    weights = LossWeights.from_config(cfg)
    plain, scaled = setup(cfg), setup(cfg)
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    train_step(plain, weights)
    parts = train_step(scaled, weights).other
    assert parts["loss_scale"] == 2.0**16 and parts["fp16_skipped"] == 0.0
    a, b = plain.student.state_dict(), scaled.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # x 2^16, then / 2^16: exact

    # a scale that overflows fp32: the step is skipped and the scale halved
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    parts = train_step(scaled, weights).other
    assert parts["fp16_skipped"] == 1.0 and parts["grad_norm"] == 0.0
    assert parts["loss_scale"] == 2.0**126 and scaled.step == 2
    c = scaled.student.state_dict()
    assert all(torch.equal(b[k], c[k]) for k in b)

    kd_state.save(kd_state.state_dict(scaled), tmp_path)
    plain.scaler = torch.amp.GradScaler("cpu")
    kd_state.load_state_dict(plain, kd_state.load(tmp_path))
    assert plain.scaler.get_scale() == 2.0**126

    # NaN weights: non-finite at every scale; once the scale is below 1, the run stops
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    with torch.no_grad():
        next(p for p in scaled.student_fwd.parameters() if p.requires_grad).fill_(float("nan"))
    train_step(scaled, weights)  # skipped, scale 1 -> 0.5
    with pytest.raises(FloatingPointError, match="non-finite gradient norm"):
        train_step(scaled, weights)


def test_fp16_scaler_metrics_are_not_drawn_as_loss_parts():
    from kd.curves import loss_parts

    row = {"step": 1, "loss": 2.0, "kd": 1.5, "loss_scale": 65536.0, "fp16_skipped": 0.0}
    assert loss_parts([row]) == ["loss", "kd"]


def test_gpu_checks_script_runs_what_it_can_on_cpu(tiny_teacher, capsys):
    spec = importlib.util.spec_from_file_location("gpu_checks", ROOT / "scripts/gpu_checks.py")
    gpu_checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_checks)
    only = ["fp16_underflow", "fp16_training", "bf16"]
    argv = ["--device", "cpu", "--teacher", str(tiny_teacher), "--only", *only]
    assert gpu_checks.main(argv) == 0
    out = capsys.readouterr().out
    assert "PASS fp16_underflow: max |grad| without scaler 0.0e+00" in out, out
    assert "SKIP fp16_training" in out and "SKIP bf16" in out, out
