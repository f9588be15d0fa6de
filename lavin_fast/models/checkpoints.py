"""Model files: the published-name mapping and every read and write of a J-DiT or ST-VAE file (a state-dict adapter).

- `check_state_dict`: the strict check every loader runs first (one CheckpointMismatch naming every missing,
  unexpected or mis-shaped tensor).
- J-DiT: `published_name_map` / `published_shapes` (the published names -> our fused layout),
  `load_published_dit` (the published safetensors, size given by name), `save_dit` / `load_dit` (our
  safetensors, config in the metadata).
- ST-VAE: `load_published_vae` (the published torch pickle, weights_only), `load_vae_state_dict`,
  `save_vae` (our safetensors, config in the metadata).
- `weights_sha256`: the identity of a model's weights (what a latent cache records of its VAE).
- `load_dit_file` / `load_vae_file`: whichever of the two files a user gives, with ModelFileError saying
  what to do (what the sample, train and demo commands call).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lavin_fast.models.dit import JDiT
from lavin_fast.models.dit_configs import DiTConfig, get_config
from lavin_fast.models.vae import STVAE, build_vae

_log = logging.getLogger(__name__)


class CheckpointMismatch(ValueError):
    """A state dict that does not match the model: lists every missing, unexpected or mis-shaped tensor."""


def check_state_dict(
    expected: Mapping[str, tuple[int, ...] | torch.Size],
    found: Mapping[str, torch.Tensor | tuple[int, ...]],
    source: str = "checkpoint",
    *,
    allow_unexpected: bool = False,
) -> list[str]:
    """Raise one CheckpointMismatch listing all differences between expected and found names/shapes.

    allow_unexpected: tensors the model does not have are not an error; they are logged (naming `source`) and
    returned, sorted. Missing and mis-shaped tensors are always an error."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    ignored: list[str] = []
    if allow_unexpected and unexpected:
        ignored, unexpected = unexpected, []
        _log.warning(
            "%s: ignoring %d unexpected tensor(s) (--allow-unexpected-keys): %s",
            source,
            len(ignored),
            ", ".join(f"{k} {_shape_of(found[k])}" for k in ignored[:50]) + (" ..." if len(ignored) > 50 else ""),
        )
    shapes = []
    for name in sorted(set(expected) & set(found)):
        got = found[name]
        got_shape = tuple(got.shape) if hasattr(got, "shape") else tuple(got)
        if tuple(expected[name]) != got_shape:
            shapes.append(f"{name}: expected {tuple(expected[name])}, found {got_shape}")
    if missing or unexpected or shapes:
        parts = [f"{source} does not match the model:"]
        if missing:
            parts.append(
                f"  missing ({len(missing)}): " + ", ".join(missing[:50]) + (" ..." if len(missing) > 50 else "")
            )
        if unexpected:
            parts.append(
                f"  unexpected ({len(unexpected)}): "
                + ", ".join(unexpected[:50])
                + (" ..." if len(unexpected) > 50 else "")
            )
        if shapes:
            parts.append(f"  wrong shape ({len(shapes)}):\n    " + "\n    ".join(shapes[:50]))
        if unexpected:
            parts.append(
                "  (published files with extra tensors load with allow_unexpected=True, --allow-unexpected-keys)"
            )
        raise CheckpointMismatch("\n".join(parts))
    return ignored


WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""The dtypes a weight file may hold: an integer or bool tensor is never cast silently into a float weight."""


class WeightValueError(ValueError):
    """A weight tensor of a dtype a model cannot take, or holding NaN/Inf."""


def check_weight(name: str, value: torch.Tensor, source: str) -> torch.Tensor:
    """`value` unchanged when it is a floating tensor of WEIGHT_DTYPES with only finite values; else a
    WeightValueError naming the tensor and the file."""
    if not isinstance(value, torch.Tensor):
        raise WeightValueError(f"{source}: {name!r} is a {type(value).__name__}, not a tensor")
    if value.dtype not in WEIGHT_DTYPES:
        raise WeightValueError(
            f"{source}: tensor {name!r} is {str(value.dtype).replace('torch.', '')}; weights are float32, bfloat16 "
            "or float16 (an integer or bool tensor is never cast into a weight)"
        )
    if value.device.type != "meta" and value.numel() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise WeightValueError(f"{source}: tensor {name!r} holds {bad} NaN/Inf value(s) of {value.numel()}")
    return value


def _config_of(meta: dict, source: str) -> dict:
    """The JSON config stored in a file's metadata, as a dict; a ValueError naming the file otherwise."""
    try:
        cfg = json.loads(meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{source}: its config metadata is not readable JSON ({exc})") from None
    if not isinstance(cfg, dict) or not all(isinstance(k, str) for k in cfg):
        raise ValueError(f"{source}: its config metadata is a {type(cfg).__name__}, not a mapping of field: value")
    return cfg


def _shape_of(x) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(x)


# -------------------------------------------------------------------- J-DiT


def published_name_map(cfg: DiTConfig) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """For each of our parameters: the published tensors (name, shape) concatenated on dim 0 to make it."""
    D, F_, hd = cfg.hidden_size, cfg.mlp_hidden, cfg.head_dim
    Dq, Dkv, P = cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.patch_dim
    m: list[tuple[str, list[tuple[str, tuple[int, ...]]]]] = [
        ("prompt_embed", [("prompt_embed", (1, D))]),
        ("answer_embed", [("answer_embed", (1, D))]),
    ]
    for s in ("cond", "x"):
        m += [
            (f"{s}_embedder.0.weight", [(f"{s}_embedder.0.weight", (D, P))]),
            (f"{s}_embedder.0.bias", [(f"{s}_embedder.0.bias", (D,))]),
            (f"{s}_embedder.1.weight", [(f"{s}_embedder.1.weight", (D,))]),
            (f"{s}_embedder.1.bias", [(f"{s}_embedder.1.bias", (D,))]),
        ]
    m += [
        ("t_embedder.mlp.0.weight", [("t_embedder.mlp.0.weight", (D, 256))]),
        ("t_embedder.mlp.0.bias", [("t_embedder.mlp.0.bias", (D,))]),
        ("t_embedder.mlp.2.weight", [("t_embedder.mlp.2.weight", (D, D))]),
        ("t_embedder.mlp.2.bias", [("t_embedder.mlp.2.bias", (D,))]),
    ]
    for i in range(cfg.depth):
        b, a = f"blocks.{i}", f"blocks.{i}.joint_attn"
        for s in ("cond", "x"):
            m += [
                (
                    f"{b}.attn.{s}_qkv.weight",
                    [(f"{a}.{s}_q.weight", (Dq, D)), (f"{a}.{s}_k.weight", (Dkv, D)), (f"{a}.{s}_v.weight", (Dkv, D))],
                ),
                (f"{b}.attn.{s}_qnorm", [(f"{a}.{s}_qnorm.weight", (Dq,))]),
                (f"{b}.attn.{s}_knorm", [(f"{a}.{s}_knorm.weight", (Dkv,))]),
                (f"{b}.attn.{s}_proj.weight", [(f"{a}.{s}_proj.weight", (D, Dq))]),
            ]
        for s in ("cond", "x"):
            m += [
                (
                    f"{b}.{s}_mlp.gate_up.weight",
                    [(f"{b}.{s}_mlp.gate_proj.weight", (F_, D)), (f"{b}.{s}_mlp.up_proj.weight", (F_, D))],
                ),
                (f"{b}.{s}_mlp.down.weight", [(f"{b}.{s}_mlp.down_proj.weight", (D, F_))]),
            ]
        for s in ("cond", "x"):
            m += [
                (f"{b}.{s}_mod.weight", [(f"{b}.{s}_modulation.1.weight", (4 * D, D))]),
                (f"{b}.{s}_mod.bias", [(f"{b}.{s}_modulation.1.bias", (4 * D,))]),
            ]
    m += [
        ("final_layer.linear.weight", [("final_layer.linear.weight", (P, D))]),
        ("final_layer.linear.bias", [("final_layer.linear.bias", (P,))]),
        ("final_layer.modulation.weight", [("final_layer.adaLN_modulation.1.weight", (D, D))]),
        ("final_layer.modulation.bias", [("final_layer.adaLN_modulation.1.bias", (D,))]),
    ]
    return m


def published_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the published checkpoint of this config."""
    return {name: shape for _, parts in published_name_map(cfg) for name, shape in parts}


def _assign_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter `name` (possibly on the meta device) by `value`, without allocating a copy."""
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    old = mod._parameters[leaf]
    if tuple(old.shape) != tuple(value.shape):  # the strict check ran before: this is an internal error
        raise RuntimeError(f"{name}: built {tuple(old.shape)} but loading {tuple(value.shape)}")
    mod._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)


