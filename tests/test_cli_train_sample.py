"""CLI smoke tests: `lavin-fast demo --quick`, `lavin-fast train`, `lavin-fast sample` (images and video), and
the errors that say what to do."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from lavin_fast.cli import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    (out / "stdout.txt").write_text(printed.getvalue())
    return out


def test_demo_quick_writes_pngs(demo_dir):
    from lavin_fast.demo import COLUMNS, DEFAULT_TASKS, grid_figure_size

    for name in ("samples.png", "loss.png", "dit_ema.safetensors", "vae.safetensors", "demo_metrics.json"):
        assert (demo_dir / name).is_file(), name
    # the labelled grid: a seen and a held-out query per task, one row each, 8 titled columns
    metrics = json.loads((demo_dir / "demo_metrics.json").read_text())
    assert metrics["columns"] == list(COLUMNS)
    assert [(q["task"], q["query"]) for q in metrics["queries"]] == [
        (t, k) for t in DEFAULT_TASKS for k in ("seen", "held-out")
    ]
    assert [label.split("\n")[:2] for label in metrics["row_labels"]] == [
        [t, f"{k} query"] for t in DEFAULT_TASKS for k in ("seen", "held-out")
    ]
    grid = Image.open(demo_dir / "samples.png")
    assert grid.size == grid_figure_size(4)
    # the figures are printed at the end of the run, one line per query, and are finite
    printed = (demo_dir / "stdout.txt").read_text()
    assert re.search(r"VAE reconstruction: \d+\.\d dB mean over 11 demo photos", printed)
    for q in metrics["queries"]:
        assert re.search(
            rf"{q['task']} +{q['query']} +query \({q['image']}\): prediction vs answer -?\d+\.\d dB", printed
        )
        assert all(np.isfinite(v) for k, v in q.items() if k.endswith("_db"))
    assert re.search(r"total \d+ s", printed)
    assert len(list((demo_dir / "tasks" / "colorization").glob("*_input.png"))) == 2


def test_sample_cli_deterministic(demo_dir, tmp_path, capsys):
    task, query = demo_dir / "tasks" / "colorization", demo_dir / "tasks" / "colorization_query.png"
    common = [
        "sample",
        "--dit",
        str(demo_dir / "dit_ema.safetensors"),
        "--vae",
        str(demo_dir / "vae.safetensors"),
        "--task-dir",
        str(task),
        "--query",
        str(query),
        str(query),
        "--grid-points",
        "4",
        "--grid",
        "uniform",
        "--seed",
        "3",
        "--show-context",
    ]
    assert main(common + ["--out", str(tmp_path / "a.png")]) == 0
    assert main(common + ["--out", str(tmp_path / "b.png")]) == 0
    a, b = np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png"))
    assert a.shape == ((32 + 2) * 2 + 2, (32 + 2) * 6 + 2, 3)  # 2 queries x (2 pairs, query, prediction)
    assert np.array_equal(a, b)
    assert "prediction" in capsys.readouterr().out


def test_sample_cli_errors(demo_dir, tmp_path, capsys):
    dit, vae = str(demo_dir / "dit_ema.safetensors"), str(demo_dir / "vae.safetensors")
    task, query = demo_dir / "tasks" / "colorization", demo_dir / "tasks" / "colorization_query.png"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "cat.png").write_bytes((task / "example0_input.png").read_bytes())
    assert main(["sample", "--dit", dit, "--vae", vae, "--task-dir", str(empty), "--query", str(query)]) == 2
    assert "NAME_input.png" in capsys.readouterr().err
    assert (
        main(
            [
                "sample",
                "--dit",
                str(tmp_path / "nope.safetensors"),
                "--vae",
                vae,
                "--task-dir",
                str(task),
                "--query",
                str(query),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert main(["sample", "--dit", str(bad), "--vae", vae, "--task-dir", str(task), "--query", str(query)]) == 2
    assert "corrupt" in capsys.readouterr().err
    big = tmp_path / "big.png"
    Image.new("RGB", (48, 40)).save(big)
    assert main(["sample", "--dit", dit, "--vae", vae, "--task-dir", str(task), "--query", str(big)]) == 2
    assert "--size" in capsys.readouterr().err
    # with --size everything is resized and it runs
    assert (
        main(
            [
                "sample",
                "--dit",
                dit,
                "--vae",
                vae,
                "--task-dir",
                str(task),
                "--query",
                str(big),
                "--size",
                "32",
                "--nfe",
                "2",
                "--grid",
                "uniform",
                "--out",
                str(tmp_path / "c.png"),
            ]
        )
        == 0
    )


def test_sample_cli_video(demo_dir, tmp_path):
    import cv2

    from lavin_fast.data.demo_data import moving_shapes_clip
    from lavin_fast.media import write_clip

    clip = write_clip(moving_shapes_clip(frames=16, height=32, width=32, seed=1), tmp_path / "clip.avi", fps=10)
    out = tmp_path / "pred.avi"
    assert (
        main(
            [
                "sample",
                "--dit",
                str(demo_dir / "dit_ema.safetensors"),
                "--vae",
                str(demo_dir / "vae.safetensors"),
                "--video",
                str(clip),
                "--grid-points",
                "2",
                "--grid",
                "uniform",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    cap = cv2.VideoCapture(str(out))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    assert n == 16 + 5


def test_train_cli_smoke_and_errors(demo_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--steps",
        "2",
        "--model",
        "tiny",
        "--model-overrides",
        "{depth: 1, in_channels: 4}",  # the demo VAE has 4 latent channels
        "--image-size",
        "32",
        "--batch-size",
        "2",
        "--micro-batch-size",
        "2",
        "--num-pairs",
        "1",
        "--tasks",
        "[colorization]",
        "--vae-weights",
        str(demo_dir / "vae.safetensors"),
        "--device",
        "cpu",
        "--out-dir",
        str(out),
        "--tensorboard",
        "--progress",
        "false",
        "--log-every",
        "1",
    ]
    assert main(args) == 0
    assert (out / "ema.safetensors").is_file() and (out / "checkpoints" / "latest").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert any((out / "tensorboard").iterdir())
    # fine-tuning from the demo's EMA weights (our file carries its config)
    init = [
        "--init-from",
        str(demo_dir / "dit_ema.safetensors"),
        "--out-dir",
        str(tmp_path / "ft"),
        "--steps",
        "1",
        "--grad-checkpointing",
    ]
    assert main(args + init) == 0
    assert main(args[:1] + ["--schedule", "linear"]) == 2
    assert "schedule" in capsys.readouterr().err
    assert main(["train", "--list-fields"]) == 0
    listed = capsys.readouterr().out
    assert "micro_batch_size" in listed and "gradient accumulation" in listed
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--stepz", "3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "usage: lavin-fast train" in err and "--stepz: did you mean --steps?" in err


def test_train_cli_errors_are_one_line_with_rc_2(tmp_path, capsys):
    base = ["train", "--out-dir", str(tmp_path / "r"), "--progress", "false", "--tensorboard", "false"]
    for flag, value in [("--image-size", "65"), ("--model", "7B"), ("--weight-decay", "-1"),
                        ("--max-minutes", "-1"), ("--t-mean", "nan"), ("--eps", "0")]:  # fmt: skip
        assert main(base + [flag, value]) == 2, flag
        err = capsys.readouterr().err
        assert err.startswith("lavin-fast train: error:") and "Traceback" not in err, err
        assert flag[2:].replace("-", "_") in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--out-dir", str(blocker / "run"), "--progress", "false"]) == 2
    assert "cannot write" in capsys.readouterr().err
    with pytest.raises(Exception, match="image_size"):  # --debug: the real exception, traceback and all
        main(base + ["--image-size", "65", "--debug"])
