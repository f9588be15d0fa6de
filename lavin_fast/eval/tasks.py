"""The paper's evaluation protocol (seed B.2): which metrics each task reports, how prediction and ground-truth
files are decoded, and the data-set accumulation (`Evaluator`). `lavin_fast.cli.eval` is a thin shell around it.

Decoding rules (all documented in docs/eval.md):
- RGB images (PNG/JPEG/...; 8- or 16-bit; gray is repeated to 3 channels, alpha dropped) -> float [3, H, W] in
  [0, 1].
- Depth: a prediction image is the grey encoding of lavin_fast.dense_maps -> mean of the channels in [0, 1] =
  relative depth (affine-aligned later, so its scale and offset do not matter); a colour-mapped image is
  refused. Ground truth: `.npy` float depth as is; a single-channel 16-bit
  PNG -> value / depth_scale (NYUv2 stores millimetres: depth_scale 1000 gives metres); 8-bit -> channel mean
  / 255. Pixels with ground truth <= 0 are invalid. `.npy` predictions are taken as relative depth as is.
- Normals: RGB rendering in [0, 1] -> n = 2 * rgb - 1, renormalised (lavin_fast.dense_maps); `.npy` files hold the
  vectors ([H, W, 3] or [3, H, W]) as is.
- Binary masks (detection boxes, foreground segmentation): mean over channels of the RGB map in [0, 1] >
  threshold (default 0.5) is foreground; the same rule for prediction and ground truth.
- A prediction whose size differs from its ground truth is resized to the ground truth's size (bilinear,
  antialiased when shrinking) before decoding; the number of resized files is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lavin_fast._optional import optional_import
from lavin_fast.dense_maps import image_to_depth, image_to_normals
from lavin_fast.eval import metrics as M
from lavin_fast.eval.fid import fid_from_features, load_inception
from lavin_fast.eval.lpips import load_lpips
from lavin_fast.eval.task_specs import KIND_METRICS, TASKS, TaskSpec  # noqa: F401  (re-exported)
from lavin_fast.media import IMAGE_SUFFIXES, read_image_array

cv2 = optional_import("cv2")


# the customary accuracy thresholds of normal estimation (percent of pixels with a smaller error)
NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)

IMAGE_EXTS = IMAGE_SUFFIXES + (".npy",)  # predictions may also be arrays
# suffixes removed from a file's stem to form its matching key (the sampler's and make-set's conventions)
KEY_SUFFIXES = ("_target", "_pred", "_prediction", "_output")


# --- files -------------------------------------------------------------------------------------------------


def file_key(path: Path) -> str:
    stem = path.stem
    for suf in KEY_SUFFIXES:
        if stem.endswith(suf) and len(stem) > len(suf):
            return stem[: -len(suf)]
    return stem


def list_files(folder: Path, skip_inputs: bool = False) -> dict[str, Path]:
    """key -> path of the image files in `folder` (not recursive). `skip_inputs` ignores `*_input.*` files (the
    query halves of a task folder). Two files with one key raise a ValueError."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTS:
            continue
        if skip_inputs and p.stem.endswith("_input"):
            continue
        k = file_key(p)
        if k in out:
            pair = {out[k].suffix.lower() == ".npy", p.suffix.lower() == ".npy"}
            if pair == {True, False}:  # NAME.png + NAME.npy (the sampler's depth/normal output): the exact values
                out[k] = out[k] if out[k].suffix.lower() == ".npy" else p
                continue
            raise ValueError(f"{folder}: two files match the name {k!r}: {out[k].name} and {p.name}")
        out[k] = p
    return out


@dataclass
class Matching:
    pairs: list[tuple[str, Path, Path]]
    """(key, prediction, ground truth), sorted by key."""
    pred_only: list[str]
    gt_only: list[str]


def match_files(pred_dir: Path, gt_dir: Path) -> Matching:
    pred = list_files(pred_dir)
    gt = list_files(gt_dir, skip_inputs=True)
    keys = sorted(set(pred) & set(gt))
    return Matching([(k, pred[k], gt[k]) for k in keys], sorted(set(pred) - set(gt)), sorted(set(gt) - set(pred)))


