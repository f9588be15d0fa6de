"""The computed tasks' degradations made by the libraries the paper names (the paper's Table 2): OpenCV's
Canny and grayscale, Albumentations' GlassBlur, MotionBlur and RandomRain (albumentations 2.0.8, OpenCV
4.8+ / 5.0). The CPU path of `lavin_fast.data.tasks` and the evaluation sets use these; the GPU path uses
the torch versions in tasks.py, which take the same drawn parameters and are tested against these.

Each function takes one uint8 RGB image [H, W, 3] (numpy) and the parameters drawn by tasks.py, calls the
library's own function with them (the transform's `apply`, not its random draw, so that the draws come
from the caller's torch.Generator) and returns uint8 [H, W, 3] (Canny: a bool [H, W] edge map).
OpenCV and Albumentations are imported inside the functions: they are the `data` extra's packages.
"""

from __future__ import annotations

import functools

import numpy as np

from lavin_fast._optional import optional_import

CANNY_THRESHOLDS = (100.0, 200.0)
DROP_COLOR = (200, 200, 200)
BRIGHTNESS = 0.7
"""RandomRain's defaults: drop colour and brightness coefficient"""


@functools.cache
def available() -> bool:
    """Whether OpenCV and Albumentations import (the `data` extra is installed)."""
    try:
        optional_import("albumentations")
        optional_import("cv2")
    except ImportError:
        return False
    return True


def canny(u8: np.ndarray) -> np.ndarray:
    """cv2.Canny of the BT.601 grayscale, thresholds 100 / 200, 3x3 Sobel, L1 magnitude -> bool [H, W]."""
    cv2 = optional_import("cv2")

    return cv2.Canny(cv2.cvtColor(u8, cv2.COLOR_RGB2GRAY), *CANNY_THRESHOLDS) > 0


def grayscale(u8: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(RGB2GRAY) (BT.601, rounded) in three equal channels."""
    cv2 = optional_import("cv2")

    return np.repeat(cv2.cvtColor(u8, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)


class _Draws:
    """Stands in for the random.Random that create_motion_kernel draws its kernel shift from: hands back
    the values drawn beforehand from the caller's generator."""

    def __init__(self, values):
        self.values = list(values)

    def uniform(self, a: float, b: float) -> float:
        return self.values.pop(0)


def motion_kernel(size: int, angle: float, direction: float, shift: tuple[float, float]) -> np.ndarray:
    """Albumentations' MotionBlur kernel (create_motion_kernel, allow_shifted) for drawn parameters, normalised."""
    fblur = optional_import("albumentations.augmentations.blur.functional")

    k = fblur.create_motion_kernel(size, angle, direction, allow_shifted=True, random_state=_Draws(shift))
    return k.astype(np.float32) / np.sum(k)


def motion_blur(u8: np.ndarray, size: int, angle: float, direction: float, shift: tuple[float, float]) -> np.ndarray:
    """MotionBlur.apply: cv2.filter2D with the kernel (reflect-101 border)."""
    fpixel = optional_import("albumentations.augmentations.pixel.functional")

    return fpixel.convolve(u8, kernel=motion_kernel(size, angle, direction, shift))


def glass_blur(u8: np.ndarray, sigma: float, max_delta: int, iterations: int, dxy: np.ndarray) -> np.ndarray:
    """GlassBlur.apply ("fast" mode): Gaussian blur, `iterations` rounds of pixel swaps by `dxy`, Gaussian blur."""
    fblur = optional_import("albumentations.augmentations.blur.functional")

    return fblur.glass_blur(u8, sigma, max_delta, iterations, dxy, "fast")


def rain(u8: np.ndarray, slant: float, drop_length: int, blur_value: int, drops: np.ndarray) -> np.ndarray:
    """RandomRain.apply: 1-px LINE_4 streaks of DROP_COLOR, box-blurred, added (saturating), then x BRIGHTNESS."""
    fpixel = optional_import("albumentations.augmentations.pixel.functional")

    return fpixel.add_rain(u8, slant, drop_length, 1, DROP_COLOR, blur_value, BRIGHTNESS, drops)
