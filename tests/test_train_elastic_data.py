"""Elastic data resume for the random-access loaders (the in-context pixel loader and the latent-cache loader):
a run resumed on another number of processes sees, step by step, the global samples of an uninterrupted run
(no repeat, no skip), because every draw is keyed by the global sample index (LoaderConfig.elastic) and the
trainer's sources seek to `samples_seen` (train/resume.py)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket

import pytest
import torch

from lavin_fast.data.demo_data import demo_image_paths
from lavin_fast.data.incontext import build_incontext_loader
from lavin_fast.data.incontext.config import LoaderConfig
from lavin_fast.data.incontext.planner import Planner
from lavin_fast.data.incontext.sources import TaskPool
from lavin_fast.data.latent_cache import LatentCacheLoader, build_latent_cache

TASKS = {"colorization": 1.0, "inpainting": 1.0, "grayscale": 1.0}


def _pools() -> dict[str, TaskPool]:
    """Two layout groups (one-frame images and 5-frame clips) without any file behind them."""
    clips = [type("Clip", (), {"frames": 12})() for _ in range(7)]
    return {
        "colorization": TaskPool("colorization", "computed", [f"img{i}" for i in range(11)], n_pairs=2),
        "inpainting": TaskPool("inpainting", "computed", [f"img{i}" for i in range(11)], n_pairs=2),
        "frame_prediction": TaskPool("frame_prediction", "clip", clips, 5, 5, 1),
    }


def _global_plans(world: int, batch: int, batches: int, elastic: bool = True, span: int | None = 8):
    """Global sample index -> (layout signature, task, pair draws), from `world` planners of `batch` samples."""
    weights = {"colorization": 1.0, "inpainting": 1.0, "frame_prediction": 1.0}
    out = {}
    for rank in range(world):
        cfg = LoaderConfig(batch_size=batch, shard_id=rank, num_shards=world, seed=3, elastic=elastic,
                           layout_span=span if elastic else None)  # fmt: skip
        planner = Planner(_pools(), weights, cfg)
        for i in range(batches):
            for j, plan in enumerate(planner.plan(i)):
                g = (i * world + rank) * batch + j  # rank r takes samples [r*b, (r+1)*b) of each global micro-batch
                draws = [(p.item, p.start, p.window, p.flip) for p in plan.pairs]
                out[g] = (_pools()[plan.task].signature(), plan.task, draws)
    return out


def test_elastic_plans_are_the_same_global_stream_for_any_number_of_ranks():
    one = _global_plans(1, 8, 6)
    assert len({v[0] for v in one.values()}) == 2  # both layouts occur
    for g in range(0, 48, 8):  # one layout per span of 8 global samples
        assert len({one[k][0] for k in range(g, g + 8)}) == 1
    assert _global_plans(2, 4, 6) == one
    assert _global_plans(4, 1, 12) == one
    assert _global_plans(2, 2, 12) == one
    # the per-rank streams (elastic=False) are not: another world draws other samples
    assert _global_plans(2, 4, 6, elastic=False) != _global_plans(1, 8, 6, elastic=False)


def test_layout_span_must_hold_whole_global_micro_batches():
    with pytest.raises(ValueError, match="layout_span"):
        LoaderConfig(batch_size=2, num_shards=2, elastic=True, layout_span=6).validate()
    LoaderConfig(batch_size=2, num_shards=2, elastic=True, layout_span=8).validate()


def _pixels(loader, n):
    return [next(loader) for _ in range(n)]


def test_incontext_loader_seek_continues_the_global_stream():
    """2 ranks of 1 sample for 3 batches, then 1 rank of 2 seeks to sample 6: together the pixels of one
    uninterrupted rank of 2 samples per batch."""
    kw = dict(resolution=16, n_pairs=1, tasks=TASKS, backend="torch", elastic=True, layout_span=2)
    full = _pixels(build_incontext_loader("demo", batch_size=2, **kw), 5)
    halves = [build_incontext_loader("demo", batch_size=1, shard_id=r, num_shards=2, **kw) for r in range(2)]
    parts = [_pixels(h, 3) for h in halves]
    rest = build_incontext_loader("demo", batch_size=2, **kw)
    rest.seek(6)
    after = _pixels(rest, 2)
    for i in range(3):
        assert torch.equal(torch.cat([parts[0][i].context, parts[1][i].context]), full[i].context)
        assert torch.equal(torch.cat([parts[0][i].target, parts[1][i].target]), full[i].target)
        assert parts[0][i].task + parts[1][i].task == full[i].task
    for a, b in zip(after, full[3:], strict=True):
        assert torch.equal(a.context, b.context) and a.task == b.task
    with pytest.raises(ValueError, match="not a whole number"):
        halves[0].seek(3)
    per_rank = build_incontext_loader("demo", batch_size=2, resolution=16, n_pairs=1, tasks=TASKS, backend="torch")
    assert not per_rank.can_seek
    with pytest.raises(ValueError, match="elastic=False"):
        per_rank.seek(4)


def test_a_state_saved_before_elastic_streams_continues_at_its_position(caplog):
    """A checkpoint of a per-rank stream (no `elastic` key: written before this version) resumed on the same number
    of ranks by the trainer's elastic loader: the same batch index, this loader's draws, a warning; any other change
    of the stream is still refused."""
    kw = dict(resolution=16, n_pairs=1, tasks=TASKS, backend="torch", batch_size=2)
    old = build_incontext_loader("demo", **kw)
    for _ in range(3):
        next(old)
    state = {k: v for k, v in old.state_dict().items() if k not in ("elastic", "layout_span")}
    new = build_incontext_loader("demo", elastic=True, layout_span=2, **kw)
    with caplog.at_level("WARNING", logger="lavin_fast.data.incontext.planner"):
        new.load_state_dict(state)
    assert "keyed otherwise" in caplog.text
    fresh = build_incontext_loader("demo", elastic=True, layout_span=2, **kw)
    assert torch.equal(next(new).context, fresh.batch_at(3).context)
    with pytest.raises(ValueError, match="seed"):
        new.load_state_dict({**state, "seed": 1})


class PoolEncoder:
    """NOT the ST-VAE: pixels [P, 3, T, H, W] -> 16 channels at 1/4 resolution by average pooling (deterministic)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.avg_pool3d(x, (1, 4, 4))
        return torch.cat([z, -z, 2 * z, z * z, z.abs(), z + 1], 1)[:, :16]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for p in demo_image_paths()[:5]:
        shutil.copy(p, root / p.name)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory, photos):
    out = tmp_path_factory.mktemp("cache")
    build_latent_cache([str(photos)], PoolEncoder(), out, resolution=32, tasks=sorted(TASKS), copies=2,
                       backend="torch")  # fmt: skip
    return out


