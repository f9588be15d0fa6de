"""The demo's prediction is the mean of `samples` decoded samples (lavin_fast.cli.demo.sample_queries): checked
against separately drawn single samples with the documented seeds, averaged here with numpy, and the gap figures
recomputed from the averaged picture with numpy's PSNR."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lavin_fast.cli.demo import QUICK_DIT, QUICK_VAE, sample_queries
from lavin_fast.flow.pipeline import SamplerOptions
from lavin_fast.media import save_image
from lavin_fast.models.dit import build_dit
from lavin_fast.models.vae import build_vae


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images in [-1, 1], on the [0, 1] scale."""
    mse = np.mean(((a + 1) / 2 - (b + 1) / 2) ** 2, dtype=np.float64)
    return float(10 * np.log10(1.0 / mse))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("demo_samples")
    g = torch.Generator().manual_seed(1)
    paths = []
    for name in ("astronaut", "motorcycle_left", "retina", "held"):
        p = root / f"{name}.png"
        save_image(torch.rand(3, 16, 16, generator=g) * 2 - 1, p)
        paths.append(p)
    vae = build_vae(**QUICK_VAE).eval()
    dit = build_dit("tiny", **QUICK_DIT).eval()
    return dit, vae, paths[:3], paths[3:]


def _predictions(rows) -> np.ndarray:
    return torch.stack([r[5] for r in rows]).numpy()


def test_prediction_is_the_mean_of_the_seeded_samples(setup):
    dit, vae, train, held = setup
    opts = SamplerOptions(num_points=3, grid="uniform", guidance=1.5, seed=3, batch=4)
    tasks = ["colorization", "grayscale"]
    rows, labels, _, records = sample_queries(dit, vae, tasks, train, held, opts, 0, samples=3)
    singles = [
        _predictions(sample_queries(dit, vae, tasks, train, held, dataclasses.replace(opts, seed=3 * 3 + i), 0)[0])
        for i in range(3)
    ]
    assert not np.allclose(singles[0], singles[1], atol=1e-3)  # the samples differ, so the mean is not one of them
    mean = np.mean(np.stack(singles), axis=0)
    np.testing.assert_allclose(_predictions(rows), mean, atol=1e-5)
    assert len(records) == len(rows) == 4 == len(labels)
    for row, rec in zip(rows, records, strict=True):
        pred, through, answer = row[5].numpy(), row[6].numpy(), row[7].numpy()
        assert abs(rec["prediction_vs_answer_db"] - _psnr(pred, answer)) < 0.02
        assert abs(rec["gap_db"] - (_psnr(through, answer) - _psnr(pred, answer))) < 0.02


def test_one_sample_keeps_the_seed(setup):
    dit, vae, train, held = setup
    opts = SamplerOptions(num_points=3, grid="uniform", guidance=1.5, seed=5, batch=4)
    one = _predictions(sample_queries(dit, vae, ["colorization"], train, held, opts, 0, samples=1)[0])
    other = _predictions(
        sample_queries(dit, vae, ["colorization"], train, held, dataclasses.replace(opts, seed=6), 0)[0]
    )
    again = _predictions(sample_queries(dit, vae, ["colorization"], train, held, opts, 0)[0])
    np.testing.assert_array_equal(one, again)
    assert not np.allclose(one, other, atol=1e-3)
