"""Online training from raw data: `data: {sources: [...], weights: {...}}` (loader -> frozen VAE -> step, a data
thread ahead of the step), the paper's task mixture, per-thread CUDA device binding, exact resume."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch

from lavin_fast.data.demo_data import demo_image_paths
from lavin_fast.data.incontext import build_incontext_loader
from lavin_fast.data.mixture import PAPER_SAMPLES, UNLISTED_SAMPLES, paper_task_weights
from lavin_fast.train.config import ConfigError, load_config
from lavin_fast.train.sources import BackgroundSource, SyntheticLatentSource
from lavin_fast.train.trainer import Trainer

TINY = {
    "model": "tiny",
    "model_overrides": {"depth": 1},
    "image_size": 32,
    "num_pairs": 1,
    "vae_overrides": {"block_out_channels": [8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4},
    "batch_size": 2,
    "micro_batch_size": 2,
    "device": "cpu",
    "precision": "fp32",
    "tensorboard": False,
    "progress": False,
    "log_every": 1,
    "null_prob": 0.0,
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for p in demo_image_paths()[:4]:
        shutil.copy(p, root / p.name)
    return root


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, photos):
    """Plain images (computed tasks) and depth_estimation pairs (the 'depth' is a photo's grey version)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("manifest")
    lines = []
    for p in sorted(photos.iterdir()):
        grey = root / f"{p.stem}_depth.png"
        Image.open(p).convert("L").convert("RGB").save(grey)
        lines.append({"image": str(p)})
        lines.append({"task": "depth_estimation", "input": str(p), "target": grey.name})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _train(out, data, steps=3, **over):
    cfg = load_config(None, {**TINY, "data": data, "steps": steps, "out_dir": str(out), "save_every": 100, **over})
    trainer = Trainer(cfg)
    return trainer, trainer.fit()


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_trains_online_from_a_folder_of_photos(tmp_path, photos):
    trainer, result = _train(tmp_path, {"sources": [str(photos)]})
    assert isinstance(trainer.source, BackgroundSource)  # the data thread runs ahead of the step
    assert result.step == 3 and all(np.isfinite(v) for _, v in result.losses)
    rows = _rows(tmp_path)
    assert all(0 <= r["data_wait_frac"] <= 1 for r in rows)
    for r in rows:
        shares = {k: v for k, v in r.items() if k.startswith("task_share/")}
        assert shares and sum(shares.values()) == pytest.approx(1.0)
    assert trainer.source._thread is None  # fit() stopped the data thread


def test_trains_online_from_a_manifest_with_the_paper_mixture(tmp_path, manifest):
    trainer, result = _train(tmp_path, {"sources": [str(manifest)], "queue": 0})
    loader = trainer.source.loader
    assert "depth_estimation" in loader.weights and "edge_detection" in loader.weights
    assert loader.weights == pytest.approx(paper_task_weights(loader.weights))
    assert result.step == 3 and all(np.isfinite(v) for _, v in result.losses)


def test_online_resume_is_exact(tmp_path, photos):
    data = {"sources": [str(photos)], "queue": 2}
    _, full = _train(tmp_path / "a", data, steps=4)

    class Crash(Exception):
        pass

    def crash_after_3(step, loss):
        if step >= 3:
            raise Crash

    cfg = load_config(None, {**TINY, "data": data, "steps": 4, "out_dir": str(tmp_path / "b"), "save_every": 2})
    first = Trainer(cfg)
    with pytest.raises(Crash):
        first.fit(on_step=crash_after_3)
    assert first.source._thread is None  # the crash stopped the data thread too
    again = Trainer(cfg)
    assert again.resumed_from is not None and again.step == 2
    rest = again.fit()
    assert [v for _, v in rest.losses] == [v for s, v in full.losses if s > 2]  # CPU: bit-exact


def test_drawn_task_shares_match_the_paper_mixture(manifest):
    """Chi-square of 4000 drawn tasks against the weights (all tasks of one frame layout: independent draws)."""
    loader = build_incontext_loader(
        str(manifest), resolution=32, n_pairs=1, batch_size=8, backend="torch", mixture="paper"
    )
    weights = loader.weights
    assert weights["depth_estimation"] / weights["edge_detection"] == pytest.approx(
        PAPER_SAMPLES["depth_estimation"] / PAPER_SAMPLES["edge_detection"]
    )
    names = sorted(weights)
    counts = dict.fromkeys(names, 0)
    for i in range(500):
        for plan in loader.maker.planner.plan(i):
            counts[plan.task] += 1
    n = sum(counts.values())
    expected = np.array([weights[t] for t in names]) * n
    chi2 = float((((np.array([counts[t] for t in names]) - expected) ** 2) / expected).sum())
    assert chi2 < 22.46, (chi2, counts)  # the 0.999 quantile of chi-square with 6 degrees of freedom
    # user weights replace the mixture
    given = build_incontext_loader(
        str(manifest),
        resolution=32,
        n_pairs=1,
        batch_size=8,
        backend="torch",
        tasks={"inpainting": 1, "depth_estimation": 3},
    )
    assert given.weights == {"inpainting": 1.0, "depth_estimation": 3.0}


def test_paper_weights_sum_per_task_and_cover_unlisted_tasks():
    w = paper_task_weights(["edge_detection", "object_detection", "foreground_segmentation"])
    assert sum(w.values()) == pytest.approx(1.0)
    total = 1_281_167 + 117_266 + 117_266 + 1_728_778 + UNLISTED_SAMPLES
    assert w["object_detection"] == pytest.approx((117_266 + 1_728_778) / total)
    with pytest.raises(ValueError, match="tasks"):
        paper_task_weights([])


class _FakeCuda:
    """torch.cuda.set_device recorded per thread (CUDA's current device is per thread)."""

    def __init__(self):
        self.local = threading.local()
        self.calls = []

    def set_device(self, device):
        index = torch.device(device).index if not isinstance(device, int) else device
        self.local.device = index
        self.calls.append((threading.current_thread().name, index))

    def current(self):
        return getattr(self.local, "device", 0)


def test_data_thread_binds_the_ranks_device(monkeypatch):
    fake = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "set_device", fake.set_device)
    seen = []

    class Inner(SyntheticLatentSource):
        def next_batch(self):
            seen.append((threading.current_thread().name, fake.current()))
            return super().next_batch()

    src = BackgroundSource(Inner(micro_batch=1), depth=2, device=torch.device("cuda", 1))
    src.next_batch()
    src.close()
    assert seen and all(name != threading.main_thread().name and dev == 1 for name, dev in seen)
    assert fake.current() == 0  # the main thread's device was left alone


