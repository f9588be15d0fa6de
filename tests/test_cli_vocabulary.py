"""One CLI vocabulary: kebab-case flags, `--device auto|cpu|cuda`, subcommands, did-you-mean, and the deprecated
spellings (each parses to the same namespace as its new spelling and prints a note naming it). Parsing only."""

from __future__ import annotations

import logging

import pytest

from lavin_fast.cli import package_logging, parse_args

# (deprecated command line, the same in the new vocabulary, old spelling named in the note, new spelling)
DEPRECATED = [
    (["train", "--num_pairs", "3"], ["train", "--num-pairs", "3"], "--num_pairs", "--num-pairs"),
    (["train", "--micro_batch_size=4"], ["train", "--micro-batch-size=4"], "--micro_batch_size", "--micro-batch-size"),
    (["train", "--grad_checkpointing"], ["train", "--grad-checkpointing"], "--grad_checkpointing", "--grad-checkpointing"),
    (["train", "--resume", "false", "--out_dir", "r"], ["train", "--resume", "false", "--out-dir", "r"], "--out_dir", "--out-dir"),
    (["train", "--device", "gpu"], ["train", "--device", "cuda"], "--device gpu", "--device cuda"),
    (["sample", "--dit", "d", "--vae", "v", "--steps", "30"], ["sample", "--dit", "d", "--vae", "v", "--grid-points", "30"], "--steps", "--grid-points"),
    (["sample", "--dit", "d", "--vae", "v", "--device=gpu"], ["sample", "--dit", "d", "--vae", "v", "--device=cuda"], "--device gpu", "--device cuda"),
    (["demo", "--sample-steps", "30"], ["demo", "--grid-points", "30"], "--sample-steps", "--grid-points"),
    (["data", "--check", "demo", "--n-pairs", "1"], ["data", "check", "demo", "--num-pairs", "1"], "data --check demo", "data check demo"),
    (["data", "check", "demo", "--n-pairs", "2"], ["data", "check", "demo", "--num-pairs", "2"], "--n-pairs", "--num-pairs"),
    (["data", "--backend", "torch", "--preview=demo", "--out", "g.png"], ["data", "demo", "demo", "--backend", "torch", "--out", "g.png"], "data --preview demo", "data demo demo"),
    (["data", "--bench", "--quick"], ["data", "bench", "--quick"], "data --bench", "data bench"),
    (["data", "bench", "--device", "gpu"], ["data", "bench", "--device", "cuda"], "--device gpu", "--device cuda"),
    (["eval", "deraining", "--pred", "p", "--gt", "g"], ["eval", "score", "deraining", "--pred", "p", "--gt", "g"], "eval deraining", "eval score deraining"),
    (["eval", "--make-set", "deraining", "--images", "i", "--out", "o"], ["eval", "make-set", "deraining", "--images", "i", "--out", "o"], "eval --make-set deraining", "eval make-set deraining"),
]  # fmt: skip


@pytest.mark.parametrize(("old", "new", "old_name", "new_name"), DEPRECATED, ids=[" ".join(d[0]) for d in DEPRECATED])
def test_deprecated_spelling_parses_like_the_new_one_with_a_note(old, new, old_name, new_name, capsys):
    expected = vars(parse_args(new))
    assert "deprecated" not in capsys.readouterr().err  # the new spelling is quiet
    assert vars(parse_args(old)) == expected
    err = capsys.readouterr().err
    assert "is deprecated, use" in err and old_name in err and new_name in err, err


def test_new_spellings():
    train = parse_args(["train", "cfg.yaml", "--num-pairs", "3", "--micro-batch-size", "2", "--device", "cpu"])
    assert (train.cfg_num_pairs, train.cfg_micro_batch_size, train.cfg_device) == ("3", "2", "cpu")
    assert parse_args(["sample", "--dit", "d", "--vae", "v", "--nfe", "30"]).grid_points == 30
    assert parse_args(["sample", "--dit", "d", "--vae", "v"]).grid_points == 20
    assert parse_args(["demo", "--steps", "5", "--grid-points", "30"]).steps == 5
    for argv in (["sample", "--dit", "d", "--vae", "v"], ["demo"], ["eval", "score", "inpainting"]):
        assert parse_args(argv).device == "auto"
    assert parse_args(["eval", "score", "inpainting", "--device", "cuda:1"]).device == "cuda:1"
    assert parse_args(["data", "bench"]).device == "cpu"  # DALI's CPU pipeline unless asked
    cache = parse_args(["data", "build-cache", "demo", "--vae", "v.pt", "--out", "c", "--tasks", "a", "b"])
    assert (cache.data_command, cache.sources, cache.tasks, cache.resolution) == ("build-cache", ["demo"], ["a", "b"], 256)
    assert parse_args(["data", "demo"]).source == "demo"
    make = parse_args(["eval", "make-set", "deraining", "--images", "i", "--out", "o"])
    assert (make.eval_command, make.task) == ("make-set", "deraining")


@pytest.mark.parametrize(
    ("argv", "usage", "hint"),
    [
        (["train", "--stepz", "3"], "usage: lavin-fast train", "--stepz: did you mean --steps?"),
        (["train", "--num_pairz", "3"], "usage: lavin-fast train", "did you mean --num-pairs?"),
        (["sample", "--dit", "d", "--vae", "v", "--stepz", "3"], "usage: lavin-fast sample", "did you mean --grid-points?"),
        (["data", "check", "demo", "--seedd", "1"], "usage: lavin-fast data check", "did you mean --seed?"),
        (["eval", "score", "deraining", "--gtt", "g"], "usage: lavin-fast eval score", "did you mean --gt?"),
        (["trian"], "usage: lavin-fast [", "did you mean 'train'?"),
        (["data", "bech"], "usage: lavin-fast data [", "did you mean 'bench'?"),
        (["eval", "score", "derainin"], "usage: lavin-fast eval score", "did you mean 'deraining'?"),
        (["train", "--device", "tpu"], "usage: lavin-fast train", "expected auto, cpu or cuda"),
    ],
)  # fmt: skip
def test_bad_command_lines_get_their_usage_and_a_close_match(argv, usage, hint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert usage in err and hint in err, err


def test_quiet_and_verbose_before_or_after_the_command():
    assert parse_args(["train"]).log_level == logging.INFO
    assert parse_args(["--quiet", "train"]).log_level == logging.WARNING
    assert parse_args(["train", "--quiet"]).log_level == logging.WARNING
    assert parse_args(["data", "check", "demo", "--verbose"]).log_level == logging.DEBUG
    assert parse_args(["--verbose", "eval", "make-set", "deraining"]).log_level == logging.DEBUG
    with pytest.raises(SystemExit):
        parse_args(["--quiet", "--verbose", "train"])


def test_package_logging_level_format_and_restore(capsys):
    log = logging.getLogger("lavin_fast.some.module")
    before = logging.getLogger("lavin_fast").level
    with package_logging(logging.INFO):
        log.info("plain %d", 1)
        log.debug("hidden")
        log.warning("careful")
    err = capsys.readouterr().err
    assert "plain 1\n" in err and "warning: careful" in err and "hidden" not in err
    with package_logging(logging.WARNING):
        log.info("hidden")
        log.error("bad")
    err = capsys.readouterr().err
    assert "hidden" not in err and "error: bad" in err
    with package_logging(logging.DEBUG):
        log.debug("shown")
    assert "lavin_fast.some.module DEBUG: shown" in capsys.readouterr().err
    assert logging.getLogger("lavin_fast").level == before and not logging.getLogger("lavin_fast").handlers
