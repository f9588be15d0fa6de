"""Training state that can be read without running code.

Checkpoint folders live on shared file systems, so nothing read from them may be a general pickle:
- `save_tree` / `load_tree`: a nested structure of dicts (string keys), lists, tuples, numbers, strings, None,
  tensors and numpy arrays as `NAME.json` + `NAME.safetensors` (the per-rank trainer state: step, schedule,
  data position, RNG states). JSON and safetensors are data formats: loading them cannot call anything.
- `SafeFileSystemReader`: DCP's reader with the `.metadata` pickle read by an unpickler that admits only DCP's
  own metadata classes, `torch.Size`, dtypes/layouts and paths; anything else is a `CheckpointError`. BUILD
  (`__setstate__` / attribute setting) applies only to instances of the admitted data classes, never to a class, a
  function or a module (which would patch them for the rest of the process). Every storage item must name a file
  of the checkpoint folder itself (no absolute path, no `..`, no link out), covered by its CHECKSUMS.json when it
  has one, and lie within that file's size.
- `SafeLoadPlanner`: DCP's load planner with the non-tensor items (optimizer hyperparameters) read by
  `torch.load(weights_only=True)` instead of DCP's default `weights_only=False`.
"""

from __future__ import annotations

import io
import json
import pathlib
import pickle
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint.metadata as dcp_metadata
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner


class CheckpointError(RuntimeError):
    """A missing, incomplete, corrupt or unsafe training checkpoint."""


