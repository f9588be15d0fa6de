"""`lavin-fast demo --quick` twice with the same seed: the same figures (fixed step counts, not seconds), and a
different seed gives different ones (so the comparison can fail)."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from lavin_fast.cli import main

TOLERANCE_DB = 0.1
"""the issue's bar: two runs with the same seed agree to 0.1 dB (on one machine and thread count they are equal)"""


def _figures(out: pathlib.Path, *extra: str) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["demo", "--quick", "--no-progress", "--threads", "1", "--out", str(out), *extra]) == 0
    return _read(out)


def _read(out: pathlib.Path) -> dict[str, float]:
    metrics = json.loads((out / "demo_metrics.json").read_text())
    figures = {"vae_psnr_db": metrics["vae_psnr_db"], "vae_fit_steps": metrics["vae_fit_steps"]}
    figures["dit_steps"] = metrics["dit_steps"]
    for q in metrics["queries"]:
        for key, value in q.items():
            if key.endswith("_db"):
                figures[f"{q['task']}/{q['query']}/{q['image']}/{key}"] = value
    return figures


@pytest.fixture(scope="module")
def first_out(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("demo_a")
    _figures(out)
    return out


@pytest.fixture(scope="module")
def first_run(first_out) -> dict[str, float]:
    return _read(first_out)


def test_demo_quick_same_seed_same_figures(first_run, tmp_path):
    second = _figures(tmp_path / "b")
    assert second.keys() == first_run.keys()
    assert len([k for k in first_run if k.endswith("_db")]) >= 4
    for key, value in first_run.items():
        assert abs(second[key] - value) <= TOLERANCE_DB, (key, value, second[key])


def test_demo_quick_other_seed_other_figures(first_run, tmp_path):
    other = _figures(tmp_path / "c", "--seed", "1")
    differ = [k for k, v in first_run.items() if k.endswith("_db") and abs(other[k] - v) > TOLERANCE_DB]
    assert len(differ) >= len([k for k in first_run if k.endswith("_db")]) // 2, differ


def test_query_as_prediction_figure(first_out):
    """The trivial answer the demo prints for scale (the query itself as the prediction), recomputed here with
    numpy from the files the run wrote: the seen colorization query (a grey PNG) against the colour photograph."""
    metrics = json.loads((first_out / "demo_metrics.json").read_text())
    seen = next(q for q in metrics["queries"] if q["task"] == "colorization" and q["query"] == "seen")
    query = np.asarray(Image.open(first_out / "tasks" / "colorization_query.png").convert("RGB"), np.float64) / 255
    answer = np.asarray(Image.open(first_out / "images" / "train" / f"{seen['image']}.png").convert("RGB"), np.float64)
    mse = np.mean((query - answer / 255) ** 2)
    assert abs(seen["query_vs_answer_db"] - 10 * np.log10(1 / mse)) < 0.05
    gap = seen["answer_through_vae_vs_answer_db"] - seen["query_vs_answer_db"]
    assert abs(seen["query_gap_db"] - gap) < 0.02
    assert metrics["gaps"]["colorization/seen"]["query_as_prediction_mean_db"] == pytest.approx(gap, abs=0.02)
