"""Annotated tasks from a JSON-lines manifest that the user writes for the datasets they bring.

One JSON object per line (blank lines and lines starting with `#` are ignored):

    {"task": "depth_estimation", "input": "images/0001.jpg", "target": "depth/0001.png"}
    {"task": "video_depth_estimation", "input": ["v1/f0.png", "v1/f1.png", ...], "target": ["v1/d0.png", ...]}
    {"task": "frame_prediction", "video": "clips/a.avi"}
    {"image": "images/0002.jpg"}

- `input` / `target`: one image file, or a list of frame files (a clip; both lists the same length).
  Targets are stored as rendered images (depth as grey levels and normals as the vector in RGB, see
  lavin_fast/dense_maps.py; boxes and poses drawn, masks coloured), as the paper does.
- `video`: a clip file (VP9 / MJPEG for DALI's CPU decoder; anything OpenCV reads for the torch
  backend) for frame prediction: context frames -> the following frames.
- `image`: a plain image; it joins the pool of the computed tasks (edges, inpainting, ...).
- Relative paths are relative to the manifest's directory, or to `"root"` given on a line of its own
  (`{"root": "/data/coco"}`), which applies to the lines after it.

Errors (raised at start-up, before any training step): a missing manifest, a line that is not JSON,
a missing key, an unknown task, a missing file, input/target frame lists of different lengths.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass

from lavin_fast.data.tasks import COMPUTED_TASKS

# the annotated tasks of the paper's Table 2 (targets provided by the user as rendered images)
IMAGE_TASKS: tuple[str, ...] = (
    "object_detection",
    "instance_segmentation",
    "panoptic_segmentation",
    "foreground_segmentation",
    "pose_estimation",
    "pose_to_image",
    "depth_estimation",
    "depth_to_image",
    "normal_estimation",
    "normal_to_image",
)
VIDEO_TASKS: tuple[str, ...] = (
    "video_depth_estimation",
    "depth_to_video",
    "video_normal_estimation",
    "normal_to_video",
    "video_optical_flow",
    "video_instance_segmentation",
)
FRAME_PREDICTION = "frame_prediction"
# pre-rendered pairs of the computed tasks are accepted too
KNOWN_TASKS: frozenset[str] = frozenset(IMAGE_TASKS + VIDEO_TASKS + tuple(COMPUTED_TASKS) + (FRAME_PREDICTION,))


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class PairRecord:
    """One annotated example."""

    task: str
    """task name"""
    input: tuple[str, ...]
    """input frame files (one for an image task)"""
    target: tuple[str, ...]
    """target frame files, as many as `input`"""


@dataclass
class Manifest:
    """The parsed manifest."""

    pairs: list[PairRecord]
    """annotated examples"""
    videos: list[str]
    """clip files for frame prediction"""
    images: list[str]
    """plain images for the computed tasks"""
    path: str
    """the manifest file"""


def _resolve(root: pathlib.Path, value, key: str, where: str, extra_tasks_hint: bool = False) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v for v in items):
        raise ManifestError(
            f"{where}: '{key}' must be a file path (string) or a non-empty list of them, got a "
            f"{type(value).__name__}: {value!r}"
        )
    out = []
    for v in items:
        p = pathlib.Path(os.path.expanduser(v))
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise ManifestError(f"{where}: '{key}' file not found: {p}")
        out.append(str(p))
    return tuple(out)


def load_manifest(path: str | os.PathLike, extra_tasks: tuple[str, ...] = ()) -> Manifest:
    """Parse and check a JSON-lines manifest: every file must exist and every task be known
    (`KNOWN_TASKS` plus `extra_tasks`). Raises ManifestError on the first problem."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest: file not found: {path}")
    known = KNOWN_TASKS | frozenset(extra_tasks)
    root = path.resolve().parent
    pairs: list[PairRecord] = []
    videos: list[str] = []
    images: list[str] = []
    from lavin_fast.textfiles import read_text

    if True:  # the lines of a UTF-8 text file (an undecodable byte is an error naming its line)
        for lineno, line in enumerate(read_text(path, "manifest").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if set(obj) == {"root"}:
                r = pathlib.Path(os.path.expanduser(str(obj["root"])))
                root = r if r.is_absolute() else path.resolve().parent / r
                if not root.is_dir():
                    raise ManifestError(f"{where}: root directory not found: {root}")
                continue
            if "image" in obj and "task" not in obj:
                images.extend(_resolve(root, obj["image"], "image", where))
                continue
            task = obj.get("task")
            if task is not None and not isinstance(task, str):
                raise ManifestError(f"{where}: 'task' is a {type(task).__name__} ({task!r}); expected a string")
            if not isinstance(task, str):
                raise ManifestError(f"{where}: missing 'task' (or 'image'); keys seen: {sorted(obj)}")
            if task not in known:
                raise ManifestError(
                    f"{where}: unknown task {task!r}; expected one of {sorted(known)} (pass extra_tasks for your own)"
                )
            if task == FRAME_PREDICTION and "video" in obj:
                videos.extend(_resolve(root, obj["video"], "video", where))
                continue
            for key in ("input", "target"):
                if key not in obj:
                    raise ManifestError(f"{where}: task {task!r} needs '{key}'; keys seen: {sorted(obj)}")
            inp = _resolve(root, obj["input"], "input", where)
            tgt = _resolve(root, obj["target"], "target", where)
            if len(inp) != len(tgt):
                raise ManifestError(f"{where}: 'input' has {len(inp)} frames but 'target' has {len(tgt)}")
            pairs.append(PairRecord(task, inp, tgt))
    if not (pairs or videos or images):
        raise ManifestError(f"manifest: {path} has no entries")
    return Manifest(pairs, videos, images, str(path))
