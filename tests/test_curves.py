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
