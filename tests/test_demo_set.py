"""The demo's training set (lavin_fast.data.demo_data.write_demo_set): held-out photographs never in train/,
augmented crops that vary and are reproducible from the seed."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from lavin_fast.data.demo_data import DEMO_HELD_OUT_PHOTOS, augmented_crop, demo_image_paths, write_demo_set

pytest.importorskip("skimage")


def _digest(paths) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_held_out_never_in_train_and_crops_reproducible(tmp_path):
    train, held, crops = write_demo_set(tmp_path / "a", 32, crops=3, seed=5)
    held_stems = {name.rsplit(".", 1)[0] for name in DEMO_HELD_OUT_PHOTOS}
    assert {p.stem for p in held} == held_stems
    in_train = {p.name for p in (tmp_path / "a" / "train").iterdir()}
    assert len(in_train) == len(train) + len(crops) == len(train) * 4
    assert not any(name.split("_crop")[0].rsplit(".", 1)[0] in held_stems for name in in_train)
    assert len(train) + len(held) == len(demo_image_paths())
    _, _, again = write_demo_set(tmp_path / "b", 32, crops=3, seed=5)
    assert _digest(crops) == _digest(again)
    _, _, other = write_demo_set(tmp_path / "c", 32, crops=3, seed=6)
    assert sum(a != b for a, b in zip(_digest(crops), _digest(other), strict=True)) >= len(crops) - 1


def test_augmented_crop_varies_scale_flip_and_colour():
    yy, xx = np.mgrid[0:200, 0:300]
    image = Image.fromarray(np.stack([xx * 255 // 299, yy * 255 // 199, 128 + 0 * xx], -1).astype(np.uint8))
    rng = np.random.default_rng(0)
    crops = [np.asarray(augmented_crop(image, 16, rng), dtype=np.float32) for _ in range(40)]
    assert all(c.shape == (16, 16, 3) for c in crops)
    # red rises left to right in the source: a flipped crop has it falling
    slopes = [c[:, -1, 0].mean() - c[:, 0, 0].mean() for c in crops]
    assert sum(s < 0 for s in slopes) >= 8 and sum(s > 0 for s in slopes) >= 8
    # several scales: the red range across a crop spans from under half to nearly all of the source's
    spans = [abs(s) for s in slopes]
    assert min(spans) < 0.5 * max(spans)
    # colour jitter: the blue channel (constant 128 in the source) takes different values
    blues = [c[..., 2].mean() for c in crops]
    assert max(blues) - min(blues) > 20
    with pytest.raises(ValueError, match="crops"):
        write_demo_set("unused", 16, crops=-1)


def test_extra_and_grey_photographs_train_only(tmp_path):
    pytest.importorskip("matplotlib")
    from lavin_fast.data.demo_data import GREY_IMAGE_FILES, extra_image_paths

    extra = extra_image_paths(grey=True)
    assert "grace_hopper.jpg" in {p.name for p in extra}
    train, held, crops = write_demo_set(tmp_path, 16, crops=1, extra=True, grey=True, min_scale=0.5)
    stems = {p.stem for p in train}
    assert {p.stem for p in extra} <= stems and not stems & {p.stem for p in held}
    assert len(train) == len(demo_image_paths()) - len(held) + len(extra) == len(crops)
    grey = next(p for p in train if p.stem == GREY_IMAGE_FILES[0].rsplit(".", 1)[0])
    a = np.asarray(Image.open(grey).convert("RGB"), dtype=np.int16)
    assert np.abs(a[..., 0] - a[..., 1]).max() <= 1 and np.abs(a[..., 1] - a[..., 2]).max() <= 1  # grey as RGB
