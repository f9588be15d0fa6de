"""The J-DiT (joint diffusion transformer) of LaVin-DiT: model, builder, guided forward.

Public API:
- `build_dit(name, *, device=None, dtype=None, **overrides) -> JDiT` for "0.1B", "1.0B", "3.4B" and the
  test sizes in `DIT_CONFIGS`; overrides use the published names (hidden_size, depth, num_heads,
  kv_group, drop_path, uncond_ratio) plus ours (rope_in_attention, grad_checkpointing, backend, ...).
- `JDiT.forward(x, t, cond, *, rope_t_offset=None) -> v` and `JDiT.guided(x, t, cond, scale=1.5)`.
- Files (published and ours) load and save in models/checkpoints.py.

The exact function is docs/numerics.md (section J-DiT); the fused layouts and the
packed guided forward are described in dit_blocks.py and docs/dit.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lavin_fast.models.dit_blocks import FinalLayer, JointBlock, Layout, Segment, TimestepEmbedder, _xavier_
from lavin_fast.models.dit_configs import DIT_CONFIGS, PUBLISHED_PARAMS, DiTConfig, get_config

__all__ = [
    "DIT_CONFIGS",
    "PUBLISHED_PARAMS",
    "DiTConfig",
    "JDiT",
    "build_dit",
]


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


class JDiT(nn.Module):
    """Joint DiT: a cond stream (context latents) and an x stream (noisy target latents) that share
    joint attention; predicts the flow-matching velocity of x."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.prompt_embed = nn.Parameter(torch.zeros(1, D))
        self.answer_embed = nn.Parameter(torch.zeros(1, D))
        self.cond_embedder = nn.Sequential(nn.Linear(cfg.patch_dim, D), nn.LayerNorm(D, eps=1e-5))
        self.x_embedder = nn.Sequential(nn.Linear(cfg.patch_dim, D), nn.LayerNorm(D, eps=1e-5))
        self.t_embedder = TimestepEmbedder(D)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(JointBlock(cfg, r, last=i == cfg.depth - 1) for i, r in enumerate(rates))
        self.final_layer = FinalLayer(cfg)
        # context parallelism (set by lavin_fast.parallel.context_parallel.attach): an object whose
        # plan(hp, wp, segments, Lc, Lx, head_dim, device) shards the streams; None: one rank holds everything
        self.context_parallel = None
        self.reset_parameters()

    # ---------------------------------------------------------------- init
    def reset_parameters(self) -> None:
        """Initialisation for training from scratch (docs/numerics.md): Xavier-uniform linears with zero
        bias, zero modulations and final projection, normal(0, 0.02) embeddings and time MLP."""
        for emb in (self.cond_embedder, self.x_embedder):
            _xavier_(emb[0].weight)
            nn.init.zeros_(emb[0].bias)
            emb[1].reset_parameters()
        nn.init.normal_(self.prompt_embed, std=0.02)
        nn.init.normal_(self.answer_embed, std=0.02)
        self.t_embedder.reset_parameters()
        for blk in self.blocks:
            blk.reset_parameters()
        self.final_layer.reset_parameters()

    # ---------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return self.prompt_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.prompt_embed.dtype

    def _patchify(self, z: torch.Tensor) -> torch.Tensor:
        """[B, C, T, h, w] -> [B, T*hp*wp, p*p*C], features (patch-row, patch-col, channel)."""
        B, C, T, h, w = z.shape
        p = self.cfg.patch_size
        z = z.reshape(B, C, T, h // p, p, w // p, p).permute(0, 2, 3, 5, 4, 6, 1)
        return z.reshape(B, T * (h // p) * (w // p), p * p * C)

    def _unpatchify(self, tok: torch.Tensor, T: int, h: int, w: int) -> torch.Tensor:
        B = tok.shape[0]
        p, C = self.cfg.patch_size, self.cfg.in_channels
        z = tok.reshape(B, T, h // p, w // p, p, p, C).permute(0, 6, 1, 2, 4, 3, 5)
        return z.reshape(B, C, T, h, w)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, cond_name: str = "cond") -> None:
        cfg = self.cfg
        for name, z in (("x", x), (cond_name, cond)):
            if not isinstance(z, torch.Tensor) or z.dim() != 5:
                got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise ValueError(f"{name} must be latents [B, {cfg.in_channels}, T, h, w], got {got}")
            if z.shape[1] != cfg.in_channels:
                raise ValueError(
                    f"{name} has {z.shape[1]} channels (shape {_shape(z)}); the model expects {cfg.in_channels}"
                )
            if z.shape[2] < 1:
                raise ValueError(f"{name} needs at least one frame, got shape {_shape(z)}")
            if not z.dtype.is_floating_point:
                raise ValueError(f"{name} must be floating point, got dtype {z.dtype}")
        p = cfg.patch_size
        if x.shape[3] % p or x.shape[4] % p:
            raise ValueError(
                f"x spatial size {tuple(x.shape[3:])} (shape {_shape(x)}) is not divisible by the patch {p}"
            )
        if cond.shape[3:] != x.shape[3:]:
            raise ValueError(
                f"{cond_name} spatial size {tuple(cond.shape[3:])} (shape {_shape(cond)}) differs from x's "
                f"{tuple(x.shape[3:])} (shape {_shape(x)})"
            )
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"t must be a 1-D tensor [B] of times in [0, 1], got {got}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"t must be floating point, got dtype {t.dtype}")
        if not (x.shape[0] == cond.shape[0] == t.shape[0]):
            raise ValueError(
                f"batch sizes disagree: x {_shape(x)}, t {_shape(t)}, {cond_name} {_shape(cond)} (dim 0 must match)"
            )
        if x.dtype != cond.dtype:
            raise ValueError(f"dtypes disagree: x is {x.dtype} (shape {_shape(x)}), {cond_name} is {cond.dtype}")
        devs = {("x", x.device), ("t", t.device), (cond_name, cond.device), ("model", self.device)}
        if len({d for _, d in devs}) > 1:
            raise ValueError(
                "devices disagree: " + ", ".join(f"{n} on {d}" for n, d in sorted(devs, key=lambda a: a[0]))
            )

    # ---------------------------------------------------------------- forward
    def _blocks(
        self, cs: torch.Tensor, xs: torch.Tensor, silu_c: torch.Tensor, silu_x: torch.Tensor, layout: Layout
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ckpt = self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            if ckpt:
                cs, xs = checkpoint(blk, cs, xs, silu_c, silu_x, layout, use_reentrant=False)
            else:
                cs, xs = blk(cs, xs, silu_c, silu_x, layout)
        return cs, xs

    def _run(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, segments: tuple[Segment, ...]) -> torch.Tensor:
        """Token pipeline on (already checked) x [B, C, Tx, h, w] and cond [B, C, Tc, h, w] laid out as `segments`."""
        p = self.cfg.patch_size
        h, w = x.shape[3], x.shape[4]
        layout = Layout(h // p, w // p, segments)
        wdt = self.dtype
        cs = self.cond_embedder(self._patchify(cond).to(wdt))
        xs = self.x_embedder(self._patchify(x).to(wdt))
        plan = None
        if self.context_parallel is not None:  # this rank keeps its share of each stream's tokens
            plan = self.context_parallel.plan(
                h // p, w // p, segments, cs.shape[1], xs.shape[1], self.cfg.head_dim, cs.device
            )
            cs, xs = plan.shard_cond(cs), plan.shard_x(xs)
            layout = Layout(h // p, w // p, segments, cp=plan)
        temb = self.t_embedder(t)
        silu_c = F.silu(temb + self.prompt_embed)  # every modulation takes SiLU(c): computed once here
        silu_x = F.silu(temb + self.answer_embed)
        cs, xs = self._blocks(cs, xs, silu_c, silu_x, layout)
        out = self.final_layer(xs, silu_x)
        if plan is not None:
            out = plan.gather_x(out)  # every cp rank returns the whole prediction
        return self._unpatchify(out, x.shape[2], h, w).float()

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, *, rope_t_offset: int | None = None
    ) -> torch.Tensor:
        """Velocity [B, 16, Tx, h, w] (float32) of the noisy target latents x [B, 16, Tx, h, w] at times t [B]
        given the context latents cond [B, 16, Tc, h, w].

        rope_t_offset: shift of every RoPE time position (None: 0); the published training code shifts a
        one-frame joint sequence by a random integer in [0, 32): a trainer passes that here.
        """
        self._check_inputs(x, t, cond)
        off = 0 if rope_t_offset is None else int(rope_t_offset)
        return self._run(x, t, cond, (Segment(0, cond.shape[2], 0, x.shape[2], off),))

    @staticmethod
    def null_context(cond: torch.Tensor) -> torch.Tensor:
        """The published unconditional context: one all-zero latent frame, then the query's (last) frame."""
        q = cond[:, :, -1:]
        return torch.cat([torch.zeros_like(q), q], dim=2)

    def guided(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        *,
        scale: float = 1.5,
        null_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Classifier-free guidance v_u + scale * (v_c - v_u), both passes in one model call.

        null_cond defaults to `null_context(cond)` (Tc = 2). When the two contexts have the same length the
        passes are stacked on the batch; otherwise they are packed along the tokens: the cond stream holds
        [cond ; null_cond] and the x stream [x ; x] for each sample, every token-wise op (GEMMs, norms,
        modulation: t is shared, so is the modulation) runs once on the packed tokens, and only attention
        runs per sequence (two segments). scale == 1 returns the conditional prediction alone.
        """
        self._check_inputs(x, t, cond)
        if null_cond is None:
            null_cond = self.null_context(cond)
        else:
            self._check_inputs(x, t, null_cond, cond_name="null_cond")
        if float(scale) == 1.0:
            return self.forward(x, t, cond)
        Tc, Tn, Tx = cond.shape[2], null_cond.shape[2], x.shape[2]
        if Tc == Tn:
            v = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null_cond]))
            v_c, v_u = v.chunk(2)
        else:
            segments = (Segment(0, Tc, 0, Tx, 0), Segment(Tc, Tn, Tx, Tx, 0))
            v = self._run(torch.cat([x, x], dim=2), t, torch.cat([cond, null_cond], dim=2), segments)
            v_c, v_u = v[:, :, :Tx], v[:, :, Tx:]
        return v_u + scale * (v_c - v_u)

    RUNTIME_OPTIONS = ("backend", "rope_in_attention", "grad_checkpointing", "drop_path", "uncond_ratio")

    def configure(self, **options) -> JDiT:
        """Change options that do not change any shape (RUNTIME_OPTIONS) on a built model; returns self."""
        bad = sorted(set(options) - set(self.RUNTIME_OPTIONS))
        if bad:
            raise ValueError(
                f"configure: {bad} cannot change on a built model; runtime options: {self.RUNTIME_OPTIONS}"
            )
        cfg = self.cfg.replace(**options)
        for m in self.modules():  # every submodule shares the config object
            if hasattr(m, "cfg"):
                m.cfg = cfg
        for i, blk in enumerate(self.blocks):
            blk.drop_path = cfg.drop_path * i / max(cfg.depth - 1, 1)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@contextlib.contextmanager
def _maybe_device(device: torch.device | str | None) -> Iterator[None]:
    if device is None:
        yield
    else:
        with torch.device(device):
            yield


def build_dit(
    name: str | DiTConfig = "3.4B",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> JDiT:
    """A freshly initialised J-DiT of size `name` with `overrides` applied (device="meta": no memory)."""
    cfg = get_config(name, **overrides)
    with _maybe_device(device):
        model = JDiT(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model