def _finish_load(model: JDiT) -> JDiT:
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # cannot happen after a strict check; guards the mapping itself
        raise RuntimeError(f"parameters left unloaded: {left}")
    return model.eval()


def _check_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"J-DiT checkpoint {path!r} does not exist (give the path of a .safetensors file)")
    return path


def load_published_dit(
    path: str | os.PathLike,
    name: str | DiTConfig = "3.4B",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    allow_unexpected: bool = False,
    **overrides,
) -> JDiT:
    """Load a published J-DiT safetensors file (the manifest's tensor names) into our modules.

    Strict: missing, unexpected or mis-shaped tensors raise one CheckpointMismatch listing them all,
    before anything is loaded; allow_unexpected=True loads past tensors the model does not have and logs them
    with the file's name (the published code loads with strict=False). The model is built on the meta device and filled tensor by tensor (q/k/v
    and gate/up fused on the way), so peak memory is one model plus one fused tensor. dtype None keeps
    the stored dtype. Returns the model in eval mode.
    """
    path = _check_file(path)
    cfg = get_config(name, **overrides)
    mapping = published_name_map(cfg)
    expected = {n: s for _, parts in mapping for n, s in parts}
    with safe_open(path, framework="pt", device="cpu") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        check_state_dict(
            expected,
            found,
            source=f"published J-DiT checkpoint {path} (size {name!r})",
            allow_unexpected=allow_unexpected,
        )
        with torch.device("meta"):
            model = JDiT(cfg)
        for ours, parts in mapping:
            tensors = [check_weight(n, f.get_tensor(n), path) for n, _ in parts]
            value = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
            del tensors
            _assign_param(model, ours, value.to(device=device, dtype=dtype or value.dtype).contiguous())
    return _finish_load(model)


_DIT_FORMAT = "lavin_fast.jdit"


def dit_file_metadata(cfg) -> dict[str, str]:
    """The safetensors metadata of our J-DiT files (format tag and config), which load_dit reads."""
    return {"format": _DIT_FORMAT, "config": json.dumps(cfg.to_dict())}


def save_dit(model: JDiT, path: str | os.PathLike) -> None:
    """Save our layout (fused names) to safetensors, with the config in the metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, os.fspath(path), metadata=dit_file_metadata(model.cfg))


def load_dit(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, **overrides
) -> JDiT:
    """Load a file written by `save_dit` (strict; meta-device init then tensor by tensor).

    overrides: options that do not change shapes (drop_path, rope_in_attention, backend, ...).
    """
    path = _check_file(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _DIT_FORMAT or "config" not in meta:
            raise ValueError(
                f"{path} is not a lavin_fast J-DiT file (metadata {sorted(meta)}); "
                "published checkpoints load with load_published_dit"
            )
        try:
            cfg = DiTConfig(**_config_of(meta, path)).replace(**overrides)
        except TypeError as exc:
            raise ValueError(f"{path}: its config metadata does not describe a J-DiT ({exc})") from None
        with torch.device("meta"):
            model = JDiT(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        check_state_dict(expected, found, source=f"J-DiT file {path}")
        for k in expected:
            value = check_weight(k, f.get_tensor(k), path)
            _assign_param(model, k, value.to(device=device, dtype=dtype or value.dtype))
    return _finish_load(model)


# -------------------------------------------------------------------- ST-VAE


def load_published_vae(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    allow_unexpected: bool = False,
    **overrides,
) -> STVAE:
    """The published ST-VAE file (a torch pickle of {"state_dict": ...}), loaded with weights_only=True and
    checked strictly: every missing, unexpected or mis-shaped tensor is named (CheckpointMismatch);
    allow_unexpected=True loads past tensors the model does not have and logs them with the file's name."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"published ST-VAE checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file or a pickle with non-tensor objects
        raise ValueError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, dict) or "state_dict" not in obj or not isinstance(obj["state_dict"], dict):
        keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: expected a dict with a 'state_dict' entry (the published layout), found {keys}")
    sd = obj["state_dict"]
    return load_vae_state_dict(
        sd, device=device, dtype=dtype, source=str(path), allow_unexpected=allow_unexpected, **overrides
    )


