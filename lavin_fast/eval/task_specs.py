"""The evaluation tasks as data: name, file kind, the paper's metrics and protocol (B.2). Imports nothing heavy, so
`lavin-fast eval --help` lists the tasks without loading torch or OpenCV; lavin_fast.eval.tasks re-exports them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    """Task name on the command line (the data builders' names where a builder exists)."""
    kind: str
    """How files decode: "image", "depth", "normal" or "mask"."""
    metrics: tuple[str, ...]
    """The paper's metrics for the task (B.2), in report order."""
    protocol: str
    """One line: the test set and protocol the paper used."""


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("colorization", "image", ("lpips", "mse"), "1,000 ImageNet-1K val images turned grayscale"),
        TaskSpec("inpainting", "image", ("lpips", "fid"), "1,000 ImageNet-1K val images, a 128x128 box masked"),
        TaskSpec("depth_estimation", "depth", ("abs_rel", "mse"), "NYUv2 test (654), affine least-squares alignment"),
        TaskSpec("surface_normal", "normal", ("angular",), "NYUv2 test, mean angular error"),
        TaskSpec("depth_to_image", "image", ("lpips", "fid"), "NYUv2 (1,449) from Depth-Anything-V2 pseudo labels"),
        TaskSpec("normal_to_image", "image", ("lpips", "fid"), "NYUv2 (1,449) from Stable-Normal pseudo labels"),
        TaskSpec("object_detection", "mask", ("miou",), "Pascal-5i, single-object boxes as binary masks"),
        TaskSpec("foreground_segmentation", "mask", ("miou",), "Pascal-5i (4 splits), binary masks"),
        TaskSpec("deraining", "image", ("psnr", "ssim"), "1,000 ImageNet-1K val images with synthetic rain"),
        TaskSpec("de_motion_blur", "image", ("psnr", "ssim"), "1,000 ImageNet-1K val images with motion blur"),
    )
}

# metrics each kind of task can compute (a subset may be chosen with --metrics)
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "image": ("mse", "psnr", "ssim", "lpips", "fid"),
    "depth": ("abs_rel", "mse"),
    "normal": ("angular",),
    "mask": ("miou",),
}
