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
    from lavin_fast.cli.demo import COLUMNS, DEFAULT_TASKS, grid_figure_size

    for name in ("samples.png", "loss.png", "dit_ema.safetensors", "vae.safetensors", "demo_metrics.json"):
        assert (demo_dir / name).is_file(), name
    # the labelled grid: a seen and three held-out queries per task, one row each, 8 titled columns
    metrics = json.loads((demo_dir / "demo_metrics.json").read_text())
    assert metrics["columns"] == list(COLUMNS)
    assert [(q["task"], q["query"]) for q in metrics["queries"]] == [
        (t, k) for t in DEFAULT_TASKS for k in ("seen", "held-out", "held-out", "held-out")
    ]
    assert [label.split("\n")[:2] for label in metrics["row_labels"]] == [
        [t, f"{k} query"] for t in DEFAULT_TASKS for k in ("seen", "held-out", "held-out", "held-out")
    ]
    grid = Image.open(demo_dir / "samples.png")
    assert grid.size == grid_figure_size(8)
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
    assert n == 3 * 5 + 5  # the frames used (example input, target, query), then the prediction


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


# --- batch mode, --published, argument checks ---------------------------------------------------------------


def _batch_args(demo_dir, out_dir, *extra):
    task = demo_dir / "tasks" / "colorization"
    return [
        "sample",
        "--dit",
        str(demo_dir / "dit_ema.safetensors"),
        "--vae",
        str(demo_dir / "vae.safetensors"),
        "--task-dir",
        str(task),
        "--query",
        str(task),  # a task folder: its *_input images are the queries, NAME_target.png the ground truth
        "--out-dir",
        str(out_dir),
        "--grid-points",
        "3",
        "--grid",
        "uniform",
        "--no-progress",
        *extra,
    ]


def test_sample_batch_mode_writes_predictions_that_eval_scores(demo_dir, tmp_path, capsys, monkeypatch):
    task = demo_dir / "tasks" / "colorization"
    names = sorted(p.name[: -len("_input.png")] for p in task.glob("*_input.png"))
    out = tmp_path / "pred"
    assert main(_batch_args(demo_dir, out, "--batch", "1")) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{n}.png" for n in names]
    first = {n: np.asarray(Image.open(out / f"{n}.png")) for n in names}
    assert all(a.shape == (32, 32, 3) and a.dtype == np.uint8 for a in first.values())

    # the evaluator reads the folder as it is, against the task folder's targets
    res = tmp_path / "res.json"
    rc = main(["eval", "score", "colorization", "--pred", str(out), "--gt", str(task), "--metrics", "mse,psnr"]
              + ["--out", str(res), "--device", "cpu"])  # fmt: skip
    assert rc == 0
    report = json.loads(res.read_text())
    assert report["num_pairs"] == len(names) and sorted(report["per_image"]) == names
    assert 0 < report["metrics"]["mse"] < 1

    # resumable: a second run predicts nothing and leaves the files alone
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main(_batch_args(demo_dir, out)) == 0
    assert f"{len(names)} already done, 0 to predict" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    # torchrun shards: rank 1 of 2 writes only its queries, the same pixels as the full run (noise keyed by query)
    shard = tmp_path / "shard"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(_batch_args(demo_dir, shard, "--batch", "auto")) == 0  # CPU: 4
    assert sorted(p.name for p in shard.iterdir()) == [f"{n}.png" for n in names[1::2]]
    for n in names[1::2]:
        assert np.array_equal(np.asarray(Image.open(shard / f"{n}.png")), first[n])


def test_sample_batch_depth_writes_npy_that_eval_prefers(demo_dir, tmp_path):
    from lavin_fast.dense_maps import image_to_depth
    from lavin_fast.media import load_image

    out = tmp_path / "pred"
    assert main(_batch_args(demo_dir, out, "--output-kind", "depth")) == 0
    pngs, npys = sorted(out.glob("*.png")), sorted(out.glob("*.npy"))
    assert [p.stem for p in pngs] == [p.stem for p in npys] and pngs
    depth = np.load(npys[0])
    assert depth.shape == (32, 32) and depth.dtype == np.float32 and 0 <= depth.min() <= depth.max() <= 1
    # the .npy is the channel-mean decoding of the written picture (up to its 8-bit rounding)
    from_png = image_to_depth(load_image(pngs[0]), require_grey=False)[0].numpy()
    assert np.abs(from_png - depth).max() <= 0.5 / 255 + 1e-6


