"""The demo's bundled tiny ST-VAE (lavin_fast/data/demo_tiny_vae.safetensors): it loads through the safe loader as
the demo's TINY_VAE config, reconstructs the demo photographs at >= 24 dB (PSNR recomputed here with numpy), was
fitted without the held-out photographs, and a missing, corrupt or mismatched file is a clear error."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lavin_fast.cli import demo_vae, main
from lavin_fast.cli.demo_vae import TINY_VAE, bundled_vae_path, load_bundled_vae, training_frames
from lavin_fast.data.demo_data import DEMO_HELD_OUT_PHOTOS, write_demo_set
from lavin_fast.media import load_image
from lavin_fast.models.checkpoints import ModelFileError, save_vae
from lavin_fast.models.vae import build_vae

pytest.importorskip("skimage")

FLOOR_DB = 24.0
"""the issue's floor for the demo VAE's reconstruction, mean over every demo photograph at 64 px"""


def _numpy_psnr(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per image PSNR of [N, 3, H, W] arrays in [-1, 1], peak the full range (independent of lavin_fast.eval)."""
    a, b = (pred.astype(np.float64) + 1) / 2, (target.astype(np.float64) + 1) / 2
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(1.0 / mse)


def test_bundled_file_is_safetensors_with_the_tiny_config():
    path = bundled_vae_path()
    assert path.is_file() and 1_000_000 < path.stat().st_size < 4_000_000
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float32}
    for key in ("recipe", "steps", "seed", "torch_version", "psnr_db", "held_out_photos", "config"):
        assert key in meta, key
    cfg = json.loads(meta["config"])
    for key, value in TINY_VAE.items():  # the file's own config, against the demo's constant
        assert cfg[key] == (list(value) if isinstance(value, tuple) else value), key
    assert json.loads(meta["held_out_photos"]) == [n.rsplit(".", 1)[0] for n in DEMO_HELD_OUT_PHOTOS]
    vae, loaded_meta = load_bundled_vae()
    assert loaded_meta["steps"] == meta["steps"] and int(meta["steps"]) >= 8000
    assert tuple(vae.config.block_out_channels) == TINY_VAE["block_out_channels"]
    assert vae.config.latent_channels == TINY_VAE["latent_channels"] and not vae.training


def test_bundled_vae_reconstructs_the_demo_photographs(tmp_path):
    train, held, _ = write_demo_set(tmp_path, 64)
    photos = torch.stack([load_image(p) for p in train + held])
    vae, meta = load_bundled_vae()
    with torch.no_grad():  # the posterior mean through the decoder, as the demo does
        rec = vae.decode(vae.encode(photos[:, :, None]).mode())[:, :, 0].clamp(-1, 1)
    db = _numpy_psnr(rec.numpy(), photos.numpy())
    assert db.mean() >= FLOOR_DB, db
    assert db[len(train) :].mean() >= FLOOR_DB - 3, db  # the held-out photographs too, never in the fit
    assert abs(db.mean() - float(meta["psnr_db"])) < 0.1  # the figure the file carries
    # and the floor can fail: a VAE one step into the same fit sits far below it
    fresh = build_vae(device="cpu", **TINY_VAE).eval()
    with torch.no_grad():
        raw = fresh.decode(fresh.encode(photos[:, :, None]).mode())[:, :, 0].clamp(-1, 1)
    assert _numpy_psnr(raw.numpy(), photos.numpy()).mean() < FLOOR_DB - 5


def test_fit_set_holds_no_held_out_photograph(tmp_path):
    frames, train, held = training_frames(tmp_path, 16, crops=2, seed=0, min_scale=0.3, grey=True)
    assert len(frames) == 2 * 3 * len(train)  # colour and grey of each photograph and its 2 crops
    names = {p.name for p in (tmp_path / "train").iterdir()}
    stems = [n.rsplit(".", 1)[0] for n in DEMO_HELD_OUT_PHOTOS]
    assert not [n for n in names if any(n.startswith(s) for s in stems)]
    for p in held:  # no fit frame is the held-out photograph itself
        h = load_image(p)
        assert (frames[:, :, 0] - h).abs().flatten(1).mean(1).min() > 0.02


def test_missing_corrupt_or_mismatched_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFileError, match="missing"):
        load_bundled_vae(tmp_path / "none.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(bundled_vae_path().read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="does not load"):
        load_bundled_vae(broken)
    other = save_vae(build_vae(device="cpu", block_out_channels=(8, 8, 8), norm_num_groups=4, latent_channels=4),
                     tmp_path / "other.safetensors")  # fmt: skip
    with pytest.raises(ModelFileError, match=r"TINY_VAE config: block_out_channels"):
        load_bundled_vae(other)


def test_demo_stops_on_a_corrupt_bundled_file(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file at all")
    monkeypatch.setattr(demo_vae, "bundled_vae_path", lambda: broken)
    assert main(["demo", "--no-progress", "--threads", "1", "--crops", "0", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bundled tiny VAE" in err and "--vae-steps" in err
    assert not (tmp_path / "o" / "latents").exists()  # stopped before the latent cache and the training


def test_fit_vae_only_writes_a_loadable_file_with_its_recipe(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_vae, "FIT_RECIPE", demo_vae.FIT_RECIPE | {"steps": 3, "crops_per_photo": 1, "size": 32})
    out = tmp_path / "vae.safetensors"
    with contextlib.redirect_stdout(io.StringIO()) as text:
        assert main(["demo", "--fit-vae-only", str(out), "--threads", "1", "--seed", "3"]) == 0
    assert "fitted for 3 steps" in text.getvalue()
    vae, meta = load_bundled_vae(out)
    assert meta["steps"] == "3" and meta["seed"] == "3" and json.loads(meta["recipe"])["size"] == 32
    assert meta["torch_version"] == torch.__version__ and float(meta["psnr_db"]) > 0


def test_fit_after_an_eval_pass_reconstructs_like_its_weights():
    """fit_vae's fused Adam leaves the version counters on which the ST-VAE's inference convolutions key their
    cached weights: an eval pass (the fit's PSNR callback) between fit steps made later eval passes reuse stale
    weights. The in-memory VAE must reconstruct exactly like a fresh copy of its own state dict."""
    torch.manual_seed(0)
    vae = build_vae(device="cpu", **TINY_VAE)
    x = torch.rand(4, 3, 1, 32, 32) * 2 - 1
    seen = []
    demo_vae.fit_vae(vae, x, 4, 0, every=2, callback=lambda step: seen.append(demo_vae.reconstruct(vae, x[:, :, 0])))
    copy = build_vae(device="cpu", **TINY_VAE)
    copy.load_state_dict(vae.state_dict())
    fresh = demo_vae.reconstruct(copy.eval(), x[:, :, 0])
    assert torch.equal(demo_vae.reconstruct(vae, x[:, :, 0]), fresh)
    assert torch.equal(seen[-1], fresh)
