"""Latent cache shards in the tar layout of lavin_fast.data.shards: one WebDataset-style tar per cache shard, a
sample per cached pair (`<row>.input.npy`, `<row>.target.npy`, `<row>.json`), DALI's `.idx` beside it.

So a cache also streams (any tar / WebDataset reader takes it, sequentially, from a shared or object store),
and the loader reads it by random access through the tar's offsets: every row of a shard has the same latent
shape and dtype, so its members have the same sizes and sit at a fixed stride; the shard's layout (first data
offset of each member, the stride, the sizes) is four integers in the cache's index, and a row is one
`os.pread` at `first + row * stride` (no per-row list, any thread). Latents are stored as .npy (numpy's format,
read with allow_pickle=False: a cache file never executes code); bfloat16 is stored as float32.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import tarfile

import numpy as np
import torch

from lavin_fast.data.wds import write_wds_index

MEMBERS = ("input", "target")


def _npy(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    buf = io.BytesIO()
    np.save(buf, t.contiguous().numpy(), allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def write_latent_tar(path: pathlib.Path, inputs: torch.Tensor, targets: torch.Tensor, task: str) -> dict:
    """Write rows `inputs[r]`, `targets[r]` as samples of the tar `path` (and its DALI .idx beside it); returns
    the layout the reader needs: {"input": [first data offset, bytes], "target": [...], "stride": bytes}."""
    n = len(inputs)
    meta = json.dumps({"task": task}).encode()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for r in range(n):
            _add(tar, f"{r:09d}.input.npy", _npy(inputs[r]))
            _add(tar, f"{r:09d}.target.npy", _npy(targets[r]))
            _add(tar, f"{r:09d}.json", meta)
    with tarfile.open(tmp) as tar:
        members = [m for m in tar if m.isreg()]
    first = {k: members[i] for i, k in enumerate(MEMBERS)}
    stride = members[3].offset_data - members[0].offset_data if n > 1 else 0
    for r in range(n):  # the fixed stride the reader relies on (equal member sizes): checked, not assumed
        for i, k in enumerate(MEMBERS):
            m = members[3 * r + i]
            if m.offset_data != first[k].offset_data + r * stride or m.size != first[k].size:
                raise RuntimeError(f"latent tar {path.name}: row {r} {k} is not at the shard's stride")
    os.replace(tmp, path)
    write_wds_index(path, path.with_suffix(".idx"))
    layout = {k: [first[k].offset_data, first[k].size] for k in MEMBERS}
    layout["stride"] = stride
    return layout


def check_layout(layout, where: str) -> None:
    ok = isinstance(layout, dict) and isinstance(layout.get("stride"), int) and layout["stride"] >= 0
    for k in MEMBERS:
        v = layout.get(k) if isinstance(layout, dict) else None
        ok = ok and isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x >= 0 for x in v)
    if not ok:
        raise ValueError(f"{where}: malformed tar layout {layout!r:.200} (an index of another build: build it again)")


class LatentTarRows:
    """Rows of latent tars by random access: `row(name, layout, r)` -> (input, target) tensors. Files stay open
    (a descriptor each); reads are positional (os.pread), so threads may share it."""

    def __init__(self, root: pathlib.Path):
        self.root = pathlib.Path(root)
        self._fds: dict[str, int] = {}

    def _fd(self, name: str) -> int:
        if name not in self._fds:
            self._fds[name] = os.open(self.root / name, os.O_RDONLY)
        return self._fds[name]

    def row(self, name: str, layout: dict, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for k in MEMBERS:
            first, size = layout[k]
            data = os.pread(self._fd(name), size, first + r * layout["stride"])
            if len(data) != size:
                raise ValueError(f"latent tar {self.root / name}: row {r} {k} is cut short (a truncated file)")
            a = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
            if a.dtype.kind != "f":
                raise ValueError(f"latent tar {self.root / name}: row {r} {k} is {a.dtype}, expected floats")
            out.append(torch.from_numpy(a))
        return out[0], out[1]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
