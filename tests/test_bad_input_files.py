"""Bad files, by mechanism: a header bomb per decoder and file names that are not UTF-8 (the one decode path of
lavin_fast/media.py), a crafted `.metadata` corpus (one per opcode family and one per storage side door) and
`checkpoints/latest` pointing out of its folder, text files that are not UTF-8, the pre-flight's figures, and
entries a file must hold (named errors, not bare KeyErrors). Counted in the corpus of tests/test_bad_inputs.py.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import pickle

import numpy as np
import pytest
import torch
from bad_input_helpers import (
    BOMBS,
    CORPUS,
    NOT_UTF8,
    avi_bomb,
    make_files,
    png_bytes,
    refused,
    run_cli,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Small valid inputs (a task folder, a query, tiny J-DiT and ST-VAE files, a clip) and unreadable ones."""
    return make_files(tmp_path_factory.mktemp("bad_inputs"))


# ------------------------------------------------------------------ 2. the decoders: header bombs, names
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
