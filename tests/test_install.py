"""The first ten minutes of a new user (issue 30): on the core install (no optional extra), `--help` of the command
and of every subcommand works without importing torch, the DALI-less paths choose the torch decoders, `train
tiny-cpu` runs on computed demo data, and the packaging conventions (py.typed, __all__, setup.py, bounds) hold."""

from __future__ import annotations

import json
import os
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


def _core(code: str, timeout: float = 120, cache: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where the optional packages cannot be imported (the core install);
    `cache`: its LAVIN_FAST_CACHE (where the computed demo images go)."""
    prelude = f"import sys\nfor _m in {NOT_IN_CORE!r}:\n    sys.modules[_m] = None\n"
    env = os.environ | ({"LAVIN_FAST_CACHE": str(cache)} if cache else {})
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)  # fmt: skip


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


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_help_works_on_the_core_install(command):
    rc, heavy, out = _help([command, "--help"])
    assert rc == 0 and f"usage: lavin-fast {command}" in out, out[-2000:]
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


# ----------------------------------------------------------------------------------------------
# DALI optional: `auto` takes the torch decoders without it, saying so once; `data bench` measures PIL alone.
# ----------------------------------------------------------------------------------------------
def _photos(folder: pathlib.Path, n: int = 4) -> pathlib.Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_auto_backend_is_torch_without_dali(tmp_path, monkeypatch, caplog):
    from lavin_fast.data.incontext import build_incontext_loader
    from lavin_fast.data.incontext import loader as loader_mod

    why = "nvidia.dali is not importable (ModuleNotFoundError: x); it comes with `pip install 'lavin-fast[dali-cu13]'`"
    monkeypatch.setattr(loader_mod, "dali_available", lambda: (False, why))
    folder = _photos(tmp_path / "photos")
    with caplog.at_level("INFO", logger="lavin_fast.data.incontext.loader"):
        loader = build_incontext_loader(folder, resolution=32, n_pairs=1, batch_size=2, device="cpu")
    assert loader.backend == "torch" and loader.device == "cpu"
    lines = [r.getMessage() for r in caplog.records if r.name == "lavin_fast.data.incontext.loader"]
    assert len(lines) == 1 and "torch (PIL) decoders" in lines[0] and "dali-cu13" in lines[0], lines
    batch = next(loader)
    assert batch.context.shape[0] == 2 and batch.target.shape[-1] == 32
    loader.close()


def test_auto_backend_choice():
    from lavin_fast.data.incontext import loader as loader_mod

    assert loader_mod.choose_backend("torch", "x")[0] == "torch"
    assert loader_mod.choose_backend("dali", "demo")[0] == "dali"  # asked for by name: as asked
    assert loader_mod.choose_backend("auto", "demo")[0] == "torch"
    assert loader_mod.choose_backend("auto", "dir", num_workers=2)[0] == "torch"
    ok, _ = loader_mod.dali_available()
    assert loader_mod.choose_backend("auto", "dir")[0] == ("dali" if ok else "torch")


@pytest.mark.slow
def test_data_bench_without_dali(tmp_path):
    folder = _photos(tmp_path / "photos", n=6)
    proc = _core(f"""
        from lavin_fast.cli.main import main
        sys.exit(main(["data", "bench", "--images", {str(folder)!r}, "--quick", "--seconds", "0.2", "--repeats", "1",
                       "--resolution", "32", "--batch-size", "2", "--workers", "1"]))
    """, timeout=300, cache=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DALI is missing" in proc.stderr and "dali-cu13" in proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(rows) >= 3 and not any("dali" in r.lower() for r in rows[1:]), proc.stdout


# ----------------------------------------------------------------------------------------------
# The demo data on the core install: computed images stand in for scikit-image's photographs.
# ----------------------------------------------------------------------------------------------
def test_demo_images_without_scikit_image(tmp_path):
    proc = _core("""
        import logging
        logging.basicConfig(level=logging.INFO)
        from lavin_fast.data.demo_data import demo_image_paths
        print("\\n".join(str(p) for p in demo_image_paths()))
        print("\\n".join(str(p) for p in demo_image_paths()))
    """, cache=tmp_path)  # fmt: skip
    import numpy as np
    from PIL import Image

    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = proc.stdout.split()
    assert len(paths) == 20 and paths[:10] == paths[10:]
    assert proc.stderr.count("computed images stand in") == 1 and "lavin-fast[demo]" in proc.stderr
    arrays = [np.asarray(Image.open(p)) for p in paths[:10]]
    assert all(a.shape == (256, 256, 3) and a.std() > 20 for a in arrays)
    assert min(np.abs(a.astype(int) - b).mean() for i, a in enumerate(arrays) for b in arrays[i + 1 :]) > 10


def test_computed_images_are_deterministic_and_written_once(tmp_path):
    from lavin_fast.data import demo_data

    first = demo_data.computed_demo_images(tmp_path, n=3)
    stamp = [p.stat().st_mtime_ns for p in first]
    assert demo_data.computed_demo_images(tmp_path, n=3) == first and [p.stat().st_mtime_ns for p in first] == stamp
    assert (demo_data.computed_image(64, seed=5) == demo_data.computed_image(64, seed=5)).all()


@pytest.mark.slow
def test_train_tiny_cpu_on_the_core_install(tmp_path):
    proc = _core(f"""
        from lavin_fast.cli.main import main
        sys.exit(main(["train", "tiny-cpu", "--steps", "1", "--batch-size", "2", "--micro-batch-size", "2",
                       "--out-dir", {str(tmp_path / "run")!r}]))
    """, timeout=600, cache=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and (tmp_path / "run" / "ema.safetensors").is_file()
    assert "TensorBoard scalars off" in proc.stderr


# ----------------------------------------------------------------------------------------------
# `data demo`: --out may be a folder; the grid is labelled.
# ----------------------------------------------------------------------------------------------
def test_column_labels():
    from lavin_fast.cli.data import column_labels

    assert column_labels((1, 1, 1, 1, 1), (1,)) == ["in 1", "out 1", "in 2", "out 2", "query", "target"]
    assert column_labels((2, 2, 2), (2,)) == ["in 1:0", "in 1:1", "out 1:0", "out 1:1", "query:0", "query:1",
                                              "target:0", "target:1"]  # fmt: skip


def test_data_demo_out_folder_and_labelled_grid(tmp_path):
    import argparse

    import numpy as np
    from PIL import Image

    from lavin_fast.cli import data as data_cli
    from lavin_fast.cli.main import main

    argv = ["--resolution", "32", "--batch-size", "2", "--num-pairs", "1", "--backend", "torch"]
    assert main(["data", "demo", "--out", str(tmp_path) + "/", *argv]) == 0
    img = np.asarray(Image.open(tmp_path / "data_demo.png").convert("RGB"))
    # the same batch again (the loader is deterministic in its seed): its frames sit in the grid, with labels
    args = argparse.Namespace(source="demo", resolution=32, num_pairs=1, batch_size=2, seed=0, backend="torch",
                              device="cpu", data_command="demo", max_memory=None)  # fmt: skip
    b = next(data_cli._loader(args))
    frames = ((torch_frames := data_cli.torch_cat_frames(b)).clamp(-1, 1) + 1) * 127.5
    frames = frames.round().byte().numpy()
    t = torch_frames.shape[2]
    left = img.shape[1] - t * 34
    assert left > 30 and img.shape[0] == 16 + 2 * 34  # a label column and a label row
    for i in range(2):
        for j in range(t):
            cell = img[16 + i * 34 : 16 + i * 34 + 32, left + j * 34 : left + j * 34 + 32]
            assert (cell == frames[i, :, j].transpose(1, 2, 0)).all(), (i, j)
        assert (img[16 + i * 34 : 16 + i * 34 + 32, :left] < 128).any()  # the task's name
    assert (img[:14, left:] < 128).any(axis=(0, 2)).sum() > 3 * t  # a name over each column
    assert main(["data", "demo", "--out", str(tmp_path / "grid.jpg"), *argv]) == 2


# ----------------------------------------------------------------------------------------------
# setup.py: TORCH_CUDA_ARCH_LIST mapped to the library's architectures; a failed build leaves a record, not an error.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup_py():
    import importlib.util

    pytest.importorskip("setuptools")
    spec = importlib.util.spec_from_file_location("lavin_fast_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: defines the helpers, builds nothing
    return mod


@pytest.mark.parametrize(
    "value, expected",
    [
        ("8.0 8.6 9.0+PTX", "80-real;86-real;90-real;90-virtual"),
        ("7.0;7.5;8.0", "80-real"),  # below sm_80: dropped
        ("9.0a", "90a-real"),
        ("Ampere;Hopper+PTX", "80-real;86-real;90-real;90-virtual"),
        ("8.9,9.0 9.0", "89-real;90-real"),
    ],
)
def test_torch_cuda_arch_list(setup_py, value, expected):
    assert setup_py.torch_arch_list_to_cmake(value) == expected


def test_torch_cuda_arch_list_errors_and_precedence(setup_py):
    for bad, word in (("7.0 7.5", "no architecture"), ("sm90", "sm90"), ("9", "'9'")):
        with pytest.raises(ValueError, match=word):
            setup_py.torch_arch_list_to_cmake(bad)
    assert setup_py.cmake_archs({}) is None
    assert setup_py.cmake_archs({"TORCH_CUDA_ARCH_LIST": "9.0"}) == "90-real"
    assert setup_py.cmake_archs({"TORCH_CUDA_ARCH_LIST": "9.0", "LAVIN_FAST_CUDA_ARCHS": "80;90"}) == "80;90"


def test_cmake_takes_the_mapped_list(setup_py, tmp_path):
    import shutil

    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.isfile("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None or shutil.which("cmake") is None:
        pytest.skip("nvcc or cmake not found")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAVIN_FAST_")}
    env["LAVIN_FAST_CUDA_ARCHS"] = setup_py.cmake_archs({"TORCH_CUDA_ARCH_LIST": "8.0 9.0+PTX"})
    proc = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-DCMAKE_CUDA_COMPILER={nvcc}"],
                          capture_output=True, text=True, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads((tmp_path / "cuda_build.json").read_text())
    assert record["status"] == "built" and record["archs"] == ["80-real", "90-real", "90-virtual"]


def test_cmake_builds_the_cpu_library_without_cuda(tmp_path):
    """CUDA skipped, a C++ compiler present: CMake still builds liblavin_fast_cpu.so and records it; with
    LAVIN_FAST_SKIP_CPU_BUILD the record says why there is none."""
    import shutil

    if shutil.which("cmake") is None or (shutil.which("c++") or shutil.which("g++")) is None:
        pytest.skip("cmake or a C++ compiler not found")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAVIN_FAST_")}
    build = tmp_path / "b"
    cfg = ["cmake", "-S", str(ROOT), "-B", str(build), "-DLAVIN_FAST_SKIP_CUDA_BUILD=ON"]
    proc = subprocess.run(cfg, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((build / "cpu_build.json").read_text())["status"] == "built"
    proc = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (build / "liblavin_fast_cpu.so").is_file()
    env["LAVIN_FAST_SKIP_CPU_BUILD"] = "1"
    proc = subprocess.run(cfg[:4] + [str(tmp_path / "c"), cfg[5]], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "c" / "cpu_build.json").read_text())
    assert record == {"status": "skipped", "detail": "LAVIN_FAST_SKIP_CPU_BUILD is set"}


def test_failed_cuda_build_records_the_reason(setup_py, tmp_path, monkeypatch):
    from setuptools import Distribution

    tries = []

    def fail(self, ext, out, extra=None):
        tries.append(extra)
        raise subprocess.CalledProcessError(1, ["cmake", "--build", str(tmp_path)])

    monkeypatch.setattr(setup_py.cmake_build_ext, "_cmake", fail)
    cmd = setup_py.cmake_build_ext(Distribution())
    cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "tmp")
    (tmp_path / "lib" / "lavin_fast" / "lib").mkdir(parents=True)
    (tmp_path / "lib" / "lavin_fast" / "lib" / setup_py.LIBRARY).write_bytes(b"stale")
    cmd.build_extension(setup_py.CMakeExtension("lavin_fast.lib._cuda"))
    folder = tmp_path / "lib" / "lavin_fast" / "lib"
    record = json.loads((folder / "cuda_build.json").read_text())
    assert record["status"] == "skipped" and "failed" in record["detail"] and "cmake --build" in record["detail"]
    assert not (folder / setup_py.LIBRARY).exists() and setup_py._BUILT["library"] is False
    # the failed build was retried without CUDA (for the CPU library), once
    assert tries == [None, ["-DLAVIN_FAST_CUDA_BUILD_FAILED=ON"]]


# ----------------------------------------------------------------------------------------------
# Conventions and bounds.
# ----------------------------------------------------------------------------------------------
def test_conventions():
    import tomllib

    import lavin_fast

    assert (ROOT / "lavin_fast" / "py.typed").is_file() and (ROOT / "setup.py").is_file()
    assert lavin_fast.__all__ and all(hasattr(lavin_fast, n) for n in lavin_fast.__all__)
    assert not (ROOT / "lavin_fast" / "lib" / ".gitignore").exists()
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["build-system"]["build-backend"] == "setuptools.build_meta"
    deps = {d.split(">")[0].split("<")[0].split("=")[0].strip(): d for d in meta["project"]["dependencies"]}
    for name in ("torch", "triton"):
        assert "<" in deps[name] and ">=" in deps[name], deps[name]  # a floor and a ceiling


@pytest.mark.slow
def test_editable_install_sees_new_files(tmp_path):
    """`pip install -e .` maps the package to the checkout: modules and subpackages added after the install import
    without a reinstall."""
    import shutil

    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} is older than the build needs (>= 77)")
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", ".ci-build", "__pycache__", "runs", "lib")
    shutil.copytree(ROOT, src, ignore=skip)
    env = os.environ | {"LAVIN_FAST_SKIP_CUDA_BUILD": "1"}
    # --ignore-installed: without it pip uninstalls this interpreter's own lavin-fast (the checkout's editable
    # install, its console script with it) before installing into the prefix
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed",
           "--prefix", str(tmp_path / "prefix"), "-e", str(src)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    site_dir = next((tmp_path / "prefix").glob("lib/python*/site-packages"))
    (src / "lavin_fast" / "added_after_install.py").write_text("VALUE = 7\n")
    (src / "lavin_fast" / "data" / "added_module.py").write_text("VALUE = 8\n")
    (src / "lavin_fast" / "added_pkg").mkdir()
    (src / "lavin_fast" / "added_pkg" / "__init__.py").write_text("VALUE = 9\n")
    code = (f"import site; site.addsitedir({str(site_dir)!r}); import lavin_fast.added_after_install as m; "
            "import lavin_fast.data.added_module as d, lavin_fast.added_pkg as k; "
            "print(m.VALUE + d.VALUE + k.VALUE, m.__file__)")  # fmt: skip
    # -S: no site-packages of this interpreter (where another lavin_fast may be installed), only the prefix's
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    value, where = proc.stdout.split()
    assert value == "24" and pathlib.Path(where).resolve() == (src / "lavin_fast" / "added_after_install.py").resolve()