def load_vae_state_dict(
    state_dict: dict[str, torch.Tensor],
    *,
    device: torch.device | str | None = "cpu",
    dtype: torch.dtype | None = torch.float32,
    source: str = "state_dict",
    allow_unexpected: bool = False,
    **overrides,
) -> STVAE:
    """An ST-VAE holding `state_dict` (published names), checked strictly first (CheckpointMismatch names every
    missing, unexpected or mis-shaped tensor). The model is built on the meta device and takes the given
    tensors (no second copy); device=None keeps them where they are (meta tensors give a meta model)."""
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source}: state_dict entries that are not tensors: {bad[:10]}")
    for k, v in state_dict.items():
        check_weight(k, v, source)
    vae = build_vae(device="meta", **overrides)
    ignored = check_state_dict(
        {k: tuple(v.shape) for k, v in vae.state_dict().items()},
        state_dict,
        source=source,
        allow_unexpected=allow_unexpected,
    )
    if ignored:
        state_dict = {k: v for k, v in state_dict.items() if k not in set(ignored)}
    vae.load_state_dict(state_dict, strict=True, assign=True)
    return vae.to(device=device, dtype=dtype).eval()


_VAE_FORMAT = "lavin_fast.stvae"


def save_vae(vae, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> pathlib.Path:
    """Our ST-VAE file: safetensors with the VAEConfig in the metadata (e.g. the demo's tiny VAE), plus `metadata`
    (strings; e.g. how the weights were fitted)."""
    cfg = dataclasses.asdict(vae.config)
    tensors = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
    meta = {**(metadata or {}), "format": _VAE_FORMAT, "config": json.dumps(cfg)}
    save_file(tensors, os.fspath(path), metadata=meta)
    return pathlib.Path(path)


def weights_sha256(module: nn.Module) -> str:
    """Identity of a model's weights: sha256 over its state dict in name order (each tensor's name, shape and
    float32 bytes), so the same weights hash alike whatever their storage dtype or device. What a latent cache
    records of the VAE that wrote it and the trainer checks."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# -------------------------------------------------------------------- whichever file a user gives


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
    path: str | os.PathLike,
    name: str = "3.4B",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    allow_unexpected: bool = False,
):
    """A J-DiT from our file (size read from it) or from the published file (size `name`), in eval mode.
    allow_unexpected applies to the published file only (ours is always strict)."""
    p = _existing(path, "J-DiT", "pass --dit PATH to a .safetensors file (ours, or the published one with --model)")
    try:
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
        return load_published_dit(
            p, name, device=device, dtype=dtype or torch.float32, allow_unexpected=allow_unexpected
        ).eval()
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ModelFileError(
            f"J-DiT checkpoint {str(p)!r} does not load as {'our file' if ours else f'the published {name} model'}: "
            f"{exc}" + ("" if ours else "\n(is --model the size this checkpoint was trained at: 0.1B, 1.0B or 3.4B?)")
        ) from None


def load_vae_file(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    allow_unexpected: bool = False,
):
    """An ST-VAE from our safetensors file or from the published torch pickle, in eval mode.
    allow_unexpected applies to the published file only (ours is always strict)."""
    p = _existing(path, "ST-VAE", "pass --vae PATH (the published vae .pt/.pth or our .safetensors)")
    if p.suffix == ".safetensors":
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _VAE_FORMAT:
                    raise ModelFileError(f"{p} is not a lavin_fast ST-VAE file (metadata {sorted(meta)})")
                cfg = _config_of(meta, str(p))
                sd = {k: check_weight(k, f.get_tensor(k), str(p)) for k in f.keys()}
        except ModelFileError:
            raise
        except ValueError as exc:
            raise ModelFileError(str(exc)) from None
        except Exception as exc:
            raise ModelFileError(
                f"ST-VAE file {str(p)!r} is corrupt ({type(exc).__name__}: {exc}); write it again"
            ) from None
        try:
            vae = build_vae(device="meta", **cfg)
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"{p}: its config metadata does not describe an ST-VAE ({exc})") from None
        check_state_dict({k: tuple(v.shape) for k, v in vae.state_dict().items()}, sd, source=str(p))
        vae.load_state_dict(sd, strict=True, assign=True)
        return vae.to(device=device, dtype=dtype or torch.float32).eval()
    try:
        return load_published_vae(p, device=device, dtype=dtype or torch.float32, allow_unexpected=allow_unexpected)
    except (ValueError, RuntimeError) as exc:
        raise ModelFileError(f"ST-VAE checkpoint {str(p)!r} does not load: {exc}") from None
