"""Shared by tests/test_bad_inputs.py and tests/test_bad_input_files.py: the corpus counter, the one-line check
of a refused command, and the crafted files (header bombs, model files with one fault each, a task folder).
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import struct
import zlib

import numpy as np
import torch
from PIL import Image

from lavin_fast.cli.main import main

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


def make_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Small valid inputs (a task folder, a query, tiny J-DiT and ST-VAE files, a clip) and bad ones."""
    from lavin_fast.media import write_clip
    from lavin_fast.models.checkpoints import save_dit, save_vae
    from lavin_fast.models.dit import JDiT
    from lavin_fast.models.dit_configs import get_config
    from lavin_fast.models.vae import build_vae

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


# ------------------------------------------------------------------ model files with one fault each
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
