"""The demo's tiny ST-VAE: its config, the fit, and the bundled pre-fitted copy.

Like the real LaVin-DiT, whose J-DiT trains against a frozen, pretrained ST-VAE, the demo's J-DiT trains against a
tiny ST-VAE fitted offline: `demo_tiny_vae.safetensors`, package data of `lavin_fast.data` (float32, about 2.5 MB,
the recipe, steps, seed, torch version and PSNR in its safetensors metadata), loaded with the library's safe loader
(`load_vae_file`: safetensors, never a pickle). It was fitted on the demo's TRAINING photographs and their augmented
crops only (the held-out photographs are in no crop and no fit batch), and is regenerated with
`lavin-fast demo --fit-vae-only OUT` (`fit_bundled_vae`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads when a command runs, not for --help
    import torch

_log = logging.getLogger(__name__)

TINY_VAE = {"block_out_channels": (16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4}
"""3 levels: 4x spatial, 4 latent channels (16x16x4 latents at 64 px: with 16 channels the J-DiT had 4x as
much to predict and its samples stayed noisy in the time budget, measured)"""
SHARP_LOGVAR = -8.0
"""the VAE encoder's starting log-variance: posterior samples start nearly noise-free (the L1 fit then
converges without first having to learn to shrink the noise)"""
BUNDLED_VAE_NAME = "demo_tiny_vae.safetensors"
"""the bundled pre-fitted TINY_VAE, package data of lavin_fast.data"""
FIT_RECIPE = {"steps": 10_000, "batch": 8, "crop": 32, "lr": 3e-3, "kl_weight": 1e-6, "crops_per_photo": 24,
              "min_scale": 0.3, "size": 64, "grey_copies": True}  # fmt: skip
"""how the bundled VAE is fitted (fit_bundled_vae): `fit_vae` for `steps` on the training photographs and
`crops_per_photo` augmented crops of each (demo_data.write_demo_set, held-out photographs never cropped), each in
colour and in grey (the two demo tasks' images), at `size` px"""


def bundled_vae_path() -> pathlib.Path:
    return pathlib.Path(str(resources.files("lavin_fast.data") / BUNDLED_VAE_NAME))


def fit_vae(
    vae,
    frames: torch.Tensor,
    steps: int,
    seed: int,
    kl_weight: float = 1e-6,
    crop: int = 32,
    lr: float = 3e-3,
    seconds: float | None = None,
    batch: int = 8,
    every: int = 0,
    callback: Callable[[int], None] | None = None,
) -> list[float]:
    """Fit the VAE to reconstruct `frames` [N, 3, 1, H, W] (L1 + a small KL; an added L1 of pixel differences
    measured worse in PSNR at this budget) for exactly `steps` steps (or, legacy, about `seconds` when given),
    on random `crop` x `crop` crops in batches of `batch` (convolutional: what it learns holds at full size, at a
    fraction of the cost); the learning rate decays on a cosine over the budget, and the encoder starts with a
    small posterior variance (SHARP_LOGVAR). Fixed steps and `seed`: the same fit on any machine.
    With `every` > 0, `callback(step)` runs after every `every`-th step (the VAE back in train mode after it)."""
    import torch

    if steps < 1 and seconds is None:
        raise ValueError(f"fit_vae: steps must be >= 1, got {steps}")
    from lavin_fast.train.fused_versions import bump_versions_after_step

    with torch.no_grad():
        bias = vae.encoder.conv_out.conv.bias
        bias[bias.shape[0] // 2 :] = SHARP_LOGVAR
    # fused: one kernel per parameter, 7.5 -> 1.5 ms a step (measured)
    opt = torch.optim.Adam(vae.parameters(), lr=lr, fused=True)
    bump_versions_after_step(opt)  # fused steps leave the version counters the conv caches are keyed by
    gen = torch.Generator().manual_seed(seed)
    losses, start = [], time.time()
    h, w = frames.shape[-2:]
    crop = min(crop, h, w)
    vae.train()
    while True:
        if seconds is None:
            if len(losses) >= steps:
                break
            frac = len(losses) / steps
        else:
            if (elapsed := time.time() - start) >= seconds:
                break
            frac = min(elapsed / seconds, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(0, frames.shape[0], (batch,), generator=gen)
        i = int(torch.randint(0, h - crop + 1, (), generator=gen))
        j = int(torch.randint(0, w - crop + 1, (), generator=gen))
        x = frames[idx][..., i : i + crop, j : j + crop].to(vae.device)
        post = vae.encode(x)
        rec = vae.decode(post.sample())
        kl = 0.5 * (post.mean.pow(2) + post.logvar.exp() - 1 - post.logvar).mean()
        loss = (rec - x).abs().mean() + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if every > 0 and callback is not None and len(losses) % every == 0:
            vae.eval()
            callback(len(losses))
            vae.train()
    vae.eval()
    return losses


def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    """Images [N, 3, H, W] through the VAE's encode (posterior mean) and decode, clamped to [-1, 1]."""
    import torch

    with torch.no_grad():
        return vae.decode(vae.encode(images.to(vae.device)).mode()).float().clamp(-1, 1).cpu()


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of [N, 3, H, W] images in [-1, 1] (peak: the full range)."""
    from lavin_fast.eval.metrics import psnr

    return psnr((a.float() + 1) / 2, (b.float() + 1) / 2)


def load_bundled_vae(path: str | pathlib.Path | None = None, device="cpu"):
    """The bundled pre-fitted tiny VAE (or the file at `path`), through the safe loader, checked to be TINY_VAE.
    Returns (vae in eval mode, its metadata: recipe, steps, seed, torch version, PSNR). A missing or corrupt file or
    another config raises ModelFileError naming the file and what is wrong."""
    from safetensors import safe_open

    from lavin_fast.models.checkpoints import ModelFileError, load_vae_file
    from lavin_fast.models.vae import build_vae

    p = pathlib.Path(path) if path is not None else bundled_vae_path()
    hint = (
        "reinstall lavin-fast, regenerate it with `lavin-fast demo --fit-vae-only OUT`, or fit one with --vae-steps N"
    )
    if not p.is_file():
        raise ModelFileError(f"the demo's bundled tiny VAE {str(p)!r} is missing; {hint}")
    try:
        vae = load_vae_file(p, device=device)
    except ModelFileError as exc:
        raise ModelFileError(f"the demo's bundled tiny VAE does not load: {exc}; {hint}") from None
    want = dataclasses.asdict(build_vae(device="meta", **TINY_VAE).config)
    got = dataclasses.asdict(vae.config)
    diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}={a!r} (TINY_VAE: {b!r})" for k, (a, b) in diff.items())
        raise ModelFileError(
            f"the demo's bundled tiny VAE {str(p)!r} is not the demo's TINY_VAE config: {detail}; {hint}"
        )
    with safe_open(str(p), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return vae, meta


def training_frames(root: pathlib.Path, size: int, crops: int, seed: int, min_scale: float, grey: bool):
    """The bundled VAE's fit set: demo_data.write_demo_set under `root` (training photographs and `crops` augmented
    crops of each; the held-out photographs never cropped), as [N, 3, 1, size, size] in [-1, 1], with a grey copy of
    each when `grey`. Returns (frames, training photo paths, held-out photo paths); raises when a held-out
    photograph's name is among the fit files."""
    import torch

    from lavin_fast.data.demo_data import write_demo_set
    from lavin_fast.data.tasks import grayscale
    from lavin_fast.media import load_image

    train, held, crop_paths = write_demo_set(root, size, crops=crops, seed=seed, min_scale=min_scale)
    files = sorted((root / "train").glob("*.png"))
    held_stems = {p.stem for p in held}
    leaked = [f.name for f in files if f.stem.split("_crop")[0] in held_stems]
    if leaked:
        raise RuntimeError(f"fit set: held-out photographs {sorted(held_stems)} leaked into it: {leaked}")
    if len(files) != len(train) + len(crop_paths):
        raise RuntimeError(
            f"fit set: {len(files)} files in {root / 'train'}, expected {len(train)} photographs + {len(crop_paths)} crops"
        )
    x = torch.stack([load_image(f) for f in files])
    if grey:
        x = torch.cat([x, grayscale(x).expand(-1, 3, -1, -1)])
    return x[:, :, None].contiguous(), train, held


def fit_bundled_vae(out: str | pathlib.Path, seed: int = 0, recipe: dict | None = None, every: int = 1000) -> dict:
    """Fit TINY_VAE with `recipe` (FIT_RECIPE) and write it to `out` as safetensors (float32) with the recipe,
    steps, seed, torch version and the reconstruction PSNR on every demo photograph in its metadata (the file the
    demo bundles). Logs the PSNR every `every` steps. Returns the metadata."""
    import torch

    from lavin_fast.media import load_image
    from lavin_fast.models.checkpoints import save_vae
    from lavin_fast.models.vae import build_vae

    r = dict(FIT_RECIPE, **(recipe or {}))
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        frames, train, held = training_frames(
            pathlib.Path(tmp), r["size"], r["crops_per_photo"], seed, r["min_scale"], r["grey_copies"]
        )
        photos = torch.stack([load_image(p) for p in train + held])
    vae = build_vae(device="cpu", **TINY_VAE)
    curve = []

    def report(step: int) -> None:
        db = psnr_db(reconstruct(vae, photos), photos)
        curve.append((step, round(float(db.mean()), 2)))
        _log.info("fit_bundled_vae: step %d: PSNR %.2f dB (mean of %d demo photos)", step, float(db.mean()), len(db))

    t0 = time.time()
    losses = fit_vae(vae, frames, r["steps"], seed, r["kl_weight"], r["crop"], r["lr"], batch=r["batch"],
                     every=every, callback=report)  # fmt: skip
    seconds = time.time() - t0
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_vae(vae, out)
    loaded, _ = load_bundled_vae(out)  # the PSNR of the file as the demo loads it
    db = psnr_db(reconstruct(loaded, photos), photos)
    n_train = len(train)
    meta = {
        "recipe": json.dumps(r, sort_keys=True),
        "steps": str(len(losses)),
        "seed": str(seed),
        "torch_version": torch.__version__,
        "psnr_db": f"{float(db.mean()):.2f}",
        "psnr_db_held_out": f"{float(db[n_train:].mean()):.2f}",
        "psnr_db_per_photo": json.dumps({p.stem: round(float(v), 2) for p, v in zip(train + held, db, strict=True)}),
        "psnr_curve": json.dumps(curve),
        "fit_frames": str(frames.shape[0]),
        "held_out_photos": json.dumps([p.stem for p in held]),
        "fit_seconds": f"{seconds:.0f}",
        "threads": str(torch.get_num_threads()),
    }
    save_vae(vae, out, metadata=meta)  # the same weights, now with how they were fitted
    return meta
