"""Latent cache: build with a stand-in encoder, read back as in-context latent batches, resume."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lavin_fast.data.latent_cache import LatentCacheLoader, build_latent_cache


class AvgPoolEncoderTestDouble:
    """NOT the ST-VAE: a test double with the same interface. Pixels [P, 3, T, H, W] -> 16
    channels at 1/8 resolution (8x8 average pooling, a fixed 3 -> 16 projection), time kept at
    1 + (T - 1) // 4 frames like the ST-VAE's causal temporal factor 4."""

    def __init__(self):
        self.proj = torch.linspace(-1, 1, 48).view(16, 3)
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        p, c, t, h, w = x.shape
        keep = [0] + list(range(4, t, 4))
        y = F.avg_pool2d(x[:, :, keep].transpose(1, 2).reshape(-1, c, h, w), 8)
        y = torch.einsum("oc,nchw->nohw", self.proj, y)
        return y.view(p, len(keep), 16, h // 8, w // 8).transpose(1, 2)


def test_cache_roundtrip_and_latent_batches(tmp_path):
    enc = AvgPoolEncoderTestDouble()
    index = build_latent_cache(
        "demo",
        enc,
        tmp_path,
        resolution=32,
        tasks=["colorization", "frame_prediction"],
        encode_batch=4,
        shard_size=5,
        backend="torch",
        video_frames=5,
        predict_frames=4,
    )
    assert json.loads((tmp_path / "index.json").read_text()) == index
    col = index["tasks"]["colorization"]
    assert col["count"] == 11 and len(col["shards"]) == 3  # 11 demo images, shards of 5
    assert col["input_frames"] == col["target_frames"] == 1 and col["latent_shape"] == [16, 1, 4, 4]
    fp = index["tasks"]["frame_prediction"]
    assert fp["input_frames"] == 2 and fp["target_frames"] == 1  # 5 -> 2 and 4 -> 1 latent frames

    loader = LatentCacheLoader(tmp_path, n_pairs=3, batch_size=2, seed=4)
    seen = set()
    for _ in range(6):
        b = next(loader)
        seen.update(b.task)
        if b.task[0] == "colorization":
            assert b.context.shape == (2, 16, 7, 4, 4) and b.target.shape == (2, 16, 1, 4, 4)
            assert b.context_segments == (1,) * 7
        else:
            assert b.context_segments == (2, 1, 2) and b.target.shape == (2, 16, 1, 4, 4)
    assert seen == {"colorization", "frame_prediction"}

    state = loader.state_dict()
    expect = next(loader)
    again = LatentCacheLoader(tmp_path, n_pairs=3, batch_size=2, seed=4)
    again.load_state_dict(state)
    got = next(again)
    assert torch.equal(got.context, expect.context) and got.task == expect.task


def test_cache_matches_direct_encoding(tmp_path):
    enc = AvgPoolEncoderTestDouble()
    build_latent_cache("demo", enc, tmp_path, resolution=16, tasks=["colorization"], backend="torch")
    from safetensors.torch import load_file

    from lavin_fast.data.incontext import PairPlan, SamplePlan, build_incontext_loader

    shard = load_file(str(tmp_path / "colorization-s0-00000.safetensors"))
    loader = build_incontext_loader("demo", resolution=16, tasks=["colorization"], backend="torch", augment=False)
    rows = loader.maker.pair_tensors(0, [SamplePlan("colorization", [PairPlan(0, 0, (0.5,) * 4, False)])])
    inp, tgt = rows[0][0]
    torch.testing.assert_close(shard["target"][0:1], enc(tgt[None]))  # the clean image, encoded
    # and the cached input is gray: equal channels before the projection give a rank-1 latent pattern
    assert inp[0].equal(inp[1])


def test_cache_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no index.json"):
        LatentCacheLoader(tmp_path)
    with pytest.raises(ValueError, match="encoder: expected latents"):
        build_latent_cache("demo", lambda x: x.mean(), tmp_path, resolution=16, tasks=["inpainting"], backend="torch")


def _tiny_vae(seed: int):
    from lavin_fast.models.vae import build_vae

    torch.manual_seed(seed)
    return build_vae(block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4).eval()


def test_rerun_skips_finished_shards_and_refuses_other_settings(tmp_path):
    enc = AvgPoolEncoderTestDouble()
    kw = dict(resolution=16, tasks=["colorization", "inpainting"], encode_batch=4, shard_size=4, backend="torch")
    index = build_latent_cache("demo", enc, tmp_path, **kw)
    assert (
        index["counts"] == {"colorization": 11, "inpainting": 11} and enc.calls == 2 * 3 * 2
    )  # 2 tasks x 3 shards x (input, target)
    # a rerun of a finished cache encodes nothing
    calls = enc.calls
    assert build_latent_cache("demo", enc, tmp_path, **kw) == index and enc.calls == calls
    # an interrupted build: one shard and its marker lost (its temporary file left over) -> only it is redone
    lost = index["tasks"]["inpainting"]["shards"][1]
    (tmp_path / lost).rename(tmp_path / (lost + ".tmp123"))
    (tmp_path / (lost + ".done.json")).unlink()
    assert build_latent_cache("demo", enc, tmp_path, **kw) == index
    assert enc.calls == calls + 2  # one chunk of 4 pairs: input and target
    _assert_same_shard(tmp_path / lost, tmp_path / (lost + ".tmp123"))  # the same draws: keyed by shard, not by run
    with pytest.raises(ValueError, match="other settings.*copies: 1 -> 2"):
        build_latent_cache("demo", enc, tmp_path, **{**kw, "copies": 2})


def test_copies_redraw_crop_flip_and_degradation(tmp_path):
    enc = AvgPoolEncoderTestDouble()
    index = build_latent_cache(
        "demo", enc, tmp_path, resolution=16, tasks=["inpainting"], copies=2, shard_size=11, backend="torch"
    )
    assert index["augment"] is True and index["counts"] == {"inpainting": 22}
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / n)) for n in index["tasks"]["inpainting"]["shards"])
    # shard 0 holds copy 0 of the 11 images, shard 1 copy 1: other crops (targets) and other boxes (inputs)
    assert not torch.allclose(a["target"], b["target"]) and not torch.allclose(a["input"], b["input"])


