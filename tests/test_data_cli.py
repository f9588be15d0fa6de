"""`lavin-fast data`: --check, --preview, --bench (tiny sizes; no timing assertions)."""

import json

import pytest
from PIL import Image


def test_cli_check_and_preview(tmp_path, capsys):
    from lavin_fast.cli import main

    assert main(["data", "--check", "demo", "--backend", "torch", "--resolution", "16", "--n-pairs", "1"]) == 0
    out = capsys.readouterr().out
    assert "inpainting" in out and "first batch: context" in out
    png = tmp_path / "grid.png"
    assert (
        main(
            [
                "data",
                "--preview",
                "demo",
                "--backend",
                "torch",
                "--resolution",
                "16",
                "--n-pairs",
                "1",
                "--batch-size",
                "2",
                "--out",
                str(png),
            ]
        )
        == 0
    )
    img = Image.open(png)
    assert img.height == 2 * 18 and img.width % 18 == 0 and img.width >= 4 * 18
    assert main(["data"]) == 2


def test_cli_bench_runs(tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    from lavin_fast.cli import main

    out = tmp_path / "bench.json"
    argv = [
        "data",
        "--bench",
        "--quick",
        "--seconds",
        "0.2",
        "--repeats",
        "1",
        "--resolution",
        "32",
        "--batch-size",
        "4",
        "--workers",
        "1",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    assert [r["impl"] for r in rows] == ["PIL + torch DataLoader", "DALI (CPU)"]
    assert all(r["images_per_s"] > 0 and r["batches"] >= 2 for r in rows)
    assert "images_per_s" in capsys.readouterr().out
