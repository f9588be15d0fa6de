"""`lavin-fast demo --quick` twice with the same seed: the same figures (fixed step counts, not seconds), and a
different seed gives different ones (so the comparison can fail)."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib

import pytest

from lavin_fast.cli import main

TOLERANCE_DB = 0.1
"""the issue's bar: two runs with the same seed agree to 0.1 dB (on one machine and thread count they are equal)"""


def _figures(out: pathlib.Path, *extra: str) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["demo", "--quick", "--no-progress", "--threads", "1", "--out", str(out), *extra]) == 0
    metrics = json.loads((out / "demo_metrics.json").read_text())
    figures = {"vae_psnr_db": metrics["vae_psnr_db"], "vae_fit_steps": metrics["vae_fit_steps"]}
    figures["dit_steps"] = metrics["dit_steps"]
    for q in metrics["queries"]:
        for key, value in q.items():
            if key.endswith("_db"):
                figures[f"{q['task']}/{q['query']}/{q['image']}/{key}"] = value
    return figures


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> dict[str, float]:
    return _figures(tmp_path_factory.mktemp("demo_a"))


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
