"""--allow-unexpected-keys: both published loaders load past tensors the model does not have, list them and
name the file; without it they stay strict. Our own files are never loosened."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from lavin_fast.models.checkpoints import (
    CheckpointMismatch,
    ModelFileError,
    load_dit_file,
    load_published_dit,
    load_published_vae,
    published_shapes,
    save_vae,
)
from lavin_fast.models.dit_configs import get_config
from lavin_fast.models.vae import build_vae

DIT = dict(hidden_size=64, num_heads=4, depth=2, kv_group=1)
VAE = dict(block_out_channels=(32, 32, 64, 64), norm_num_groups=8, layers_per_block=1)


def test_published_dit_unexpected_keys(tmp_path, caplog):
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g) for k, s in published_shapes(get_config("3.4B", **DIT)).items()}
    tensors["ema_decay_buffer"] = torch.zeros(3)
    tensors["blocks.0.extra.weight"] = torch.zeros(2, 2)
    path = tmp_path / "jdit.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointMismatch, match=r"unexpected \(2\): blocks.0.extra.weight, ema_decay_buffer"):
        load_published_dit(path, "3.4B", **DIT)
    with caplog.at_level(logging.WARNING, logger="lavin_fast.models.checkpoints"):
        model = load_published_dit(path, "3.4B", allow_unexpected=True, **DIT)
    msg = caplog.text
    assert str(path) in msg and "ignoring 2 unexpected" in msg and "ema_decay_buffer (3,)" in msg
    assert "blocks.0.extra.weight (2, 2)" in msg
    torch.testing.assert_close(model.final_layer.linear.bias, tensors["final_layer.linear.bias"], rtol=0, atol=0)
    # a missing tensor stays an error
    del tensors["final_layer.linear.bias"]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointMismatch, match="missing"):
        load_published_dit(path, "3.4B", allow_unexpected=True, **DIT)


def test_published_vae_unexpected_keys(tmp_path, caplog):
    sd = {k: torch.randn_like(v) for k, v in build_vae(**VAE).state_dict().items()}
    sd["loss.discriminator.weight"] = torch.zeros(4)
    path = tmp_path / "vae.pt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointMismatch, match=r"unexpected \(1\): loss.discriminator.weight"):
        load_published_vae(path, **VAE)
    with caplog.at_level(logging.WARNING, logger="lavin_fast.models.checkpoints"):
        vae = load_published_vae(path, allow_unexpected=True, **VAE)
    assert str(path) in caplog.text and "loss.discriminator.weight (4,)" in caplog.text
    first = next(iter(vae.state_dict()))
    torch.testing.assert_close(vae.state_dict()[first], sd[first], rtol=0, atol=0)


def test_our_files_stay_strict(tmp_path):
    vae = build_vae(**VAE)
    path = save_vae(vae, tmp_path / "vae.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    sd["extra"] = torch.zeros(1)
    save_file(sd, str(path), metadata=meta)
    from lavin_fast.models.checkpoints import load_vae_file

    with pytest.raises(CheckpointMismatch, match="unexpected"):
        load_vae_file(path, allow_unexpected=True)
    with pytest.raises(ModelFileError):
        load_dit_file(tmp_path / "missing.safetensors", allow_unexpected=True)
