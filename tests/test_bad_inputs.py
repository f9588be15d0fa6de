"""A corpus of bad inputs over every subcommand: each must end in one line `lavin-fast ...: error: ...` (or
argparse's usage + error) with exit code 2; never a traceback, a crash or a silent exit 0. The commands run
in-process through `lavin_fast.cli.main.main(argv)`, on files of a few KiB, so the corpus stays fast.

Also: the schema walk (every bound of every numeric flag and config field tried at +-1), a header bomb per decoder
and file names that are not UTF-8, a crafted `.metadata` corpus (one per opcode family and one per storage side
door), `checkpoints/latest` pointing out of its folder, two runs on one folder, tensor validation, and the memory
pre-flight.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lavin_fast.cli.args import BOUNDS, CONFIG_BOUNDS, Bounded, check_config_bounds
from lavin_fast.cli.main import COMMANDS, build_parser, main

CORPUS: list[str] = []  # one entry per bad input tried (the count is checked at the end)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors (usage + one line)
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.err


def refused(argv: list[str], capsys, *words: str) -> str:
    """Run a bad command line: rc 2, no traceback, an `error:` line holding every word."""
    CORPUS.append(" ".join(map(str, argv)))
    rc, err = run_cli(argv, capsys)
    assert rc == 2, f"{argv}: rc {rc}\n{err[-2000:]}"
    assert "Traceback" not in err, f"{argv}:\n{err}"
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert lines, f"{argv}: no error line in\n{err}"
    for w in words:
        assert w in err, f"{argv}: {w!r} not in\n{err}"
    return err


NOT_UTF8 = os.fsdecode(b"bad\xff\xfename")  # a file name that is valid bytes but not UTF-8 (surrogate-escaped)


# ------------------------------------------------------------------ files
def png_bytes(w: int = 32, h: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(w: int, h: int) -> bytes:
    """A valid PNG signature and IHDR declaring w x h, with one tiny IDAT: a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def jpeg_bomb(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="JPEG")
    d = bytearray(buf.getvalue())
    k = d.find(b"\xff\xc0")
    struct.pack_into(">HH", d, k + 5, h, w)
    return bytes(d)


def bmp_bomb(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="BMP")
    d = bytearray(buf.getvalue())
    struct.pack_into("<ii", d, 18, w, h)
    return bytes(d)


