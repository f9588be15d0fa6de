"""Latent cache: build with a stand-in encoder, read back as in-context latent batches, resume."""

import json

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

    shard = load_file(str(tmp_path / "colorization-00000.safetensors"))
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
