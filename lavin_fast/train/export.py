"""The EMA export: a J-DiT safetensors file written by rank 0 alone, tensor by tensor.

Under FSDP every rank holds a shard of each EMA tensor. `stream_full_tensors` gathers them one at a time (a
collective every rank joins, in the same order); only rank 0 copies each gathered tensor to the host, writes its
bytes and drops it before the next. Host memory is one tensor (the largest: ~0.1 GB at 3.4B) instead of the whole
float32 EMA (~13.6 GB at 3.4B) on every rank.

safetensors' own writer takes a complete dict, so `write_safetensors_stream` writes the format directly: an 8-byte
little-endian header length, the JSON header (every tensor's dtype, shape and byte range, known before any byte is
gathered), then the tensors' bytes in header order. `safetensors.safe_open` reads the result (tested).
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from collections.abc import Iterable, Iterator

import torch

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def write_safetensors_stream(
    path: str | pathlib.Path,
    specs: list[tuple[str, tuple[int, ...], torch.dtype]],
    tensors: Iterable[torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> pathlib.Path:
    """Write `tensors` (yielded in the order of `specs`: name, shape, dtype) as one safetensors file, holding
    one tensor at a time. Written to `path`.tmp and renamed, so a failure leaves no partial file at `path`.
    A tensor that does not match its spec, or that is not finite, stops the write (ValueError)."""
    path = pathlib.Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata or {})} if metadata else {}
    offset = 0
    for name, shape, dtype in specs:
        if dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {dtype} cannot be exported (expected one of {list(_DTYPES)})")
        size = dtype.itemsize
        for s in shape:
            size *= s
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = path.with_name(path.name + ".tmp")
    it = iter(tensors)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, shape, dtype in specs:
                t = next(it, None)
                if t is None:
                    raise ValueError(f"{name}: the tensor stream ended early")
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise ValueError(f"{name}: got {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
                if not torch.isfinite(t).all():
                    raise ValueError(f"{name}: holds non-finite values")
                f.write(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
                del t
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for _ in it:  # the other ranks are still gathering: join their remaining collectives, then fail
            pass
        raise
    return path


def stream_full_tensors(named: list[tuple[str, torch.Tensor]], keep: bool) -> Iterator[torch.Tensor]:
    """Each tensor gathered whole (DTensor.full_tensor, a collective: every rank iterates to the end), as float32
    on the host when `keep` (rank 0), else gathered and dropped."""
    for _, t in named:
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        if keep:
            yield full.detach().to("cpu", torch.float32)
        del full


def global_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The full shape of a tensor or of a DTensor shard."""
    return tuple(t.shape)  # a DTensor's .shape is its global shape