def npy_bomb(shape: tuple[int, ...]) -> bytes:
    """A .npy header declaring `shape` uint8 with no data after it."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue()


HDR_AS_PNG = b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 30000 +X 30000\n" + b"\x02\x02\x75\x30" * 4


def avi_bomb(path: pathlib.Path, side: int = 9000) -> pathlib.Path:
    """An MJPEG .avi whose headers and JPEG frames declare side x side (the data is a 32 x 32 clip's)."""
    from lavin_fast.media import write_clip

    write_clip(np.zeros((3, 32, 32, 3), np.uint8), path)
    d = bytearray(path.read_bytes())
    i = d.find(b"avih")
    struct.pack_into("<II", d, i + 8 + 4 * 8, side, side)
    j = d.find(b"strf")
    struct.pack_into("<ii", d, j + 8 + 4, side, side)
    k = 0
    while (k := d.find(b"\xff\xc0", k + 1)) >= 0:
        struct.pack_into(">HH", d, k + 5, side, side)
    path.write_bytes(bytes(d))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Small valid inputs (a task folder, a query, tiny J-DiT and ST-VAE files, a clip) and bad ones."""
    from lavin_fast.media import write_clip
    from lavin_fast.models.checkpoints import save_dit, save_vae
    from lavin_fast.models.dit import JDiT
    from lavin_fast.models.dit_configs import get_config
    from lavin_fast.models.vae import build_vae

    root = tmp_path_factory.mktemp("bad_inputs")
    task = root / "task"
    task.mkdir()
    for i in range(2):
        (task / f"ex{i}_input.png").write_bytes(png_bytes(seed=2 * i))
        (task / f"ex{i}_target.png").write_bytes(png_bytes(seed=2 * i + 1))
    (root / "q.png").write_bytes(png_bytes(seed=9))
    torch.manual_seed(0)
    dit = JDiT(get_config("tiny"))
    save_dit(dit, root / "dit.safetensors")
    vae = build_vae(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    save_vae(vae, root / "vae.safetensors")
    write_clip(np.random.default_rng(0).integers(0, 255, (16, 32, 32, 3), dtype=np.uint8), root / "clip.avi")
    unreadable = root / "unreadable"
    unreadable.mkdir()
    for i in range(3):
        (unreadable / f"u{i}.png").write_bytes(b"not an image at all" * 3)
    return {"root": root, "task": task, "q": root / "q.png", "dit": root / "dit.safetensors",
            "vae": root / "vae.safetensors", "clip": root / "clip.avi", "unreadable": unreadable}  # fmt: skip


def sample_argv(files, *extra) -> list:
    return ["sample", "--dit", files["dit"], "--vae", files["vae"], "--task-dir", files["task"], "--query",
            files["q"], "--grid-points", "2", "--grid", "uniform", "--device", "cpu", *extra]  # fmt: skip


# ------------------------------------------------------------------ 1. the schema walk
def _bounded_actions() -> list[tuple[str, str, Bounded, list[str]]]:
    """(command path, flag, bound, argv prefix) of every Bounded flag of every (sub)command."""
    out = []

    def walk(parser: argparse.ArgumentParser, path: list[str]):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif isinstance(action.type, Bounded) and action.option_strings:
                out.append((" ".join(path), action.option_strings[0], action.type, path))

    walk(build_parser(), [])
    return out


BOUNDED = _bounded_actions()


def _prefix(path: list[str]) -> list[str]:
    """The required arguments a command needs so that only the flag under test can fail parsing."""
    need = {
        "sample": ["--dit", "x", "--vae", "y"],
        "data build-cache": ["demo", "--vae", "v", "--out", "o"],
        "eval score": ["depth_estimation"],
        "eval make-set": ["deraining"],
        "data check": ["demo"],
    }
    return path + need.get(" ".join(path), [])


def _step(b: Bounded, x: float) -> float:
    """1, or (for a float bound so large that x + 1 == x) the smallest step that changes it."""
    return 1 if b.kind is int or x + 1 != x else abs(x) * 1e-6


def _outside(b: Bounded) -> list:
    out = []
    if b.lo is not None:
        out.append(b.kind(b.lo - _step(b, b.lo)))
    if b.hi is not None:
        out.append(b.kind(b.hi + _step(b, b.hi)))
    return out


def _off_bounds(b: Bounded) -> list[str]:
    bad = [str(v) for v in _outside(b)] + ([str(b.lo)] if b.lo_open else [])
    return bad + ["nan", "inf", "abc", ""] + (["1.5"] if b.kind is int else [])


def test_every_numeric_flag_is_bounded():
    # every int/float flag of every command takes its type from the one schema
    loose = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif action.type in (int, float):
                loose.append(f"{' '.join(path)} {action.option_strings}")

    walk(build_parser(), [])
    assert not loose, f"numeric flags outside the schema: {loose}"
    assert len(BOUNDED) >= 30 and set(BOUNDS.values()) >= {b for _, _, b, _ in BOUNDED}


@pytest.mark.parametrize("where, flag, bound, path", BOUNDED, ids=[f"{w} {f}" for w, f, _, _ in BOUNDED])
def test_schema_walk_each_bound_plus_minus_one(where, flag, bound, path, capsys):
    parser = build_parser()
    for value in _off_bounds(bound):
        err = refused(_prefix(path) + [flag, value], capsys, flag)
        assert "expected" in err
    for value in (bound.lo if not bound.lo_open else None, bound.hi):  # the bounds themselves parse
        if value is not None:
            text = str(int(value)) if bound.kind is int else str(float(value))
            ns = parser.parse_args(_prefix(path) + [flag, text])
            assert getattr(ns, _dest(parser, path, flag)) == bound.kind(text)


def _dest(parser, path, flag) -> str:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser._option_string_actions[flag].dest


@pytest.mark.parametrize("field", sorted(CONFIG_BOUNDS))
def test_config_schema_walk_each_bound_plus_minus_one(field, capsys):
    from lavin_fast.train.config import TrainConfig

    b = CONFIG_BOUNDS[field]
    flag = "--" + field.replace("_", "-")
    for value in _outside(b):  # through the command line: refused before anything is built
        refused(["train", flag, str(value), "--out-dir", "/nonexistent/never-written"], capsys, field)
    for value in (b.lo, b.hi):  # the bounds themselves pass the schema
        if value is not None and not (b.lo_open and value == b.lo):
            check_config_bounds(TrainConfig(**{field: b.kind(value)}))
    if b.lo_open:
        with pytest.raises(ValueError, match=field):
            check_config_bounds(TrainConfig(**{field: b.kind(b.lo)}))


# ------------------------------------------------------------------ 2. the decoders: header bombs, names
BOMBS = {
    "png": ("bomb.png", png_bomb(20000, 20000)),
    "png-just-over": ("over.png", png_bomb(8193, 8192)),
    "jpeg": ("bomb.jpg", jpeg_bomb(30000, 30000)),
    "bmp": ("bomb.bmp", bmp_bomb(12000, 12000)),
    "hdr-named-png": ("hdr.png", HDR_AS_PNG),
    "npy": ("bomb.npy", npy_bomb((100000, 100000, 3))),
    "npy-truncated": ("short.npy", npy_bomb((64, 64, 3)) + b"\0" * 100),
    "npy-object": ("obj.npy", None),
}


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_header_bomb_per_decoder_is_refused_before_decoding(kind, tmp_path):
    from lavin_fast.media import MediaError, read_image_array

    name, data = BOMBS[kind]
    p = tmp_path / name
    if data is None:
        np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        p.write_bytes(data)
    CORPUS.append(f"read_image_array {kind}")
    with pytest.raises(MediaError):
        read_image_array(p)


def test_header_bomb_png_jpeg_through_open_image(tmp_path):
    from lavin_fast.media import MediaError, load_image

    for kind in ("png", "jpeg", "bmp"):
        name, data = BOMBS[kind]
        (tmp_path / name).write_bytes(data)
        CORPUS.append(f"load_image {kind}")
        with pytest.raises(MediaError, match="pixels|limit|decompression bomb|exceeds"):
            load_image(tmp_path / name)


def test_header_bomb_clip(tmp_path):
    from lavin_fast.media import MediaError, read_clip_frames

    bomb = avi_bomb(tmp_path / "bomb.avi")
    CORPUS.append("read_clip_frames avi bomb")
    with pytest.raises(MediaError, match="over the limit|no frame size|no readable frames"):
        read_clip_frames(bomb)


def test_clip_reads_are_frame_bounded(files):
    from lavin_fast.media import MediaError, read_clip_frames

    assert read_clip_frames(files["clip"], 10, 3).shape[0] == 3
    CORPUS.append("read_clip_frames over max_frames")
    with pytest.raises(MediaError, match="over the limit"):
        read_clip_frames(files["clip"], max_frames=8)


def test_non_utf8_names_never_reach_opencv_as_str(files, tmp_path):
    """cv2.imread / cv2.VideoCapture crashed the process (SIGSEGV) on a file name that is not UTF-8."""
    import shutil

    from lavin_fast.media import clip_info, read_clip_frames, read_image_array

    clip = tmp_path / (NOT_UTF8 + ".avi")
    shutil.copy(files["clip"], clip)
    image = tmp_path / (NOT_UTF8 + ".png")
    image.write_bytes(png_bytes())
    CORPUS.extend(["non-utf8 clip_info", "non-utf8 read_clip_frames", "non-utf8 read_image_array"])
    assert clip_info(clip) == (16, 32, 32)
    assert read_clip_frames(clip, 0, 2).shape == (2, 32, 32, 3)
    assert read_image_array(image).shape == (32, 32, 3)


def test_non_utf8_names_through_the_commands(files, tmp_path, capsys):
    import shutil

    folder = tmp_path / "clips"
    folder.mkdir()
    shutil.copy(files["clip"], folder / (NOT_UTF8 + ".avi"))
    # sample --video with such a name: decodes (no crash), then stops on something else or succeeds
    CORPUS.append("sample --video non-utf8")
    rc, err = run_cli(["sample", "--dit", files["dit"], "--vae", files["vae"], "--video", folder / (NOT_UTF8 + ".avi"),
                       "--grid-points", "2", "--grid", "uniform", "--out", tmp_path / "o.avi"], capsys)  # fmt: skip
    assert rc in (0, 2) and "Traceback" not in err
    pred = tmp_path / "pred"
    pred.mkdir()
    gt = tmp_path / "gt"
    gt.mkdir()
    (pred / (NOT_UTF8 + ".png")).write_bytes(png_bytes())
    (gt / (NOT_UTF8 + "_target.png")).write_bytes(png_bytes())
    CORPUS.append("eval score non-utf8")
    rc, err = run_cli(["eval", "score", "deraining", "--pred", pred, "--gt", gt, "--out", tmp_path / "e.json",
                       "--metrics", "mse", "--device", "cpu"], capsys)  # fmt: skip
    assert rc in (0, 2) and "Traceback" not in err
    images = tmp_path / "images"
    images.mkdir()
    (images / (NOT_UTF8 + ".png")).write_bytes(png_bytes())
    CORPUS.append("eval make-set non-utf8")
    rc, err = run_cli(["eval", "make-set", "deraining", "--images", images, "--out", tmp_path / "set"], capsys)
    assert rc == 0 and "Traceback" not in err, err


@pytest.mark.parametrize("kind", ["png", "jpeg", "bmp", "hdr-named-png", "npy"])
def test_bombs_through_eval_commands(kind, tmp_path, capsys):
    name, data = BOMBS[kind]
    pred, gt, images = tmp_path / "pred", tmp_path / "gt", tmp_path / "images"
    for d in (pred, gt, images):
        d.mkdir()
    stem, suffix = name.rsplit(".", 1)
    (pred / name).write_bytes(data)
    (gt / f"{stem}_target.{suffix}").write_bytes(data)
    refused(["eval", "score", "deraining", "--pred", pred, "--gt", gt, "--out", tmp_path / "e.json", "--metrics", "mse",
             "--device", "cpu"], capsys)  # fmt: skip
    if suffix != "npy":
        (images / name).write_bytes(data)
        refused(["eval", "make-set", "deraining", "--images", images, "--out", tmp_path / "set"], capsys)


# ------------------------------------------------------------------ 3. sample
def test_sample_bad_inputs(files, tmp_path, capsys):
    root = files["root"]
    garbage = root / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    empty = root / "empty.safetensors"
    empty.write_bytes(b"")
    txt = root / "queries.txt"
    txt.write_bytes(b"q.png\n\xff\xfe broken\n")
    cases = [
        (["--dit", root / "missing.safetensors"], "does not exist"),
        (["--dit", garbage], "safetensors"),
        (["--dit", empty], "empty"),
        (["--dit", root], "does not exist"),
        (["--vae", root / "missing.pt"], "does not exist"),
        (["--vae", garbage], ""),
        (["--task-dir", root / "nope"], "does not exist"),
        (["--task-dir", files["unreadable"]], ""),
        (["--query", root / "nope.png"], ""),
        (["--query", txt], "line 2"),
        (["--query", files["unreadable"] / "u0.png"], ""),
        (["--batch", "0"], "--batch"),
        (["--batch", "99999"], "--batch"),
        (["--batch", "lots"], "--batch"),
        (["--out", tmp_path], "is a folder"),
        (["--out", files["q"] / "x.png"], "is a file"),
        (["--out", tmp_path / ("x" * 300 + ".png")], "255 bytes"),
        (["--published"], "--published"),
        (["--video", files["clip"]], "either --task-dir"),
        (["--grid-points", "7", "--grid", "published"], ""),
        (["--max-memory", "0.000001"], "--max-memory"),
        (["--size", "8192", "--num-pairs", "64", "--max-memory", "1"], "at least"),
    ]
    for extra, word in cases:  # a flag given again overrides the base's
        refused(sample_argv(files) + extra, capsys, word)


def test_sample_video_bad_inputs(files, tmp_path, capsys):
    base = ["sample", "--dit", files["dit"], "--vae", files["vae"], "--grid-points", "2", "--grid", "uniform"]
    short = tmp_path / "short.avi"
    from lavin_fast.media import write_clip

    write_clip(np.zeros((4, 32, 32, 3), np.uint8), short)
    not_video = tmp_path / "not.avi"
    not_video.write_bytes(b"RIFF0000AVI LIST" + b"\0" * 64)
    for extra, word in [
        (["--video", short], "frames"),
        (["--video", not_video], "video"),
        (["--video", tmp_path / "none.avi"], "does not exist"),
        (["--video", files["clip"], "--clip-frames", "6"], "1 + 4k"),
        (["--video", files["clip"], "--clip-frames", "9"], "frames"),
        (["--video", avi_bomb(tmp_path / "bomb.avi")], ""),
        (["--video", files["clip"], "--out-dir", tmp_path / "o"], "--out-dir"),
    ]:
        refused(base + extra + ["--out", tmp_path / "o.avi"], capsys, word)


def _constant(*args, **kwargs):
    queries = args[3]
    return [torch.zeros_like(q) for q in queries]


def _nan(*args, **kwargs):
    return [torch.full_like(q, float("nan")) for q in args[3]]


@pytest.mark.parametrize("fake", [_constant, _nan], ids=["constant", "nan"])
def test_constant_or_nonfinite_prediction_is_an_error_not_a_png(fake, files, tmp_path, capsys, monkeypatch):
    import lavin_fast.flow.pipeline as pipeline

    monkeypatch.setattr(pipeline, "predict", fake)
    out = tmp_path / "grid.png"
    refused(sample_argv(files, "--out", out), capsys, "prediction")
    assert not out.exists()


def test_sample_out_dir_reports_what_it_wrote_without_progress(files, tmp_path, capsys):
    assert main([str(a) for a in sample_argv(files, "--out-dir", tmp_path / "preds", "--no-progress")]) == 0
    assert "rank 0: 1 prediction(s)" in capsys.readouterr().out  # it said 0 with the bar turned off
    assert sorted(p.name for p in (tmp_path / "preds").iterdir()) == ["q.png"]


# ------------------------------------------------------------------ 4. model files: tensors and metadata
def _write_dit(path, mutate=None, meta=None):
    from safetensors.torch import save_file

    from lavin_fast.models.dit import JDiT
    from lavin_fast.models.dit_configs import get_config

    m = JDiT(get_config("tiny"))
    sd = {k: v.detach().contiguous() for k, v in m.state_dict().items()}
    if mutate:
        mutate(sd)
    md = {"format": "lavin_fast.jdit", "config": json.dumps(m.cfg.to_dict())}
    md.update(meta or {})
    save_file(sd, str(path), metadata=md)
    return path


def _first(sd):
    return sorted(sd)[0]


DIT_FAULTS = {
    "nan": (lambda sd: sd[_first(sd)].view(-1).__setitem__(0, float("nan")), None, "NaN"),
    "inf": (lambda sd: sd[_first(sd)].view(-1).__setitem__(0, float("inf")), None, "NaN/Inf"),
    "int-tensor": (lambda sd: sd.__setitem__(_first(sd), sd[_first(sd)].to(torch.int32)), None, "int32"),
    "bool-tensor": (lambda sd: sd.__setitem__(_first(sd), sd[_first(sd)] > 0), None, "bool"),
    "config-list": (None, {"config": "[1, 2, 3]"}, "not a mapping"),
    "config-not-json": (None, {"config": "{oops"}, "JSON"),
    "config-unknown-field": (
        None,
        {"config": json.dumps({"hidden_size": 64, "depth": 2, "num_heads": 4, "colour": 1})},
        "J-DiT",
    ),  # fmt: skip
    "missing-tensor": (lambda sd: sd.pop(_first(sd)), None, "missing"),
    "wrong-shape": (lambda sd: sd.__setitem__(_first(sd), torch.zeros(3)), None, "shape"),
}


@pytest.mark.parametrize("fault", sorted(DIT_FAULTS))
def test_dit_file_faults_name_tensor_and_file(fault, files, tmp_path, capsys):
    mutate, meta, word = DIT_FAULTS[fault]
    path = _write_dit(tmp_path / f"{fault}.safetensors", mutate, meta)
    err = refused(_with(sample_argv(files), "--dit", path), capsys, word)
    assert str(path) in err or path.name in err


def _with(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


@pytest.mark.parametrize("fault", ["nan", "int-tensor", "config-list"])
def test_vae_file_faults_name_tensor_and_file(fault, files, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(files["vae"]), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    k = sorted(sd)[0]
    if fault == "nan":
        sd[k].view(-1)[0] = float("nan")
    elif fault == "int-tensor":
        sd[k] = sd[k].to(torch.int64)
    else:
        meta["config"] = "[]"
    path = tmp_path / f"vae_{fault}.safetensors"
    save_file(sd, str(path), metadata=meta)
    refused(_with(sample_argv(files), "--vae", path), capsys, path.name)


# ------------------------------------------------------------------ 5. train, data, eval, demo
def test_train_bad_inputs(files, tmp_path, capsys):
    base = ["train", "tiny-cpu", "--progress", "false", "--tensorboard", "false"]
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"steps: 2\n# caf\xe9\n")
    as_list = tmp_path / "list.yaml"
    as_list.write_text("- steps\n- 2\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("steps: [1,\n")
    out = tmp_path / "run"
    cases = [
        (["--out-dir", out, "--init-from", tmp_path], "is a folder"),
        (["--out-dir", out, "--init-from", tmp_path / "none.safetensors"], "does not exist"),
        (["--out-dir", out, "--init-from", files["unreadable"] / "u0.png"], ""),
        (["--out-dir", files["q"]], ""),
        (
            [
                "--out-dir",
                out,
                "--image-size",
                "8192",
                "--micro-batch-size",
                "4096",
                "--batch-size",
                "4096",
                "--num-pairs",
                "64",
            ],
            "at least",
        ),  # fmt: skip
        (["--out-dir", out, "--max-memory", "0.00001"], "--max-memory"),
        (["--out-dir", out, "--steps", "1e20"], "steps"),
        (["--out-dir", out, "--lr", "inf"], "lr"),
        (["--out-dir", out, "--betas", "[2, 3]"], "betas"),
    ]
    for extra, word in cases:
        refused(base + extra, capsys, word)
    for cfg, word in [(latin1, "line 2"), (as_list, "mapping"), (bad_yaml, "YAML"), (tmp_path / "none.yaml", "")]:
        refused(["train", cfg, "--out-dir", out], capsys, word)


def test_train_init_from_model_file_faults(files, tmp_path, capsys):
    for fault in ("nan", "config-list", "int-tensor"):
        mutate, meta, word = DIT_FAULTS[fault]
        path = _write_dit(tmp_path / f"{fault}.safetensors", mutate, meta)
        refused(["train", "tiny-cpu", "--out-dir", tmp_path / "r", "--init-from", path], capsys, word)


def _manifest(tmp_path, name: str, text: bytes) -> pathlib.Path:
    p = tmp_path / name
    p.write_bytes(text)
    return p


def test_data_bad_inputs(files, tmp_path, capsys):
    img = files["q"]
    manifests = {
        "latin1": (b'{"task": "deraining", "input": "a.png"}\n# caf\xe9\n', "line 2"),
        "task-int": (b'{"task": 5, "input": "x", "target": "y"}\n', "'task' is a int"),
        "input-int": (f'{{"task": "depth_estimation", "input": 3, "target": "{img}"}}\n'.encode(), "got a int"),
        "not-json": (b"{task: depth}\n", "not valid JSON"),
        "list": (b"[1, 2]\n", "JSON object"),
        "empty": (b"\n# nothing\n", "no entries"),
        "missing-file": (b'{"task": "depth_estimation", "input": "nope.png", "target": "nope2.png"}\n', "not found"),
        "unknown-task": (f'{{"task": "teleport", "input": "{img}", "target": "{img}"}}\n'.encode(), "unknown"),
    }
    for name, (text, word) in manifests.items():
        m = _manifest(tmp_path, f"{name}.jsonl", text)
        refused(["data", "check", m, "--backend", "torch"], capsys, word)
        refused(["data", "demo", m, "--backend", "torch", "--out", tmp_path / "d.png"], capsys, word)
    refused(["data", "check", tmp_path / "nope"], capsys)
    refused(["data", "check", files["unreadable"], "--backend", "torch", "--resolution", "32", "--batch-size", "1",
             "--num-pairs", "1"], capsys)  # fmt: skip
    refused(["data", "check", "demo", "--resolution", "8192", "--batch-size", "4096", "--num-pairs", "64"],
            capsys, "at least")  # fmt: skip
    refused(["data"], capsys, "subcommand")


def test_build_cache_bad_inputs(files, tmp_path, capsys):
    base = ["data", "build-cache", "--vae", files["vae"], "--resolution", "32", "--no-progress", "--device", "cpu"]
    # only unreadable files: an error, not rc 0 with an empty cache
    refused(base[:2] + [files["unreadable"]] + base[2:] + ["--out", tmp_path / "c1", "--tasks", "deraining"], capsys)
    refused(base[:2] + ["demo"] + base[2:] + ["--out", files["q"]], capsys)
    refused(base[:2] + ["demo"] + base[2:] + ["--out", tmp_path / "c2", "--encode-batch", "4096", "--resolution",
                                              "8192", "--max-memory", "1"], capsys, "at least")  # fmt: skip
    refused(["data", "build-cache", "demo", "--vae", tmp_path / "none.pt", "--out", tmp_path / "c3"], capsys)


def test_eval_bad_inputs(files, tmp_path, capsys):
    refused(["eval", "score", "depth_estimation", "--pred", tmp_path / "a", "--gt", tmp_path / "b"], capsys)
    refused(["eval", "score", "teleport"], capsys)
    refused(["eval"], capsys, "subcommand")
    refused(["eval", "make-set", "teleport", "--images", files["task"], "--out", tmp_path / "s"], capsys)
    refused(["eval", "make-set", "deraining", "--images", tmp_path / "none", "--out", tmp_path / "s"], capsys)
    refused(["eval", "make-set", "deraining", "--images", files["task"], "--out", files["q"]], capsys, "is a file")
    refused(["eval", "make-set", "deraining", "--images", files["unreadable"], "--out", tmp_path / "s2"], capsys)
    refused(["eval", "make-set", "deraining", "--images", files["task"], "--out", tmp_path / "s3", "--max-memory",
             "0.000001"], capsys, "--max-memory")  # fmt: skip
    refused(["eval", "make-set", "deraining", "--images", files["task"], "--count", "99", "--out", tmp_path / "s4"],
            capsys)  # fmt: skip


def test_demo_bad_inputs(tmp_path, capsys):
    refused(["demo", "--out", tmp_path / "d", "--image-size", "8192", "--max-memory", "1"], capsys, "at least")
    refused(["demo", "--out", tmp_path / "d", "--image-size", "40"], capsys, "16")
    refused(["demo", "--out", tmp_path / "d", "--tasks", "teleport", "deraining", "--steps", "1"], capsys)


def test_unknown_commands_and_flags(capsys):
    for argv in (["teleport"], ["sample", "--dit"], ["train", "--stepz", "3"], ["data", "chek", "demo"],
                 ["eval", "score"], ["kernels", "--gpu", "Z80"]):  # fmt: skip
        refused(argv, capsys)


# ------------------------------------------------------------------ 6. one error style: DCP's BaseException too
def test_base_exception_from_dcp_is_one_line(monkeypatch, capsys):
    from torch.distributed.checkpoint.api import CheckpointException

    import lavin_fast.cli.info as info

    def boom(args):
        raise CheckpointException("save failed", {0: (RuntimeError("disk"), None)})

    monkeypatch.setattr(info, "run", boom)
    refused(["info"], capsys, "rank 0: RuntimeError: disk")
    for exc in (KeyError("rng"), TypeError("bad"), MemoryError(), RuntimeError("x")):

        def raiser(args, exc=exc):
            raise exc

        monkeypatch.setattr(info, "run", raiser)
        refused(["info"], capsys)
    monkeypatch.setattr(info, "run", boom)
    with pytest.raises(CheckpointException):  # --debug: the real exception
        main(["info", "--debug"])


# ------------------------------------------------------------------ 7. the run lock
def test_second_run_on_one_folder_exits_2_naming_the_first(files, tmp_path, capsys):
    import socket

    from lavin_fast.runlock import RunLockError, run_lock

    out = tmp_path / "busy"
    with run_lock(out, "test") as lock:
        assert f"pid {os.getpid()}" in lock.read_text()
        with pytest.raises(RunLockError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            with run_lock(out, "second"):
                pass
        refused(["train", "tiny-cpu", "--out-dir", out, "--steps", "1"], capsys, f"pid {os.getpid()}")
        refused(sample_argv(files, "--out-dir", out), capsys, "in use by another run")
        refused(["data", "build-cache", "demo", "--vae", files["vae"], "--out", out, "--resolution", "32"], capsys,
                "in use by another run")  # fmt: skip
    with run_lock(out, "after"):  # released with its holder
        pass
    assert not any(out.iterdir())


# ------------------------------------------------------------------ 8. the .metadata unpickler and `latest`
@pytest.fixture(scope="module")
def dcp_dir(tmp_path_factory) -> pathlib.Path:
    import torch.distributed.checkpoint as dcp

    d = tmp_path_factory.mktemp("dcp") / "step_00000001"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(8.0), "b": torch.ones(3)}, checkpoint_id=str(d))
    return d


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _meta_with(dcp_dir, tmp_path, change, manifest: bool = True) -> pathlib.Path:
    """A copy of the checkpoint whose metadata's storage items are changed by `change(storage_data)`."""
    from lavin_fast.train.checkpoint_io import _sha256
    from lavin_fast.train.safe_state import read_dcp_metadata

    d = _copy(dcp_dir, tmp_path / "step_00000002")
    md = read_dcp_metadata(d)
    change(md.storage_data)
    (d / ".metadata").write_bytes(pickle.dumps(md))
    if manifest:
        files = {p.name: _sha256(p) for p in d.iterdir() if p.is_file()}
        (d / "CHECKSUMS.json").write_text(json.dumps({"files": files}))
    return d


def _set_path(rel):
    def change(storage):
        for info in storage.values():
            info.relative_path = rel

    return change


def _set_range(offset, length):
    def change(storage):
        info = next(iter(storage.values()))
        info.offset, info.length = offset, length

    return change


STORAGE_DOORS = {
    "absolute-path": _set_path("/dev/zero"),
    "dotdot-path": _set_path("../outside.distcp"),
    "nested-path": _set_path("sub/x.distcp"),
    "missing-file": _set_path("__9_0.distcp"),
    "length-past-end": _set_range(0, 6 << 30),
    "offset-past-end": _set_range(1 << 40, 8),
    "negative-offset": _set_range(-8, 8),
}


@pytest.mark.parametrize("door", sorted(STORAGE_DOORS))
def test_metadata_storage_side_doors(door, dcp_dir, tmp_path):
    from lavin_fast.train.safe_state import CheckpointError, read_dcp_metadata

    (tmp_path / "outside.distcp").write_bytes(b"\0" * 64)
    d = _meta_with(dcp_dir, tmp_path, STORAGE_DOORS[door])
    CORPUS.append(f".metadata {door}")
    with pytest.raises(CheckpointError):
        read_dcp_metadata(d)


def test_metadata_storage_not_covered_by_checksums(dcp_dir, tmp_path):
    from lavin_fast.train.safe_state import CheckpointError, read_dcp_metadata

    d = _meta_with(dcp_dir, tmp_path, lambda s: None, manifest=False)
    shard = next(p.name for p in d.iterdir() if p.suffix == ".distcp")
    (d / "CHECKSUMS.json").write_text(json.dumps({"files": {".metadata": "0"}}))
    CORPUS.append(".metadata uncovered shard")
    with pytest.raises(CheckpointError, match="does not cover"):
        read_dcp_metadata(d)
    (d / "CHECKSUMS.json").write_text(json.dumps({"files": {".metadata": "0", shard: "0"}}))
    read_dcp_metadata(d)  # covered: reads (the checksums themselves are checked by load_checkpoint)


def _opcodes_build_on_class() -> bytes:
    # pathlib.PosixPath, then BUILD with a state dict replacing __truediv__: no call, but a patched class
    return b"\x80\x04cpathlib\nPosixPath\n}\x8c\x0b__truediv__\x8c\x01x\x73b."


def _opcodes_build_on_function() -> bytes:
    return b"\x80\x04ctorch.serialization\n_get_layout\n}\x8c\x08__code__N\x73b."


def _opcodes_build_slotstate_on_class() -> bytes:
    # state (None, {"__truediv__": ...}): the slot-state form of BUILD
    return b"\x80\x04cpathlib\nPosixPath\nN}\x8c\x0b__truediv__\x8c\x01x\x73\x86b."


OPCODE_CORPUS = {
    "GLOBAL-REDUCE os.system": b"cos\nsystem\n(S'echo pwned'\ntR.",
    "STACK_GLOBAL builtins.eval": b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x041+1\x85R.",
    "INST subprocess": b"(S'ls'\nisubprocess\ncheck_output\n.",
    "OBJ builtins.exec": b"\x80\x02cbuiltins\nexec\n(S'x=1'\no.",
    "NEWOBJ collections.Counter": b"\x80\x02ccollections\nCounter\n)\x81.",
    "NEWOBJ_EX functools.partial": b"\x80\x04cfunctools\npartial\n)}\x92.",
    "EXT1 copyreg extension": b"\x80\x02\x82\x01.",
    "PERSID": b"P0\n.",
    "BINPERSID": b"\x80\x02K\x01Q.",
    "BUILD on a class": _opcodes_build_on_class(),
    "BUILD on a function": _opcodes_build_on_function(),
    "BUILD slot state on a class": _opcodes_build_slotstate_on_class(),
    "BUILD on a dict": b"\x80\x04}}\x8c\x01a\x8c\x01bsb.",
    "not a pickle": b"this is not a pickle",
    "truncated": b"\x80\x04\x95",
    "a plain dict": b"\x80\x04}.",
}


@pytest.mark.parametrize("name", sorted(OPCODE_CORPUS))
def test_metadata_opcode_corpus(name, tmp_path):
    import pathlib as pl

    from lavin_fast.train.safe_state import CheckpointError, read_dcp_metadata

    before = {c: dict(vars(c)) for c in (pl.PosixPath, pl.PurePosixPath, pl.Path, pl.PurePath)}
    d = tmp_path / "step_00000001"
    d.mkdir()
    (d / ".metadata").write_bytes(OPCODE_CORPUS[name])
    CORPUS.append(f".metadata {name}")
    with pytest.raises(CheckpointError):
        read_dcp_metadata(d)
    assert all(dict(vars(c)) == attrs for c, attrs in before.items()), "a class was patched"


def test_real_metadata_still_reads(dcp_dir):
    from lavin_fast.train.safe_state import read_dcp_metadata

    md = read_dcp_metadata(dcp_dir)
    assert set(md.state_dict_metadata) == {"w", "b"}


@pytest.mark.parametrize("pointer", ["/etc", "../other/step_00000001", "step_00000001/../../x", "", "\xff",
                                     "step_00000001.tmp", "checkpoints"])  # fmt: skip
def test_latest_must_name_a_step_folder_of_its_own_root(pointer, tmp_path):
    from lavin_fast.train.checkpoint_io import CheckpointError, latest_checkpoint

    root = tmp_path / "run" / "checkpoints"
    (root / "step_00000001").mkdir(parents=True)
    (tmp_path / "run" / "other" / "step_00000001").mkdir(parents=True)
    (root / "latest").write_bytes(pointer.encode("latin-1"))
    CORPUS.append(f"latest {pointer!r}")
    with pytest.raises(CheckpointError):
        latest_checkpoint(root)
    (root / "latest").write_text("step_00000001")
    assert latest_checkpoint(root) == root / "step_00000001"


# ------------------------------------------------------------------ 9. text files and the pre-flight helper
def test_text_files_name_file_line_and_encoding(tmp_path):
    from lavin_fast.textfiles import TextFileError, read_json, read_text

    p = tmp_path / "x.json"
    p.write_bytes(b'{\n "a": 1,\n "b": "\xe9"\n}')
    with pytest.raises(TextFileError, match=r"line 3, column 8: byte 0xe9 is not UTF-8"):
        read_text(p, "index")
    p.write_bytes(b'{\n "a": 1,\n}')
    with pytest.raises(TextFileError, match="line 3, column 1: not valid JSON"):
        read_json(p, "index")
    p.write_bytes(b"[1]")
    with pytest.raises(TextFileError, match="expected a JSON dict, got list"):
        read_json(p, "index")
    CORPUS.extend(["text latin1", "text bad json", "text json list"])


def test_memory_preflight_figures():
    from lavin_fast.preflight import GIB, MemoryPreflightError, check_memory

    assert check_memory({"a": GIB, "b": GIB}, "x", max_memory_gib=2.5) == 2 * GIB
    with pytest.raises(MemoryPreflightError, match=r"at least 3.00 GiB .* over --max-memory 2.5 GiB"):
        check_memory({"a": GIB, "b": 2 * GIB}, "x", max_memory_gib=2.5)
    with pytest.raises(MemoryPreflightError, match="of memory available"):
        check_memory({"a": 4 * GIB}, "x", available=GIB)


def test_sample_preflight_counts_images_from_headers(files):
    from lavin_fast.cli.sample import memory_parts

    ns = argparse.Namespace(dit=files["dit"], vae=files["vae"], task_dir=files["task"], video=None, num_pairs=64,
                            query=[files["q"]], clip_frames=5)  # fmt: skip
    parts = memory_parts(ns, None, 4)
    assert parts["example pairs"] == 2 * 2 * 3 * 32 * 32 * 4  # 2 pairs in the folder, 32 x 32 float32
    assert parts["weights"] == files["dit"].stat().st_size + files["vae"].stat().st_size
    big = memory_parts(ns, 8192, 4)
    assert big["example pairs"] == 2 * 2 * 3 * 8192 * 8192 * 4


# ------------------------------------------------------------------ 10. entries a file must hold: named, not a bare KeyError
def test_checkpoint_without_rng_state_is_named(tmp_path):
    from standin import StandInVelocity

    from lavin_fast.train.checkpoint_io import MANIFEST, CheckpointError, _sha256
    from lavin_fast.train.config import load_config
    from lavin_fast.train.safe_state import load_tree, save_tree
    from lavin_fast.train.sources import SyntheticLatentSource
    from lavin_fast.train.trainer import Trainer

    def trainer(steps):
        over = {"batch_size": 4, "micro_batch_size": 4, "tensorboard": False, "progress": False, "save_every": 2}
        cfg = load_config(None, {**over, "out_dir": str(tmp_path), "steps": steps})
        return Trainer(cfg, model_factory=lambda c, d: StandInVelocity(),
                       source_factory=lambda c, ctx: SyntheticLatentSource(micro_batch=4, num_samples=8))  # fmt: skip

    trainer(2).fit()
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    state = load_tree(ckpt / "trainer_rank0")
    del state["rng"]
    save_tree(ckpt / "trainer_rank0", state)
    doc = json.loads((ckpt / MANIFEST).read_text())
    doc["files"] = {name: _sha256(ckpt / name) for name in doc["files"]}
    (ckpt / MANIFEST).write_text(json.dumps(doc))
    CORPUS.append("checkpoint without rng")
    with pytest.raises(CheckpointError, match="'rng'"):  # it was a bare KeyError: 'rng'
        trainer(4)


def test_cache_index_without_pixel_frames_is_named(tmp_path):
    from lavin_fast.data.latent_cache import FORMAT_VERSION, LatentCacheLoader

    index = {"version": FORMAT_VERSION, "tasks": {"deraining": {"shards": [], "input_frames": 1, "target_frames": 1}}}
    (tmp_path / "index.json").write_text(json.dumps(index))
    CORPUS.append("cache index without pixel_frames")
    with pytest.raises(ValueError, match="lacks 'pixel_frames'"):  # it was a bare KeyError: 'pixel_frames'
        LatentCacheLoader(tmp_path)
    (tmp_path / "index.json").write_bytes(b'{"version": 1, \xff}')
    CORPUS.append("cache index not UTF-8")
    with pytest.raises(ValueError, match="line 1, column 16: byte 0xff"):
        LatentCacheLoader(tmp_path)


# ------------------------------------------------------------------ the corpus' size (runs last in this file)
def test_zz_corpus_size():
    if len(CORPUS) < 150:
        pytest.skip(f"only {len(CORPUS)} bad inputs ran (a subset of the file was selected)")
    print(f"\n{len(CORPUS)} bad inputs refused (commands: rc 2 and one line; library calls: a named error)")
    assert len(CORPUS) >= 150
    assert set(COMMANDS) - {"kernels", "info"} <= {c.split()[0] for c in CORPUS if c.split()[0] in COMMANDS}
