"""The demo's task mixture: `tasks` as a {task: weight} mapping in the training config sets the mixture the
latent-cache loader draws (the demo trains colorization and grayscale half and half); a list keeps the paper's
mixture (for these two tasks 91% colorization, which the demo trained on before)."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F

from lavin_fast.data.latent_cache import build_latent_cache
from lavin_fast.data.mixture import PAPER_SAMPLES, UNLISTED_SAMPLES
from lavin_fast.parallel.distributed import DistContext
from lavin_fast.train.config import load_config
from lavin_fast.train.sources import build_source

TASKS = ("colorization", "grayscale")


def _encoder(x: torch.Tensor) -> torch.Tensor:
    """NOT the ST-VAE: pixels [P, 3, 1, H, W] -> [P, 4, 1, H/4, W/4] (4x4 average pooling, a fourth channel)."""
    y = F.avg_pool2d(x[:, :, 0], 4)
    return torch.cat([y, y.mean(1, keepdim=True)], 1)[:, :, None]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    build_latent_cache("demo", _encoder, root, resolution=16, tasks=list(TASKS), backend="torch")
    return root


def _share(cache, tasks, batches: int = 100) -> float:
    """The fraction of grayscale sequences over `batches` batches of 8 from the loader the trainer builds."""
    cfg = load_config(
        None, {"data": "latent-cache", "latent_cache": str(cache), "tasks": tasks, "micro_batch_size": 8,
               "batch_size": 8, "num_pairs": 2}
    )  # fmt: skip
    ctx = DistContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"), initialized=False)
    loader = build_source(cfg, ctx).loader  # the trainer's path: config -> source -> loader
    counts = collections.Counter()
    for _ in range(batches):
        counts.update(next(loader).task)
    assert set(counts) <= set(TASKS)
    return counts["grayscale"] / sum(counts.values())


@pytest.mark.parametrize(
    ("tasks", "expected"),
    [
        ({"colorization": 1.0, "grayscale": 1.0}, 0.5),  # what the demo passes
        ("{colorization: 3, grayscale: 1}", 0.25),  # the command-line form of a mapping
    ],
)
def test_task_mapping_sets_the_mixture(cache, tasks, expected):
    # 800 draws: a binomial sd of at most 0.018, so 0.07 is about 4 sd (and the paper's 0.09 is far outside)
    assert abs(_share(cache, tasks) - expected) < 0.07


def test_task_list_keeps_the_paper_mixture(cache):
    grey = PAPER_SAMPLES.get("grayscale", UNLISTED_SAMPLES)  # the table has no grayscale row: the median count
    paper = grey / (grey + PAPER_SAMPLES["colorization"])
    assert paper < 0.2  # why the demo gives a mapping: a list would train grayscale on a tenth of the batches
    assert abs(_share(cache, list(TASKS)) - paper) < 0.05
