"""The 0.2 package map: moved modules keep their old import paths for one release (the same module object, with a
DeprecationWarning), `python -m lavin_fast` is the command line, and folder scans share one suffix list."""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys
import warnings

import pytest

from lavin_fast import _moved

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_old_path_is_the_new_module_and_warns(old):
    new = importlib.import_module(_moved.MOVED[old])
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mod = importlib.import_module(old)
    assert mod is new  # one module object: state and monkeypatching are shared
    assert mod.__spec__.name == _moved.MOVED[old]  # the real module keeps its own name
    assert any(issubclass(w.category, DeprecationWarning) and _moved.MOVED[old] in str(w.message) for w in seen)


def test_old_paths_are_no_files_any_more():
    for old in _moved.MOVED:
        rel = pathlib.Path(*old.split("."))
        assert not (ROOT / rel.with_suffix(".py")).exists() and not (ROOT / rel / "__init__.py").exists(), old


def test_python_dash_m_lavin_fast():
    out = subprocess.run([sys.executable, "-m", "lavin_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "COMMAND" in out.stdout and "train" in out.stdout


def test_one_suffix_list():
    from lavin_fast import media
    from lavin_fast.data.incontext import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

    assert IMAGE_EXTENSIONS is media.IMAGE_SUFFIXES and VIDEO_EXTENSIONS is media.VIDEO_SUFFIXES
    # no other tuple of image suffixes is spelled out in the package
    for path in (ROOT / "lavin_fast").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Tuple) and path.name != "media.py":
                values = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                assert not {".png", ".jpg"} <= values, f"{path}: a second image-suffix list"
