"""DALI's webdataset index of a tar (the `.idx` beside each shard): shared by the raw-data shards (shards.py) and the
latent cache's tar shards (latent_shards.py)."""

from __future__ import annotations

import os
import pathlib
import tarfile


def write_wds_index(tar_path: pathlib.Path, idx_path: pathlib.Path) -> int:
    """DALI's webdataset index (v1.2) of `tar_path`: one line per sample, `ext offset size name` per member;
    returns the sample count."""
    rows: list[list[str]] = []
    last = None
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if not m.isreg():
                continue
            base = m.name.rsplit("/", 1)[-1]
            dot = base.find(".")
            key, ext = m.name[: len(m.name) - len(base) + dot], base[dot + 1 :]
            if key != last:
                rows.append([])
                last = key
            rows[-1].append(f"{ext} {m.offset_data} {m.size} {m.name}")
    tmp = idx_path.with_name(idx_path.name + f".tmp{os.getpid()}")
    tmp.write_text(f"v1.2 {len(rows)}\n" + "".join(" ".join(r) + "\n" for r in rows))
    os.replace(tmp, idx_path)
    return len(rows)