def _unit_range(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32)
    raise ValueError(f"{path}: unsupported pixel type {arr.dtype} (expected uint8, uint16 or float)")


def _chw(arr: np.ndarray, path: Path, channels: int | None = None) -> torch.Tensor:
    """HxW / HxWxC / CxHxW (C <= 4) array -> float tensor [C, H, W]."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected a 2-D or 3-D array, got shape {arr.shape}")
    if arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()
    if channels == 3 and t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    if channels is not None and t.shape[0] != channels:
        raise ValueError(f"{path}: expected {channels} channels, got array of shape {arr.shape}")
    return t


def load_rgb(path: Path) -> torch.Tensor:
    """Image file -> [3, H, W] float32 in [0, 1]."""
    return _chw(_unit_range(read_image_array(path), path), path, channels=3).contiguous()


def load_valid_mask(path: Path) -> torch.Tensor:
    """Mask file -> bool [H, W]: a pixel is valid where any channel is non-zero."""
    arr = read_image_array(path)
    return _chw(arr.astype(np.float32), path).amax(0) > 0


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[C, H, W] -> [C, *size], bilinear, antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False, antialias=shrink)[0]


def load_depth(path: Path, is_gt: bool, depth_scale: float) -> torch.Tensor:
    """Depth file -> [1, H, W] float64 (see the module docstring for the rules)."""
    arr = read_image_array(path)
    if path.suffix.lower() == ".npy":
        t = _chw(arr.astype(np.float64), path)
        if t.shape[0] != 1:
            raise ValueError(f"{path}: a depth .npy must hold one channel, got shape {arr.shape}")
        return t.double()
    if is_gt and arr.dtype == np.uint16 and arr.ndim == 2:
        return torch.from_numpy(arr.astype(np.float64) / depth_scale)[None]
    unit = _chw(_unit_range(arr, path), path)
    if unit.shape[0] == 1:
        return unit.double()
    # the shared grey encoding (lavin_fast.dense_maps); a colour-mapped rendering is refused, naming the file
    return image_to_depth(unit[:3] * 2 - 1, source=str(path)).double()


def load_normals(path: Path) -> torch.Tensor:
    """Normal file -> [3, H, W] vectors (RGB rendering decoded with n = 2 * rgb - 1; .npy as stored)."""
    if path.suffix.lower() == ".npy":
        return _chw(read_image_array(path).astype(np.float32), path, channels=3)
    return image_to_normals(load_rgb(path) * 2 - 1)


# --- the evaluation ---------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    task: str
    """A key of TASKS."""
    metrics: tuple[str, ...] = ()
    """Metrics to compute; empty = the task's paper metrics."""
    device: str = "cpu"
    """Where metrics and networks run."""
    lpips_weights: str | None = None
    """LPIPS state-dict file (needed when lpips is computed)."""
    fid_weights: str | None = None
    """Inception-v3 state-dict file (needed when fid is computed)."""
    mask_threshold: float = 0.5
    """Binary-mask rule: channel mean in [0, 1] above this is foreground."""
    depth_space: str = "depth"
    """Affine alignment of depth predictions in "depth" or "disparity" (inverse depth) space."""
    depth_scale: float = 1000.0
    """Divisor of 16-bit ground-truth depth PNGs (NYUv2: millimetres -> metres)."""
    fid_batch: int = 16
    """Images per Inception forward."""
    fid_resolution: int = 299
    """Side the images are resized to (bilinear) for Inception; 299 is the standard, smaller only for quick tests."""
    normal_hist_bins: int = 18000
    """Histogram bins over 0..180 degrees for the median angular error (0.01 degree resolution)."""

    def resolved_metrics(self) -> tuple[str, ...]:
        spec = TASKS[self.task]
        chosen = self.metrics or spec.metrics
        allowed = KIND_METRICS[spec.kind]
        bad = [m for m in chosen if m not in allowed]
        if bad:
            raise ValueError(f"metrics {bad} do not apply to task {self.task!r}; choose from {list(allowed)}")
        return tuple(dict.fromkeys(chosen))