def test_vae_encoder_identity_and_trainer_refuses_another_vae(tmp_path):
    from lavin_fast.data.latent_cache import VAECacheEncoder
    from lavin_fast.models.checkpoints import save_vae, weights_sha256
    from lavin_fast.parallel.distributed import DistContext
    from lavin_fast.train.config import ConfigError, load_config
    from lavin_fast.train.sources import CachedLatentSource, build_source

    vae_a, vae_b = _tiny_vae(0), _tiny_vae(1)
    file_a, file_b = save_vae(vae_a, tmp_path / "a.safetensors"), save_vae(vae_b, tmp_path / "b.safetensors")
    enc = VAECacheEncoder(vae_a, seed=0, name="a.safetensors")
    assert enc.sha256 == weights_sha256(vae_a) != weights_sha256(vae_b)
    assert weights_sha256(vae_a.to(torch.float64)) == enc.sha256  # storage dtype does not change the identity
    cache = tmp_path / "cache"
    index = build_latent_cache("demo", enc, cache, resolution=16, tasks=["colorization"], backend="torch")
    assert index["encoder_sha256"] == enc.sha256 and index["encoder"] == "a.safetensors"
    ctx = DistContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"), initialized=False)
    base = {"data": "latent-cache", "latent_cache": str(cache), "micro_batch_size": 2, "batch_size": 2}
    source = build_source(load_config(None, {**base, "vae_weights": str(file_a)}), ctx)
    assert isinstance(source, CachedLatentSource) and source.next_batch()[0].shape == (2, 16, 1, 4, 4)
    with pytest.raises(ConfigError, match=r"written by another VAE \(a.safetensors.*b.safetensors"):
        build_source(load_config(None, {**base, "vae_weights": str(file_b)}), ctx)


def test_cache_without_vae_identity_is_read_with_a_warning(tmp_path, caplog):
    from lavin_fast.models.checkpoints import save_vae
    from lavin_fast.parallel.distributed import DistContext
    from lavin_fast.train.config import load_config
    from lavin_fast.train.sources import build_source

    index = build_latent_cache("demo", AvgPoolEncoderTestDouble(), tmp_path, resolution=16, tasks=["colorization"])
    assert index["encoder_sha256"] is None
    vae_file = save_vae(_tiny_vae(0), tmp_path / "a.safetensors")
    ctx = DistContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"), initialized=False)
    cfg = {"data": "latent-cache", "latent_cache": str(tmp_path), "micro_batch_size": 2, "batch_size": 2}
    with caplog.at_level("WARNING", logger="lavin_fast.train.sources"):
        build_source(load_config(None, {**cfg, "vae_weights": str(vae_file)}), ctx).next_batch()
    assert "records no VAE identity" in caplog.text


