"""kd.curves on a synthetic history, and the client package staying light."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image

from kd import curves


def history(eval_every: int = 0) -> list[dict]:
    rows = []
    for step in range(1, 11):
        row = {"step": step, "loss": 4 / step, "kd": 3 / step, "ce": 1 / step, "cos": 0.1}
        row |= {"lr": 1e-3, "tokens_per_s": 500.0, "epoch": 0, "grad_norm": 1.0}
        if eval_every and step % eval_every == 0:
            row["eval_ppl"] = 100 / step
        rows.append(row)
    return rows


def test_loss_parts_in_order_without_non_loss_keys():
    assert curves.loss_parts(history(2)) == ["loss", "kd", "ce", "cos"]
    assert curves.series(history(5), "eval_ppl") == ([5.0, 10.0], [20.0, 10.0])


def test_png_has_both_panels_drawn(tmp_path):
    for every in (0, 2):
        out = curves.plot_curves(history(every), tmp_path / f"c{every}.png", {"teacher_ppl": 3.0})
        img = Image.open(out).convert("RGB")
        assert img.size == (1000, 400)
        coloured = [
            x
            for i, (r, g, b) in enumerate(img.getdata())
            if max(r, g, b) - min(r, g, b) > 60
            for x in [i % img.width]
        ]
        assert len(coloured) > 1000
        assert min(coloured) < 500 < max(coloured)  # lines in the left and the right panel


def test_runs_that_generate_get_a_rollout_and_train_time_panel(tmp_path):
    """rollout_s / train_s (logged when lmbda > 0 or seq_kd) get a third panel, stacked:
    the orange band is the rollout, the blue one the training on top of it."""
    timed = [r | {"rollout_s": 0.3, "train_s": 0.7, "on_policy": 1.0} for r in history(2)]
    out = curves.plot_curves(timed, tmp_path / "timed.png", {"teacher_ppl": 3.0})
    img = Image.open(out).convert("RGB")
    assert img.size == (1500, 400)
    third = img.crop((1000, 0, 1500, 400)).getdata()
    orange = sum(1 for r, g, b in third if r > 200 and 130 < g < 210 and b < 150)
    blue = sum(1 for r, g, b in third if b > 180 and r < 150)
    assert orange > 5000 and blue > 10000  # train band ~2.3x the rollout band (0.7 vs 0.3)
    assert "rollout_s" not in curves.loss_parts(timed)
    # off-policy runs log no timing: two panels, as before
    assert Image.open(curves.plot_curves(history(2), tmp_path / "off.png")).size == (1000, 400)


def test_tensorboard_events_written(tmp_path):
    folder = curves.write_tensorboard(history(2), tmp_path / "tb")
    (events,) = list(folder.glob("events.out.tfevents.*"))
    data = events.read_bytes()
    assert b"train/loss" in data and b"eval/ppl" in data and b"train/epoch" not in data


def test_mlflow_is_skipped_without_a_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert curves.log_mlflow(history(), {}, tmp_path, "run") is False


def test_client_package_imports_neither_ray_nor_torch():
    code = "import sys, llm2slm, llm2slm.cli; print(sorted({'ray', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