@dataclass
class Evaluator:
    """Accumulates one (prediction, ground truth) pair at a time; `result()` gives the data-set numbers.

    Networks are loaded (and missing weights reported) at construction, before any file is read."""

    config: EvalConfig
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    resized: int = 0

    def __post_init__(self) -> None:
        cfg = self.config
        if cfg.task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {cfg.task!r}")
        if cfg.depth_space not in ("depth", "disparity"):
            raise ValueError(f"depth_space must be 'depth' or 'disparity', got {cfg.depth_space!r}")
        if not 0.0 <= cfg.mask_threshold <= 1.0:
            raise ValueError(f"mask_threshold must be in [0, 1], got {cfg.mask_threshold}")
        if cfg.depth_scale <= 0:
            raise ValueError(f"depth_scale must be > 0, got {cfg.depth_scale}")
        self.spec = TASKS[cfg.task]
        self.metric_names = cfg.resolved_metrics()
        self.device = torch.device(cfg.device)
        self.lpips = None
        self.inception = None
        if "lpips" in self.metric_names:
            self.lpips = load_lpips(cfg.lpips_weights, self.device)
        if "fid" in self.metric_names:
            if cfg.fid_resolution < 75:
                raise ValueError(
                    f"fid_resolution must be >= 75 (Inception-v3's smallest input), got {cfg.fid_resolution}"
                )
            self.inception = load_inception(cfg.fid_weights, self.device, resize=False)
        self._fid_pending: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._fid_feats: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._hist = torch.zeros(cfg.normal_hist_bins, dtype=torch.float64)
        self._ang_sum = 0.0
        self._within = dict.fromkeys(NORMAL_THRESHOLDS, 0)
        self._inter = 0
        self._union = 0

    # one pair ------------------------------------------------------------------------------------------
    def add(self, key: str, pred_path: Path, gt_path: Path, mask_path: Path | None = None) -> dict[str, float]:
        """Evaluate one pair (files decoded by the task's rules); returns and records its per-image row."""
        kind = self.spec.kind
        if kind == "depth":
            gt = load_depth(gt_path, True, self.config.depth_scale)
            pred = load_depth(pred_path, False, self.config.depth_scale)
        elif kind == "normal":
            gt, pred = load_normals(gt_path), load_normals(pred_path)
        else:
            gt, pred = load_rgb(gt_path), load_rgb(pred_path)
        for path, x in ((pred_path, pred), (gt_path, gt)):
            bad = int((~torch.isfinite(x)).sum())
            if bad:  # a "nan" metric with rc 0 would pass for a result
                raise ValueError(f"{path}: {bad} NaN/Inf value(s) of {x.numel()}; fix or remove the file")
        valid = None
        if mask_path is not None:
            valid = load_valid_mask(mask_path)
            if tuple(valid.shape) != tuple(gt.shape[-2:]):
                raise ValueError(
                    f"mask {mask_path} has size {tuple(valid.shape)}, its ground truth {tuple(gt.shape[-2:])}"
                )
            valid = valid.to(self.device)[None]
        pred = self._fit(pred, gt).to(self.device)[None]
        gt = gt.to(self.device)[None]
        if kind == "image":
            row = self._add_image(pred, gt)
        elif kind == "depth":
            row = self._add_depth(pred[:, 0], gt[:, 0], valid, gt_path)
        elif kind == "normal":
            row = self._add_normal(pred, gt, valid, gt_path)
        else:
            row = self._add_mask(pred, gt)
        self.per_image[key] = row
        return row

    def _fit(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        if pred.shape[-2:] != gt.shape[-2:]:
            self.resized += 1
            return resize_to(pred, tuple(gt.shape[-2:])).to(pred.dtype)
        return pred

    def _add_image(self, pred: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
        pred = pred.clamp(0, 1)
        row: dict[str, float] = {}
        if "mse" in self.metric_names:
            row["mse"] = float(M.mse(pred, gt)[0])
        if "psnr" in self.metric_names:
            row["psnr"] = float(M.psnr(pred, gt)[0])
        if "ssim" in self.metric_names:
            row["ssim"] = float(M.ssim(pred, gt)[0])
        if self.lpips is not None:
            with torch.no_grad():
                row["lpips"] = float(self.lpips(pred, gt)[0])
        if self.inception is not None:
            self._fid_pending[0].append(pred)
            self._fid_pending[1].append(gt)
            if len(self._fid_pending[0]) >= self.config.fid_batch:
                self._flush_fid()
        return row

    def _flush_fid(self) -> None:
        for pending, feats in zip(self._fid_pending, self._fid_feats, strict=True):
            if pending:
                # resized as the reference FID code does (bilinear, no antialias), so any input sizes stack
                size = (self.config.fid_resolution,) * 2
                batch = torch.cat([F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in pending])
                with torch.no_grad():
                    feats.append(self.inception(batch).double().cpu())
                pending.clear()

    def _add_depth(self, pred, gt, valid, gt_path) -> dict[str, float]:
        has = gt > 0 if valid is None else (gt > 0) & valid
        if not bool(has.any()):
            raise ValueError(f"{gt_path}: no valid ground-truth pixel (depth > 0 inside the mask)")
        out = M.aligned_depth_errors(pred, gt, valid, space=self.config.depth_space)
        return {k: float(out[k][0]) for k in ("abs_rel", "mse", "scale", "shift")}

    def _add_normal(self, pred, gt, valid, gt_path) -> dict[str, float]:
        ang, mask = M.angular_error(pred, gt, valid)
        sel = ang[mask]
        if sel.numel() == 0:
            raise ValueError(f"{gt_path}: no valid ground-truth normal (decoded length within [0.5, 1.5])")
        self._hist += torch.histc(sel.cpu(), bins=self.config.normal_hist_bins, min=0.0, max=180.0)
        self._ang_sum += float(sel.sum())
        for t in NORMAL_THRESHOLDS:
            self._within[t] += int((sel < t).sum())
        return {"angular_mean": float(sel.mean()), "valid_pixels": float(sel.numel())}

    def _add_mask(self, pred, gt) -> dict[str, float]:
        p = M.rgb_to_mask(pred, self.config.mask_threshold)
        g = M.rgb_to_mask(gt, self.config.mask_threshold)
        iou, inter, union = M.mask_iou(p, g)
        self._inter += int(inter[0])
        self._union += int(union[0])
        return {"iou": float(iou[0]), "intersection": float(inter[0]), "union": float(union[0])}

    # the data set ---------------------------------------------------------------------------------------
    def result(self) -> dict[str, float]:
        """Data-set metrics: means of per-image values; FID over all images; normals pooled over pixels."""
        rows = list(self.per_image.values())
        if not rows:
            raise ValueError("no image pairs were evaluated")
        mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
        out: dict[str, float] = {}
        kind = self.spec.kind
        if kind == "image":
            for k in ("mse", "psnr", "ssim", "lpips"):
                if k in self.metric_names:
                    out[k] = mean(k)
            if self.inception is not None:
                self._flush_fid()
                if len(rows) < 2:
                    raise ValueError("FID needs at least 2 image pairs")
                out["fid"] = fid_from_features(torch.cat(self._fid_feats[0]), torch.cat(self._fid_feats[1]))
        elif kind == "depth":
            for k in ("abs_rel", "mse"):
                if k in self.metric_names:
                    out[k] = mean(k)
        elif kind == "normal":
            n = float(self._hist.sum())
            width = 180.0 / self.config.normal_hist_bins
            cdf = torch.cumsum(self._hist, 0)
            out["angular_mean"] = self._ang_sum / n
            # the median is the centre of the first histogram bin whose cumulative count reaches half
            idx = int(torch.searchsorted(cdf, torch.tensor([n / 2], dtype=torch.float64))[0])
            out["angular_median"] = (idx + 0.5) * width
            for t in NORMAL_THRESHOLDS:
                out[f"within_{t:g}"] = 100.0 * self._within[t] / n
        else:
            out["miou"] = mean("iou")
            out["iou_pooled"] = self._inter / self._union if self._union else 1.0
        return out


def format_table(task: str, result: dict[str, float], n: int) -> str:
    """A two-column text table of the data-set metrics."""
    lines = [f"{task}: {n} image pairs", f"{'metric':<16}{'value':>14}", "-" * 30]
    for k, v in result.items():
        s = "inf" if math.isinf(v) else f"{v:.6g}"
        lines.append(f"{k:<16}{s:>14}")
    return "\n".join(lines)
