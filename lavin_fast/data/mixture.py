"""The paper's task mixture: default sampling weights proportional to the number of training samples per task.

`paper_task_weights(["edge_detection", "depth_estimation"])` -> {task: weight}, summing to 1, over the tasks a
user's sources provide. The counts are Table 2 of the LaVin-DiT paper's supplementary material (the multi-task
dataset), summed per task over its component datasets, copied as printed.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

# Table 2 of the LaVin-DiT paper's supplementary material: samples per task, summed over the component datasets
# (COCO 2017 train 117,266; Object365 train 1,728,778; ADE20K train+val 19,020; Cityscapes train+val 3,457;
# COCO pose 64,115; ImageNet-1K train 1,281,167; UCF101 train 7,629; Kinetics-700 train+val 570,465;
# Kubric train 48,689). As printed there, surface normal estimation lists ADE20K and Cityscapes only, and
# depth-to-image lists COCO (Stable-Normal pseudo-labels) besides ImageNet.
_COCO, _O365, _ADE, _CITY, _POSE, _IN1K = 117_266, 1_728_778, 19_020, 3_457, 64_115, 1_281_167
_UCF, _K700, _KUBRIC = 7_629, 570_465, 48_689
PAPER_SAMPLES: dict[str, int] = {
    "object_detection": _COCO + _O365,
    "instance_segmentation": _COCO + _ADE + _CITY,
    "panoptic_segmentation": _COCO + _ADE + _CITY,
    "pose_estimation": _POSE,
    "pose_to_image": _POSE,
    "depth_estimation": _IN1K,
    "depth_to_image": _IN1K + _COCO,
    "normal_estimation": _ADE + _CITY,
    "normal_to_image": _COCO + _ADE + _CITY,
    "edge_detection": _IN1K + _COCO,
    "inpainting": _IN1K + _COCO,
    "colorization": _IN1K + _COCO,
    "de_glass_blur": _IN1K + _COCO,
    "de_motion_blur": _IN1K + _COCO,
    "deraining": _IN1K + _COCO,
    "frame_prediction": _UCF + _K700 + _KUBRIC,
    "video_depth_estimation": _KUBRIC,
    "depth_to_video": _KUBRIC,
    "video_normal_estimation": _KUBRIC,
    "normal_to_video": _KUBRIC,
    "video_optical_flow": _KUBRIC,
    "video_instance_segmentation": _KUBRIC,
}
UNLISTED_SAMPLES: int = int(statistics.median(PAPER_SAMPLES.values()))
"""the count given to a task the table does not list (foreground_segmentation, a user's extra task): the median"""


def paper_task_weights(tasks: Iterable[str]) -> dict[str, float]:
    """Weights proportional to PAPER_SAMPLES for `tasks` (UNLISTED_SAMPLES for a task it lacks), summing to 1."""
    names = list(dict.fromkeys(str(t) for t in tasks))
    if not names:
        raise ValueError("tasks: expected at least one task name, got none")
    counts = {t: PAPER_SAMPLES.get(t, UNLISTED_SAMPLES) for t in names}
    total = float(sum(counts.values()))
    return {t: c / total for t, c in counts.items()}


def loader_task_weights(tasks, mixture: str, available: Iterable[str], where: str) -> dict[str, float]:
    """A loader's weighted tasks: `tasks` None (every available task), names or {task: weight} (zero weights
    dropped); mixture "paper" re-weights the named tasks by Table 2's counts. Raises ValueError naming unknown tasks
    (and what `where` provides) or an empty selection."""
    available = sorted(available)
    if tasks is None:
        weights = {t: 1.0 for t in available}
    elif isinstance(tasks, dict):
        weights = {str(t): float(w) for t, w in tasks.items() if float(w) > 0}
    else:
        weights = {str(t): 1.0 for t in tasks}
    unknown = sorted(set(weights) - set(available))
    if unknown:
        raise ValueError(f"tasks: {unknown} not provided by {where}; it provides {available}")
    if not weights:
        raise ValueError(f"tasks: no task with a weight > 0 (got {tasks})")
    return paper_task_weights(weights) if mixture == "paper" else weights