# ------------------------------------------------------------------ JSON + safetensors trees
_TENSOR, _ARRAY, _TUPLE = "__tensor__", "__ndarray__", "__tuple__"


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {_ARRAY: key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{where}: dict keys must be strings to save as JSON, got {bad[:3]!r}")
        if {_TENSOR, _ARRAY, _TUPLE} & set(obj):
            raise TypeError(f"{where}: the keys {_TENSOR!r}, {_ARRAY!r}, {_TUPLE!r} are reserved")
        return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{where}: cannot save a {type(obj).__name__} as data (JSON + safetensors)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    for tag in (_TENSOR, _ARRAY):
        if tag in obj:
            key = obj[tag]
            if len(obj) != 1 or key not in tensors:
                raise CheckpointError(f"{where}: names tensor {key!r}, which its .safetensors file does not hold")
            return tensors[key].numpy() if tag == _ARRAY else tensors[key]
    if _TUPLE in obj:
        return tuple(_decode(v, tensors, where) for v in obj[_TUPLE])
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def save_tree(stem: pathlib.Path, tree: dict[str, Any]) -> list[pathlib.Path]:
    """Write `tree` as stem.json + stem.safetensors; returns the two paths."""
    tensors: dict[str, torch.Tensor] = {}
    doc = _encode(tree, tensors, stem.name)
    js, st = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    save_file(tensors, str(st))
    js.write_text(json.dumps(doc))
    return [js, st]


def load_tree(stem: pathlib.Path) -> dict[str, Any]:
    """Read what `save_tree` wrote; a missing or malformed file is a CheckpointError naming it."""
    js, st = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for p in (js, st):
        if not p.is_file():
            raise CheckpointError(f"{p} is missing: the checkpoint is incomplete")
    try:
        doc = json.loads(js.read_text())
        tensors = load_file(str(st))
    except Exception as exc:
        raise CheckpointError(f"cannot read {js} / {st}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(doc, dict):
        raise CheckpointError(f"{js}: expected a JSON object, got {type(doc).__name__}")
    return _decode(doc, tensors, str(js))


# ------------------------------------------------------------------ DCP metadata without arbitrary pickles
_EXTRA_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # returns torch.<layout name>, as torch's weights_only loader allows
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


_DATA_CLASSES: tuple[type, ...] = ()


def _data_classes() -> tuple[type, ...]:
    """The classes whose instances BUILD may fill: DCP's metadata dataclasses and _StorageInfo."""
    global _DATA_CLASSES
    if not _DATA_CLASSES:
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        ours = [v for v in vars(dcp_metadata).values() if isinstance(v, type) and v.__module__ == dcp_metadata.__name__]
        _DATA_CLASSES = (*ours, _StorageInfo)
    return _DATA_CLASSES


class _MetadataUnpickler(pickle._Unpickler):  # the Python unpickler: its opcodes can be checked one by one
    """Admits DCP's metadata classes (those defined in torch.distributed.checkpoint.metadata), torch dtypes and the
    few helpers in _EXTRA_ALLOWED; every other global is refused before it is called, and BUILD only fills
    instances of DCP's data classes."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if module == dcp_metadata.__name__:
            obj = getattr(dcp_metadata, name, None)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in _EXTRA_ALLOWED:
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self.source} refers to {module}.{name}, which a DCP checkpoint's metadata never holds: the file was "
            "tampered with or is not a lavin-fast checkpoint; nothing in it was run"
        )

    def load_build(self) -> None:
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if isinstance(target, type) or not isinstance(target, _data_classes()):
            raise CheckpointError(
                f"{self.source} sets the state of {type(target).__name__ if not isinstance(target, type) else target} "
                f"({target!r:.80}), which DCP metadata never does (only its own data classes get a state): the file "
                "was tampered with; nothing in it was applied"
            )
        if not isinstance(self.stack[-1], (dict, tuple)):
            raise CheckpointError(f"{self.source}: a state that is not a dict was given to {type(target).__name__}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def _refuse(self) -> None:
        raise CheckpointError(f"{self.source} uses a pickle extension code, which DCP metadata never does")

    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _refuse
    del _op


def _check_storage(metadata: dcp_metadata.Metadata, folder: pathlib.Path) -> None:
    """Every storage item names a plain file of `folder` (covered by its CHECKSUMS.json when there is one), and its
    byte range lies within that file."""
    storage = getattr(metadata, "storage_data", None)
    if storage is None:
        return
    if not isinstance(storage, dict):
        raise CheckpointError(f"{folder / '.metadata'}: storage_data is a {type(storage).__name__}, not a mapping")
    manifest = folder / "CHECKSUMS.json"
    covered = None
    if manifest.is_file():
        try:
            covered = set(json.loads(manifest.read_text(encoding="utf-8")).get("files", {}))
        except (OSError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{manifest} is not readable JSON ({exc})") from None
    root = folder.resolve()
    sizes: dict[str, int] = {}
    for index, info in storage.items():
        rel = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        fqn = getattr(index, "fqn", index)
        if not isinstance(rel, str) or not rel or pathlib.PurePath(rel).name != rel or rel in (".", ".."):
            raise CheckpointError(
                f"{folder / '.metadata'}: tensor {fqn!r} is stored at {rel!r}, which is not a file name inside the "
                "checkpoint folder (absolute and ../ paths are refused)"
            )
        if rel not in sizes:
            f = folder / rel
            if f.is_symlink() or not f.is_file() or f.resolve().parent != root:
                raise CheckpointError(f"{folder / '.metadata'}: tensor {fqn!r} names {rel!r}, not a file of {folder}")
            if covered is not None and rel not in covered:
                raise CheckpointError(f"{folder / '.metadata'}: tensor {fqn!r} names {rel!r}, which {manifest.name} "
                                      "does not cover")  # fmt: skip
            sizes[rel] = f.stat().st_size
        ok = isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0
        if not ok or offset + length > sizes[rel]:
            raise CheckpointError(
                f"{folder / '.metadata'}: tensor {fqn!r} reads bytes {offset}..{offset}+{length} of {rel!r}, which "
                f"holds {sizes[rel]} bytes"
            )


def read_dcp_metadata(path: pathlib.Path) -> dcp_metadata.Metadata:
    """The `.metadata` of a DCP checkpoint folder, read with the restricted unpickler, its storage items checked."""
    meta_path = path / ".metadata"
    try:
        with open(meta_path, "rb") as f:
            metadata = _MetadataUnpickler(f, str(meta_path)).load()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read {meta_path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointError(f"{meta_path} holds a {type(metadata).__name__}, not DCP metadata")
    _check_storage(metadata, path)
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata comes from `read_dcp_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files are not used by lavin-fast checkpoints
            raise CheckpointError("per-rank DCP metadata is not supported")
        metadata = read_dcp_metadata(pathlib.Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor items are read with torch.load(weights_only=True)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"checkpoint item {read_item.dest_index.fqn!r} is not plain data (weights_only refused it: {exc}); "
                "nothing in it was run"
            ) from exc
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
