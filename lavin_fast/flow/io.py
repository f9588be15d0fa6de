"""Loading the two models for sampling and training, whatever file they come in, with errors that say what to do.

- J-DiT: our safetensors (`save_dit`, config in the metadata) or the published safetensors (size given by name).
- ST-VAE: our safetensors (`save_vae` below: config in the metadata) or the published torch pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import torch


class ModelFileError(ValueError):
    """A missing, unreadable or mismatching model file."""


def _existing(path: str | os.PathLike, what: str, hint: str) -> pathlib.Path:
    p = pathlib.Path(path)
    if not p.is_file():
        raise ModelFileError(f"{what} checkpoint {str(p)!r} does not exist; {hint}")
    if p.stat().st_size == 0:
        raise ModelFileError(
            f"{what} checkpoint {str(p)!r} is empty (an interrupted download or copy?); fetch it again"
        )
    return p


def load_dit_file(
    path: str | os.PathLike, name: str = "3.4B", *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
):
    """A J-DiT from our file (size read from it) or from the published file (size `name`), in eval mode."""
    from lavin_fast.models.dit import load_dit, load_published_dit

    p = _existing(path, "J-DiT", "pass --dit PATH to a .safetensors file (ours, or the published one with --model)")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            ours = (f.metadata() or {}).get("format") == "lavin_fast.jdit"
    except Exception as exc:
        raise ModelFileError(
            f"J-DiT checkpoint {str(p)!r} cannot be read as safetensors ({type(exc).__name__}: {exc}); the file is "
            "corrupt or not a J-DiT checkpoint: fetch it again"
        ) from None
    try:
        if ours:
            return load_dit(p, device=device, dtype=dtype).eval()
        return load_published_dit(p, name, device=device, dtype=dtype or torch.float32).eval()
    except (ValueError, RuntimeError) as exc:
        raise ModelFileError(
            f"J-DiT checkpoint {str(p)!r} does not load as {'our file' if ours else f'the published {name} model'}: "
            f"{exc}" + ("" if ours else "\n(is --model the size this checkpoint was trained at: 0.1B, 1.0B or 3.4B?)")
        ) from None


_VAE_FORMAT = "lavin_fast.stvae"


def save_vae(vae, path: str | os.PathLike) -> pathlib.Path:
    """Our ST-VAE file: safetensors with the VAEConfig in the metadata (e.g. the demo's tiny VAE)."""
    from safetensors.torch import save_file

    cfg = dataclasses.asdict(vae.config)
    tensors = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
    save_file(tensors, os.fspath(path), metadata={"format": _VAE_FORMAT, "config": json.dumps(cfg)})
    return pathlib.Path(path)


def load_vae_file(path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """An ST-VAE from our safetensors file or from the published torch pickle, in eval mode."""
    from lavin_fast.checkpoint import check_state_dict
    from lavin_fast.models.vae import build_vae, load_published_vae

    p = _existing(path, "ST-VAE", "pass --vae PATH (the published vae .pt/.pth or our .safetensors)")
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _VAE_FORMAT:
                    raise ModelFileError(f"{p} is not a lavin_fast ST-VAE file (metadata {sorted(meta)})")
                cfg = json.loads(meta["config"])
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except ModelFileError:
            raise
        except Exception as exc:
            raise ModelFileError(
                f"ST-VAE file {str(p)!r} is corrupt ({type(exc).__name__}: {exc}); write it again"
            ) from None
        vae = build_vae(device="meta", **cfg)
        check_state_dict({k: tuple(v.shape) for k, v in vae.state_dict().items()}, sd, source=str(p))
        vae.load_state_dict(sd, strict=True, assign=True)
        return vae.to(device=device, dtype=dtype or torch.float32).eval()
    try:
        return load_published_vae(p, device=device, dtype=dtype or torch.float32)
    except (ValueError, RuntimeError) as exc:
        raise ModelFileError(f"ST-VAE checkpoint {str(p)!r} does not load: {exc}") from None
