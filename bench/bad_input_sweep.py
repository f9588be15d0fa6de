"""A bad-input sweep over the subcommands, as subprocesses: each case is classified as a one-line error with rc 2,
a silent rc 0, a traceback, a crash (killed by a signal: a segfault) or a timeout. Run it with two interpreters to
compare two versions of the package (the one each imports):

  python bench/bad_input_sweep.py --python /path/to/old/venv/bin/python --work /tmp/sweep_old
  python bench/bad_input_sweep.py --python .venv/bin/python --work /tmp/sweep_new

Cases named "non-UTF-8" hold valid files under names that are not UTF-8: for them rc 0 is the right outcome
(counted as "rc 0 (valid input)"); a crash is the fault. Each case runs under a 4 GiB address-space limit (so a decoder without a pixel limit ends in a MemoryError rather
than in the machine's swap) and a timeout. The inputs are made with this checkout's package (they are data files).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys

import numpy as np

NOT_UTF8 = os.fsdecode(b"bad\xff\xfename")


def _png(w=32, h=32, seed=0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_inputs(work: pathlib.Path) -> dict[str, pathlib.Path]:
    import torch
    from safetensors.torch import save_file

    from lavin_fast.media import write_clip
    from lavin_fast.models.checkpoints import save_dit, save_vae
    from lavin_fast.models.dit import JDiT
    from lavin_fast.models.dit_configs import get_config
    from lavin_fast.models.vae import build_vae

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    f = {"w": work}
    task = work / "task"
    task.mkdir()
    for i in range(2):
        (task / f"ex{i}_input.png").write_bytes(_png(seed=2 * i))
        (task / f"ex{i}_target.png").write_bytes(_png(seed=2 * i + 1))
    (work / "q.png").write_bytes(_png(seed=9))
    torch.manual_seed(0)
    dit = JDiT(get_config("tiny"))
    save_dit(dit, work / "dit.safetensors")
    sd = {k: v.detach().clone() for k, v in dit.state_dict().items()}
    meta = {"format": "lavin_fast.jdit", "config": json.dumps(dit.cfg.to_dict())}
    k = sorted(sd)[0]
    save_file({**sd, k: sd[k].to(torch.int32)}, str(work / "dit_int.safetensors"), metadata=meta)
    nan = sd[k].clone()
    nan.view(-1)[0] = float("nan")
    save_file({**sd, k: nan}, str(work / "dit_nan.safetensors"), metadata=meta)
    save_file(sd, str(work / "dit_cfglist.safetensors"), metadata={**meta, "config": "[1, 2]"})
    save_vae(
        build_vae(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4), work / "vae.safetensors"
    )
    clip = np.random.default_rng(0).integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
    write_clip(clip, work / "clip.avi")
    clips = work / "clips"
    clips.mkdir()
    shutil.copy(work / "clip.avi", clips / (NOT_UTF8 + ".avi"))
    for name, data in {
        "hdr": ("x.png", b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 30000 +X 30000\n" + b"\x02\x02\x75\x30" * 64),
        "npy": ("x.npy", _npy_header((100000, 100000, 3))),
        "nonutf8": (NOT_UTF8 + ".png", _png()),
        "unreadable": ("u.png", b"not an image" * 4),
    }.items():
        d = work / name
        (d / "pred").mkdir(parents=True)
        (d / "gt").mkdir()
        stem, suffix = data[0].rsplit(".", 1)
        (d / "pred" / data[0]).write_bytes(data[1])
        (d / "gt" / f"{stem}_target.{suffix}").write_bytes(data[1])
        f[name] = d
    (work / "latin1.jsonl").write_bytes(b'{"task": "deraining", "input": "q.png"}\n# caf\xe9\n')
    (work / "taskint.jsonl").write_bytes(b'{"task": 5, "input": "q.png", "target": "q.png"}\n')
    (work / "latin1.yaml").write_bytes(b"steps: 2\n# caf\xe9\n")
    return f


def _npy_header(shape) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def cases(f: dict[str, pathlib.Path]) -> list[tuple[str, list[str]]]:
    w = f["w"]
    s = ["sample", "--dit", w / "dit.safetensors", "--vae", w / "vae.safetensors", "--task-dir", w / "task",
         "--query", w / "q.png", "--grid-points", "2", "--grid", "uniform", "--device", "cpu"]  # fmt: skip
    out = [
        ("sample --num-pairs 1e6", s + ["--num-pairs", "1000000", "--out", w / "o1.png"]),
        ("sample --grid-points 1e9", s + ["--grid-points", "1000000000", "--out", w / "o2.png"]),
        ("sample --size 100000", s + ["--size", "100000", "--out", w / "o3.png"]),
        ("sample --seed -1", s + ["--seed", "-1", "--out", w / "o4.png"]),
        ("sample --out folder", s + ["--out", w]),
        ("sample --out too long", s + ["--out", w / ("x" * 300 + ".png")]),
        ("sample --out under a file", s + ["--out", w / "q.png" / "x.png"]),
        ("sample int tensor", s + ["--dit", w / "dit_int.safetensors", "--out", w / "o5.png"]),
        ("sample NaN tensor", s + ["--dit", w / "dit_nan.safetensors", "--out", w / "o6.png"]),
        ("sample config list", s + ["--dit", w / "dit_cfglist.safetensors", "--out", w / "o7.png"]),
        (
            "sample --video non-UTF-8",
            s[:5]
            + [
                "--video",
                w / "clips" / (NOT_UTF8 + ".avi"),
                "--grid-points",
                "2",
                "--grid",
                "uniform",
                "--out",
                w / "v.avi",
                "--clip-frames",
                "9",
            ],
        ),  # fmt: skip
        (
            "eval score HDR named .png",
            [
                "eval",
                "score",
                "deraining",
                "--pred",
                f["hdr"] / "pred",
                "--gt",
                f["hdr"] / "gt",
                "--metrics",
                "mse",
                "--out",
                w / "e1.json",
            ],
        ),  # fmt: skip
        (
            "eval score .npy bomb",
            [
                "eval",
                "score",
                "depth_estimation",
                "--pred",
                f["npy"] / "pred",
                "--gt",
                f["npy"] / "gt",
                "--out",
                w / "e2.json",
            ],
        ),  # fmt: skip
        (
            "eval score non-UTF-8",
            [
                "eval",
                "score",
                "deraining",
                "--pred",
                f["nonutf8"] / "pred",
                "--gt",
                f["nonutf8"] / "gt",
                "--metrics",
                "mse",
                "--out",
                w / "e3.json",
            ],
        ),  # fmt: skip
        (
            "eval make-set HDR named .png",
            ["eval", "make-set", "deraining", "--images", f["hdr"] / "pred", "--out", w / "set1"],
        ),  # fmt: skip
        (
            "eval make-set non-UTF-8",
            ["eval", "make-set", "deraining", "--images", f["nonutf8"] / "pred", "--out", w / "set2"],
        ),  # fmt: skip
        (
            "eval make-set --size 1e6",
            ["eval", "make-set", "deraining", "--images", w / "task", "--size", "1000000", "--out", w / "set3"],
        ),  # fmt: skip
        ("data check non-UTF-8 clip", ["data", "check", w / "clips", "--backend", "torch"]),
        ("data check all unreadable", ["data", "check", f["unreadable"] / "pred", "--backend", "torch"]),
        ("data check --batch-size 1e6", ["data", "check", "demo", "--batch-size", "1000000", "--backend", "torch"]),
        ("data check latin-1 manifest", ["data", "check", w / "latin1.jsonl", "--backend", "torch"]),
        ("data check task is an int", ["data", "check", w / "taskint.jsonl", "--backend", "torch"]),
        (
            "build-cache only unreadable",
            [
                "data",
                "build-cache",
                f["unreadable"] / "pred",
                "--vae",
                w / "vae.safetensors",
                "--out",
                w / "cache",
                "--resolution",
                "32",
                "--no-progress",
            ],
        ),  # fmt: skip
        (
            "build-cache --encode-batch 1e6",
            [
                "data",
                "build-cache",
                "demo",
                "--vae",
                w / "vae.safetensors",
                "--out",
                w / "cache2",
                "--encode-batch",
                "1000000",
                "--resolution",
                "4096",
            ],
        ),  # fmt: skip
        (
            "train --steps 1e20",
            ["train", "tiny-cpu", "--out-dir", w / "r1", "--steps", "1e20", "--max-minutes", "0.05"],
        ),
        (
            "train --micro-batch-size 1e6",
            [
                "train",
                "tiny-cpu",
                "--out-dir",
                w / "r2",
                "--batch-size",
                "1000000",
                "--micro-batch-size",
                "1000000",
                "--max-minutes",
                "0.05",
            ],
        ),  # fmt: skip
        ("train --init-from DIR", ["train", "tiny-cpu", "--out-dir", w / "r3", "--init-from", w]),
        (
            "train --init-from NaN",
            ["train", "tiny-cpu", "--out-dir", w / "r4", "--init-from", w / "dit_nan.safetensors", "--steps", "1"],
        ),  # fmt: skip
        ("train latin-1 YAML", ["train", w / "latin1.yaml", "--out-dir", w / "r5"]),
        ("demo --image-size 100000", ["demo", "--out", w / "d", "--image-size", "100000"]),
    ]
    return [(name, [str(a) for a in argv]) for name, argv in out]


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def _repo_of(python: str) -> str:
    """REPO for REPO/.venv/bin/python (an editable install imports the package from there), else the cwd."""
    p = pathlib.Path(os.path.abspath(python))
    return str(p.parents[2]) if p.parent.name == "bin" and p.parents[1].name == ".venv" else os.getcwd()


def classify(python: str, argv: list[str], timeout: float) -> tuple[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        p = subprocess.run([python, "-m", "lavin_fast", *argv], capture_output=True, timeout=timeout,
                           preexec_fn=_limit, env=env, cwd=_repo_of(python))  # fmt: skip
    except subprocess.TimeoutExpired:
        return "timeout", ""
    err = p.stderr.decode("utf-8", "replace")
    last = next((ln for ln in reversed(err.splitlines()) if ln.strip()), "")
    if p.returncode < 0:
        return "crash", f"signal {-p.returncode}"
    if "Traceback (most recent call last)" in err:
        return "traceback", last
    if p.returncode == 0:
        return "silent rc 0", last
    if p.returncode == 2 and "error:" in err:
        return "one line rc 2", last
    return f"rc {p.returncode}", last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=sys.executable, help="the interpreter whose lavin_fast is swept")
    ap.add_argument("--work", default="/tmp/lavin_fast_bad_input_sweep", help="scratch folder (emptied)")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    files = make_inputs(pathlib.Path(a.work))
    rows = []
    for name, argv in cases(files):
        kind, last = classify(a.python, argv, a.timeout)
        if kind == "silent rc 0" and "non-UTF-8" in name:  # a valid file with an odd name: success is right
            kind = "rc 0 (valid input)"
        rows.append({"case": name, "outcome": kind, "last_line": last[:200]})
        print(f"{kind:14s} {name}: {last[:150]}", flush=True)
    counts = collections.Counter(r["outcome"] for r in rows)
    print("\n" + ", ".join(f"{n} {k}" for k, n in counts.most_common()) + f" (of {len(rows)})")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"counts": counts, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