def test_dali_loader_thread_binds_the_ranks_device(monkeypatch, photos):
    """The loader's DALI thread (where the pipelines are built) binds device_id before making any batch."""
    fake = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "set_device", fake.set_device)
    loader = build_incontext_loader(str(photos), resolution=32, batch_size=1, backend="dali", device="gpu", device_id=3)
    seen = []

    def make(index, known_bad):
        seen.append((threading.current_thread().name, fake.current()))
        return "batch", {}

    monkeypatch.setattr(loader.maker, "make", make)
    assert next(loader) == "batch"
    loader.close()
    assert seen and all(name.startswith("lavin-fast-data") and dev == 3 for name, dev in seen)


def test_online_data_config_errors(tmp_path, photos):
    def bad(data, match, **over):
        with pytest.raises(ConfigError, match=match):
            load_config(None, {**TINY, "data": data, "out_dir": str(tmp_path), **over})

    bad({"sources": [str(tmp_path / "nope")]}, "sources not found")
    bad({"sources": []}, "non-empty list")
    bad({"sources": [str(photos)], "wieghts": {}}, "unknown keys")
    bad({"sources": [str(photos)], "weights": {"no_such_task": 1.0}}, "unknown tasks")
    bad({"sources": [str(photos)], "weights": {"inpainting": -1.0}}, ">= 0")
    bad({"sources": [str(photos)], "queue": -1}, "queue")
    bad({"sources": [str(photos)], "weights": {"inpainting": 1.0}}, "tasks", tasks=["colorization"])
    bad("dmeo", "demo")
    # the command line: a mapping in YAML, or a list of sources
    cfg = load_config(None, ["--data", f"[{photos}]", "--out-dir", str(tmp_path)])
    assert cfg.data == {"sources": [str(photos)]}


def test_sources_not_providing_the_weighted_task_is_a_config_error(tmp_path, photos):
    cfg = load_config(
        None, {**TINY, "data": {"sources": [str(photos)], "weights": {"depth_estimation": 1}}, "out_dir": str(tmp_path)}
    )
    with pytest.raises(ConfigError, match="depth_estimation"):
        Trainer(cfg)


def test_data_thread_errors_reach_the_step():
    class Broken(SyntheticLatentSource):
        def next_batch(self):
            if self.position >= 1:
                raise OSError("disk gone")
            return super().next_batch()

    src = BackgroundSource(Broken(micro_batch=1), depth=2, device="cpu")
    src.next_batch()
    with pytest.raises(OSError, match="disk gone"):
        src.next_batch()
    assert src._thread is None and src.state_dict() == {"position": 1}  # the last batch taken
