"""The first ten minutes of a new user (issue 30): on the core install (no optional extra), `--help` of the command
and of every subcommand works without importing torch, the DALI-less paths choose the torch decoders, `train
tiny-cpu` runs on computed demo data, and the packaging conventions (py.typed, __all__, setup.py, bounds) hold."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import pytest

from lavin_fast.cli.main import COMMANDS

ROOT = pathlib.Path(__file__).resolve().parents[1]
# what the core install lacks: every optional package of the extras (importing one raises ImportError)
NOT_IN_CORE = ("cv2", "skimage", "albumentations", "matplotlib", "nvidia", "tensorboard", "lpips", "pytorch_fid",
               "torchvision", "cupy", "scipy")  # fmt: skip


def _core(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where the optional packages cannot be imported (the core install)."""
    prelude = f"import sys\nfor _m in {NOT_IN_CORE!r}:\n    sys.modules[_m] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


_HELP = """
    from lavin_fast.cli.main import main
    try:
        rc = main({argv!r})
    except SystemExit as exc:
        rc = exc.code
    heavy = sorted(m for m in ("torch", "triton", "numpy") if m in sys.modules)
    print("RESULT", rc, ",".join(heavy), file=sys.stderr)
"""


def _help(argv: list[str]) -> tuple[int, list[str], str]:
    proc = _core(_HELP.format(argv=argv))
    line = [x for x in proc.stderr.splitlines() if x.startswith("RESULT")]
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    _, rc, heavy = (line[-1].split(" ") + [""])[:3]
    return int(rc or 0), [h for h in heavy.split(",") if h], proc.stdout


@pytest.mark.parametrize("argv", [["--help"], []], ids=["help", "bare"])
def test_top_level_help_on_the_core_install_imports_no_subcommand(argv):
    rc, heavy, out = _help(argv)
    assert rc == 0 and heavy == [], (rc, heavy)
    for name in COMMANDS:
        assert name in out


# `kernels` reads its --gpu choices from lavin_fast.perf.sass_model, which imports lavin_fast.ops (torch, triton)
LIGHT_HELP = [c for c in COMMANDS if c != "kernels"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_help_works_on_the_core_install(command):
    rc, heavy, out = _help([command, "--help"])
    assert rc == 0 and f"usage: lavin-fast {command}" in out, out[-2000:]
    if command in LIGHT_HELP:
        assert "torch" not in heavy and "triton" not in heavy, heavy


@pytest.mark.parametrize("argv", [["data", "bench", "--help"], ["eval", "score", "--help"], ["data", "demo", "--help"]])
def test_nested_help_imports_no_torch(argv):
    rc, heavy, out = _help(argv)
    assert rc == 0 and "usage:" in out and "torch" not in heavy, (rc, heavy)


def test_python_dash_m_lavin_fast():
    proc = subprocess.run([sys.executable, "-m", "lavin_fast", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "usage: lavin-fast" in proc.stdout, proc.stderr


def test_eval_task_names_come_from_the_light_module():
    from lavin_fast.eval import task_specs, tasks

    assert tasks.TASKS is task_specs.TASKS and len(task_specs.TASKS) == 10