def test_sample_published_mode_grid_context_draw_and_truncation(demo_dir, tmp_path, monkeypatch):
    import random

    import lavin_fast.flow.pipeline as pipeline
    from lavin_fast.flow.images import find_pairs
    from lavin_fast.flow.timesteps import PUBLISHED_GRIDS, time_grid
    from lavin_fast.media import load_image

    task = demo_dir / "tasks" / "colorization"
    seen = {}
    real = pipeline.predict

    def spy(dit, vae, pairs, queries, opts, **kw):
        seen.update(pairs=pairs, opts=opts, vae_dtype=vae.dtype)
        return real(dit, vae, pairs, queries, opts, **kw)

    monkeypatch.setattr(pipeline, "predict", spy)
    out = tmp_path / "pred"
    args = _batch_args(demo_dir, out, "--published", "--size", "32", "--seed", "5")
    args[args.index("--grid-points") + 1], args[args.index("--grid") + 1] = "20", "published"
    assert main(args) == 0
    opts = seen["opts"]
    # the published grid, bf16 VAE and integration state, guidance 1.5
    assert torch_equal(time_grid(opts.num_points, opts.grid), PUBLISHED_GRIDS[20])
    assert str(opts.state_dtype) == "torch.bfloat16" and str(seen["vae_dtype"]) == "torch.bfloat16"
    assert opts.guidance == 1.5
    # the context: 4 pairs drawn as the published sampler draws them (random.seed(seed); random.choices, k=4)
    random.seed(5)
    drawn = random.choices(find_pairs(task), k=4)
    assert len(seen["pairs"]) == 4
    for (_, a, b), (x, y) in zip(drawn, seen["pairs"], strict=True):
        assert np.array_equal(x[:, 0].numpy(), load_image(a, 32).numpy())
        assert np.array_equal(y[:, 0].numpy(), load_image(b, 32).numpy())
    assert len(find_pairs(task)) < 4  # so the draw must have repeated a pair (with replacement)


def torch_equal(grid, values) -> bool:
    return grid.tolist() == list(values)


def test_truncation_differs_from_rounding():
    import torch

    from lavin_fast.flow.batch import to_uint8_truncated
    from lavin_fast.media import to_uint8

    x = torch.full((3, 1, 1), 0.999 * 2 / 255 - 1)  # 0.999 levels above black: truncates to 0, rounds to 1
    assert to_uint8_truncated(x).max() == 0 and to_uint8(x).max() == 1


@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("--guidance", "nan", "--guidance: expected a finite number in [-100, 100]"),
        ("--guidance", "inf", "--guidance: expected a finite number in [-100, 100]"),
        ("--num-pairs", "0", "--num-pairs: expected an integer in [1, 64]"),
        ("--batch", "0", "--batch: expected 1 to 4096"),
        ("--batch", "many", "--batch: expected a positive integer or 'auto'"),
        ("--grid-points", "1", "--grid-points/--nfe: expected an integer in [2, 1000]"),
    ],
)
def test_sample_argument_errors_before_any_work(tmp_path, capsys, flag, value, words):
    # the model files do not exist: the argument is refused before anything is read
    argv = ["sample", "--dit", str(tmp_path / "none.safetensors"), "--vae", str(tmp_path / "none.pt")]
    argv += ["--task-dir", str(tmp_path), "--query", str(tmp_path / "q.png"), flag, value]
    try:
        rc = main(argv)
    except SystemExit as exc:  # the bounded arguments stop the parser itself
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and "does not exist" not in err


def test_auto_batch_fills_eighty_percent_of_free_memory():
    from lavin_fast.flow.batch import auto_batch

    gib = 2**30
    assert auto_batch(peak_bytes_one=12 * gib, base_bytes=10 * gib, free_bytes=100 * gib) == 40
    assert auto_batch(peak_bytes_one=12 * gib, base_bytes=10 * gib, free_bytes=1 * gib) == 1
    assert auto_batch(peak_bytes_one=10 * gib + 1, base_bytes=10 * gib, free_bytes=100 * gib) == 64  # capped
