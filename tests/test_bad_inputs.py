"""A corpus of bad inputs over every subcommand: each must end in one line `lavin-fast ...: error: ...` (or
argparse's usage + error) with exit code 2; never a traceback, a crash or a silent exit 0. The commands run
in-process through `lavin_fast.cli.main.main(argv)`, on files of a few KiB, so the corpus stays fast.

Here: the schema walk (every bound of every numeric flag and config field tried at +-1), sample, model files with
one fault each, train, data, eval, demo, DCP's BaseException, two runs on one folder. tests/test_bad_input_files.py
holds the decoders' header bombs and non-UTF-8 names, the crafted `.metadata` corpus, `checkpoints/latest`, text
files and entries a file must hold.
"""

from __future__ import annotations

import argparse
import os
import pathlib

import numpy as np
import pytest
import torch
from bad_input_helpers import (
    CORPUS,
    DIT_FAULTS,
    _write_dit,
    avi_bomb,
    make_files,
    refused,
    sample_argv,
)

from lavin_fast.cli.args import BOUNDS, CONFIG_BOUNDS, Bounded, check_config_bounds
from lavin_fast.cli.main import COMMANDS, build_parser, main


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Small valid inputs (a task folder, a query, tiny J-DiT and ST-VAE files, a clip) and unreadable ones."""
    return make_files(tmp_path_factory.mktemp("bad_inputs"))


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

    walk(build_parser(full=True), [])
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
        "data build-shards": ["demo", "--out", "o"],
        "plan": ["3.4B"],
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

    walk(build_parser(full=True), [])
    assert not loose, f"numeric flags outside the schema: {loose}"
    assert len(BOUNDED) >= 30 and set(BOUNDS.values()) >= {b for _, _, b, _ in BOUNDED}


@pytest.mark.parametrize("where, flag, bound, path", BOUNDED, ids=[f"{w} {f}" for w, f, _, _ in BOUNDED])
def test_schema_walk_each_bound_plus_minus_one(where, flag, bound, path, capsys):
    parser = build_parser(full=True)
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


# ------------------------------------------------------------------ the corpus' size (runs last in this file)
def test_zz_corpus_size():
    if len(CORPUS) < 150:
        pytest.skip(f"only {len(CORPUS)} bad inputs ran (a subset of the file was selected)")
    print(f"\n{len(CORPUS)} bad inputs refused (commands: rc 2 and one line; library calls: a named error)")
    assert len(CORPUS) >= 150
    assert set(COMMANDS) - {"kernels", "info"} <= {c.split()[0] for c in CORPUS if c.split()[0] in COMMANDS}