def _assert_same_shard(a, b) -> None:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), a.name


def _torchrun_build_cache(argv: list[str]) -> None:
    import os
    import pathlib
    import subprocess
    import sys

    root = str(pathlib.Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "lavin_fast.cli", "data", "build-cache", *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow  # two torchrun launches of 2 gloo processes: 11-32 s measured on the shared 2-core machine
def test_build_cache_under_torchrun_two_ranks_feeds_the_trainer_and_resumes(tmp_path):
    from lavin_fast.data.latent_cache import VAECacheEncoder
    from lavin_fast.models.checkpoints import save_vae
    from lavin_fast.train.config import load_config
    from lavin_fast.train.trainer import Trainer

    vae = _tiny_vae(0)
    vae_file = save_vae(vae, tmp_path / "vae.safetensors")
    out = tmp_path / "cache"
    kw = dict(resolution=16, tasks=["colorization", "inpainting"], shard_size=4, encode_batch=4, backend="torch")
    argv = ["demo", "--vae", str(vae_file), "--out", str(out), "--resolution", "16", "--shard-size", "4"]
    argv += ["--encode-batch", "4", "--tasks", "colorization", "inpainting", "--backend", "torch", "--device", "cpu"]
    argv += ["--format", "safetensors"]  # compared file by file with the library's default below
    _torchrun_build_cache([*argv, "--no-progress"])
    index = json.loads((out / "index.json").read_text())
    assert index["counts"] == {"colorization": 11, "inpainting": 11}
    shards = [n for t in ("colorization", "inpainting") for n in index["tasks"][t]["shards"]]
    assert len(shards) == 6
    ranks = [json.loads((out / (n + ".done.json")).read_text())["rank"] for n in shards]
    assert ranks == [0, 1, 0, 1, 0, 1]  # shard n on rank n % 2

    # the two ranks wrote what one process writes (every draw is keyed by the shard, not by the rank)
    one = tmp_path / "one"
    build_latent_cache("demo", VAECacheEncoder(vae, seed=0, name="vae.safetensors"), one, **kw)
    for name in shards:
        _assert_same_shard(out / name, one / name)

    # the trainer reads it (and checks that its VAE wrote it)
    cfg = {"data": "latent-cache", "latent_cache": str(out), "vae_weights": str(vae_file), "model": "tiny"}
    cfg.update(model_overrides={"depth": 1}, steps=2, batch_size=2, micro_batch_size=2, num_pairs=1)
    cfg.update(out_dir=str(tmp_path / "run"), tensorboard=False, progress=False, save_every=100)
    result = Trainer(load_config(None, cfg)).fit()
    assert len(result.losses) == 2 and all(math.isfinite(v) for _, v in result.losses)

    # a rerun after an interruption redoes only the lost shard
    lost = shards[3]
    (out / lost).unlink()
    (out / (lost + ".done.json")).unlink()
    stamps = {n: (out / n).stat().st_mtime_ns for n in shards if n != lost}
    _torchrun_build_cache(argv)
    assert {n: (out / n).stat().st_mtime_ns for n in shards if n != lost} == stamps
    _assert_same_shard(out / lost, one / lost)
    assert json.loads((out / "index.json").read_text()) == index


def test_several_sources_each_give_the_tasks_they_have(tmp_path):
    from PIL import Image

    from lavin_fast.data.demo_data import demo_image_paths

    folder = tmp_path / "photos"
    folder.mkdir()
    for p in demo_image_paths()[:3]:
        Image.open(p).convert("RGB").resize((40, 32)).save(folder / (p.stem + ".png"))
    enc = AvgPoolEncoderTestDouble()
    kw = dict(resolution=16, backend="torch", video_frames=5, predict_frames=4)
    index = build_latent_cache(["demo", folder], enc, tmp_path / "c", tasks=["colorization", "frame_prediction"], **kw)
    # the folder has no clips: frame prediction comes from the demo alone, colorization from both
    assert index["counts"]["colorization"] == 11 + 3 and index["counts"]["frame_prediction"] > 0
    assert all("-s0-" in name for name in index["tasks"]["frame_prediction"]["shards"])
    assert index["tasks"]["colorization"]["shards"] == [
        "colorization-s0-00000.safetensors",
        "colorization-s1-00000.safetensors",
    ]
    with pytest.raises(ValueError, match=r"\['depth_estimation'\] provided by none of the sources"):
        build_latent_cache([folder], enc, tmp_path / "d", tasks=["colorization", "depth_estimation"], **kw)


def test_tar_shard_cache_round_trip_resume_and_rerun(tmp_path):
    """A cache written as tar shards holds the safetensors cache's rows (read back with tarfile and numpy, not the
    loader), the loader gives the same batches from both, resumes exactly, and a rerun redoes only a lost shard."""
    import io
    import tarfile

    import numpy as np
    from safetensors.torch import load_file

    kw = dict(resolution=16, tasks=["colorization", "frame_prediction"], shard_size=4, encode_batch=3)
    kw.update(backend="torch", video_frames=5, predict_frames=4)
    st = build_latent_cache("demo", AvgPoolEncoderTestDouble(), tmp_path / "st", **kw)
    tar = build_latent_cache("demo", AvgPoolEncoderTestDouble(), tmp_path / "tar", format="shards", **kw)
    assert tar["format"] == "shards" and st["format"] == "safetensors" and tar["counts"] == st["counts"]
    assert len(tar["tasks"]["colorization"]["shards"]) > 1
    for task, info in tar["tasks"].items():
        assert all(n.endswith(".tar") for n in info["shards"])
        for name, st_name in zip(info["shards"], st["tasks"][task]["shards"], strict=True):
            ref = load_file(str(tmp_path / "st" / st_name))
            with tarfile.open(tmp_path / "tar" / name) as f:
                members = {m.name: f.extractfile(m).read() for m in f}
            rows = len(ref["input"])
            assert len(members) == 3 * rows and (tmp_path / "tar" / name.replace(".tar", ".idx")).is_file()
            for r in range(rows):
                for key in ("input", "target"):
                    got = np.load(io.BytesIO(members[f"{r:09d}.{key}.npy"]), allow_pickle=False)
                    assert torch.equal(torch.from_numpy(got), ref[key][r])
                assert json.loads(members[f"{r:09d}.json"]) == {"task": task}

    a = LatentCacheLoader(tmp_path / "st", n_pairs=2, batch_size=3, seed=1)
    b = LatentCacheLoader(tmp_path / "tar", n_pairs=2, batch_size=3, seed=1, prefetch=2)
    for _ in range(8):
        x, y = next(a), next(b)
        assert x.task == y.task and torch.equal(x.context, y.context) and torch.equal(x.target, y.target)
    state = json.loads(json.dumps(b.state_dict()))
    want = [next(b) for _ in range(3)]
    b.close()
    again = LatentCacheLoader(tmp_path / "tar", n_pairs=2, batch_size=3, seed=1)
    again.load_state_dict(state)
    for g, w in zip([next(again) for _ in range(3)], want, strict=True):
        assert g.index == w.index and torch.equal(g.context, w.context) and torch.equal(g.target, w.target)

    # an interrupted build: the lost shard is redone, byte for byte, the others are kept
    out, names = tmp_path / "tar", tar["tasks"]["colorization"]["shards"]
    before = {n: (out / n).read_bytes() for n in names}
    stamps = {n: (out / n).stat().st_mtime_ns for n in names[1:]}
    (out / names[0]).unlink()
    (out / (names[0] + ".done.json")).unlink()
    assert build_latent_cache("demo", AvgPoolEncoderTestDouble(), out, format="shards", **kw) == tar
    assert {n: (out / n).read_bytes() for n in names} == before
    assert {n: (out / n).stat().st_mtime_ns for n in names[1:]} == stamps
    with pytest.raises(ValueError, match="format"):  # the other format into the same folder: other settings
        build_latent_cache("demo", AvgPoolEncoderTestDouble(), out, **kw)
    with pytest.raises(ValueError, match="format"):
        build_latent_cache("demo", AvgPoolEncoderTestDouble(), tmp_path / "x", format="npz", **kw)
    # a truncated tar: a named error, not a short tensor
    path = out / names[-1]
    path.write_bytes(path.read_bytes()[:1024])
    cut = LatentCacheLoader(out, n_pairs=2, batch_size=3, seed=1, tasks=["colorization"])
    with pytest.raises(ValueError, match="cut short"):
        for _ in range(20):
            next(cut)