def test_latent_cache_loader_seek_continues_the_global_stream(cache):
    kw = dict(n_pairs=1, tasks=TASKS, elastic=True, layout_span=4)
    full = _pixels(LatentCacheLoader(cache, batch_size=2, **kw), 6)
    quarters = [LatentCacheLoader(cache, batch_size=1, shard_id=r, num_shards=4, **kw) for r in range(4)]
    for q in quarters:
        q.seek(4)  # after two global batches of 2
    after = [_pixels(q, 2) for q in quarters]  # samples 4..11
    for i in range(2):
        ctx = torch.cat([after[r][i].context for r in range(4)])
        assert torch.equal(ctx, torch.cat([full[2 + 2 * i].context, full[3 + 2 * i].context]))
    assert not LatentCacheLoader(cache, batch_size=2, n_pairs=1, tasks=TASKS).can_seek


# --- through the trainer: 2 -> 1 and 1 -> 2 gloo processes --------------------------------------------------

TINY = {
    "model": "tiny",
    "model_overrides": {"depth": 1},
    "image_size": 32,
    "num_pairs": 1,
    "vae_overrides": {"block_out_channels": [8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4},
    "batch_size": 2,
    "micro_batch_size": 1,  # world 2: one micro-step per step; world 1: two (the same VAE shapes on both sides)
    "device": "cpu",
    "precision": "fp32",
    "tensorboard": False,
    "progress": False,
    "log_every": 1,
    "null_prob": 0.0,
    "save_every": 2,
}


class Recording:
    """The trainer's real source, recording a fingerprint of every sample it hands to the step (per rank, in
    order); everything else (seek included, when the source has it) is the source's own."""

    def __init__(self, inner, path: pathlib.Path):
        self.inner, self.path, self.seen = inner, path, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def next_batch(self):
        x, c = self.inner.next_batch()
        for i in range(x.shape[0]):
            self.seen.append([float(v) for v in (x[i].sum(), c[i].sum(), c[i].abs().sum(), x[i, 0].max())])
        self.path.write_text(json.dumps(self.seen))
        return x, c


def elastic_run(overrides: dict, tag: str) -> list[float]:
    """Train (one rank of a gloo group when the environment names one) and record the samples seen as
    out_dir/seen_{tag}_rank{r}.json; returns the losses."""
    from lavin_fast.parallel.distributed import teardown
    from lavin_fast.train.config import load_config
    from lavin_fast.train.sources import build_source
    from lavin_fast.train.trainer import Trainer

    cfg = load_config(None, {**TINY, **overrides})
    out = pathlib.Path(cfg.out_dir)

    def factory(c, ctx):
        return Recording(build_source(c, ctx), out / f"seen_{tag}_rank{ctx.rank}.json")

    trainer = Trainer(cfg, source_factory=factory)
    losses = [v for _, v in trainer.fit().losses]
    if trainer.ctx.is_main:
        (out / f"losses_{tag}.json").write_text(json.dumps(losses))
    teardown(trainer.ctx)
    return losses


def _worker(rank: int, ports: list[int], runs: list[tuple[dict, str]]) -> None:
    torch.set_num_threads(1)
    for port, (overrides, tag) in zip(ports, runs, strict=True):
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
        elastic_run(overrides, tag)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(out: pathlib.Path, tag: str, world: int) -> list[list]:
    """The samples of each optimizer step (batch 2): world 1 records them in order, world 2 one per rank."""
    ranks = [json.loads((out / f"seen_{tag}_rank{r}.json").read_text()) for r in range(world)]
    flat = ranks[0] if world == 1 else [s for pair in zip(*ranks, strict=True) for s in pair]
    return [sorted(flat[k : k + 2]) for k in range(0, len(flat), 2)]


@pytest.mark.slow  # one spawn of 2 processes (two runs inside it) per loader
@pytest.mark.parametrize("loader", ["online", "latent-cache"])
def test_elastic_resume_sees_the_samples_of_an_uninterrupted_run(tmp_path, photos, cache, loader):
    """2 -> 1: two processes train steps 1-2, one process resumes for steps 3-4; 1 -> 2: the reverse. Step by
    step, the samples seen (fingerprints of the latents handed to the step) are those of one uninterrupted
    process, and so are the losses. Before elastic streams, both resumes restarted the loaders' streams."""
    import torch.multiprocessing as mp

    if loader == "online":
        kw = {"data": {"sources": [str(photos)], "weights": TASKS, "backend": "torch", "queue": 1}}
    else:
        kw = {"data": "latent-cache", "latent_cache": str(cache), "tasks": sorted(TASKS)}
    full_dir, up, down = (str(tmp_path / n) for n in ("full", "up", "down"))
    full = elastic_run({**kw, "steps": 4, "out_dir": full_dir}, "all")
    first_up = elastic_run({**kw, "steps": 2, "out_dir": up}, "first")
    runs = [({**kw, "steps": 2, "out_dir": down}, "first"), ({**kw, "steps": 4, "out_dir": up}, "rest")]
    mp.spawn(_worker, args=([_free_port(), _free_port()], runs), nprocs=2, join=True)
    rest_down = elastic_run({**kw, "steps": 4, "out_dir": down}, "rest")

    want = _steps(tmp_path / "full", "all", 1)
    assert len(want) == 4 and len({tuple(round(v, 2) for v in s) for step in want for s in step}) == 8  # distinct
    got_up = _steps(tmp_path / "up", "first", 1) + _steps(tmp_path / "up", "rest", 2)
    got_down = _steps(tmp_path / "down", "first", 2) + _steps(tmp_path / "down", "rest", 1)
    for got, name in ((got_up, "1 -> 2"), (got_down, "2 -> 1")):
        assert len(got) == 4, name
        for k, (a, b) in enumerate(zip(got, want, strict=True)):  # the VAE's float sums: a tolerance
            assert [v for s in a for v in s] == pytest.approx([v for s in b for v in s], rel=1e-4, abs=1e-4), (name, k)
    rest_up = json.loads((tmp_path / "up" / "losses_rest.json").read_text())
    first_down = json.loads((tmp_path / "down" / "losses_first.json").read_text())
    assert first_up + rest_up == pytest.approx(full, rel=1e-4, abs=1e-6)
    assert first_down + rest_down == pytest.approx(full, rel=1e-4, abs=1e-6)
