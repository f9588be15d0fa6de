"""ST-VAE causal conv (GroupNorm -> SiLU -> causal 3x3x3 conv) on the VAE's shapes, bfloat16.

Implementations per case (all channels-last-3d, time and peak memory, same run):
- published: nn.GroupNorm, SiLU, F.pad (replicated first frame in time, zeros in H/W) = a padded
  copy, then cuDNN conv3d without padding (the published CausalConv3d);
- cudnn_pad: GroupNorm, SiLU, a time-only padded copy, cuDNN conv3d with its own H/W padding;
- hybrid: our fused GroupNorm+SiLU Triton kernel writing the time-padded input, then cuDNN;
- torch: our torch backend (norm as addcmul + SiLU frame by frame, one conv call per output frame;
  T == 1: cuDNN conv2d on the time-summed weights);
- triton: the norm pass writes the activation once (bf16), then our implicit-GEMM kernel (weights by
  TMA, causal clamp in the kernel, no padded copy; T == 1 images: the time-summed 3x3 fold).
Statistics (group_norm_stats) are included in our timings. Then the decoder's SpatialNorm -> SiLU ->
conv (published: zq upsampled, 1x1x1 convs at full resolution, GroupNorm * y + b, SiLU, padded
copy, conv; ours: statistics, the 1x1x1 convs at the latent resolution folded with the GroupNorm
into a SpatialNormSiLU record, one fused conv). Then the ResnetBlock
(norm+SiLU+conv, twice, + skip): published eager vs ours (auto backend choice, the skip added in
the second conv's epilogue).

"tflops" counts the 27 taps of the 3x3x3 conv for every case (for T == 1 the folded kernels do a
third of that work: the figure is then an effective rate against the published computation).
Last, if time remains, a sweep of the Triton kernel's tile configurations on two shapes.

Rows with impl "choice" give, per shape, the fastest of our backends and its `shape_key`: paste
them into MEASURED_CHOICES in lavin_fast/ops/causal_conv3d.py (or a JSON file named by
LAVIN_FAST_CAUSAL_CONV3D_TABLE) so that `auto` keeps the faster one for each shape.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bench.common import cuda_time_ms, peak_memory_mib

TITLE = "ST-VAE causal conv3d (GroupNorm+SiLU fused), bf16"
BUDGET_WEIGHT = 1.5  # share of the suite's benchmark time (bench/run_gpu.py)

# (label, C_in, C_out, T, H, W): the encoder/decoder levels at 512x512 images (T = 1) and at
# 17-frame 256x256 clips (T = 17, 9, 5 after the temporal downsamples)
CASES = [
    ("img enc L0", 128, 128, 1, 512, 512),
    ("img enc L1", 256, 256, 1, 256, 256),
    ("img dec L0", 512, 512, 1, 64, 64),
    ("vid enc L0", 128, 128, 17, 256, 256),
    ("vid enc L1", 256, 256, 9, 128, 128),
    ("vid enc L3", 512, 512, 5, 32, 32),
]
BLOCK_CASES = [("img", 128, 1, 512, 512), ("vid", 128, 17, 256, 256), ("vid", 512, 5, 32, 32)]
G = 32
EPS = 1e-6


def _published_conv(x, gn, w, b):
    """The published structure: GroupNorm, SiLU, F.pad copies (replicate time, zero H/W), conv3d."""
    a = F.silu(gn(x))
    kt = w.shape[2]
    a = torch.cat([a[:, :, :1].expand(-1, -1, kt - 1, -1, -1), a], dim=2) if kt > 1 else a
    a = F.pad(a, (1, 1, 1, 1, 0, 0))
    return F.conv3d(a, w, b)


def _cudnn_pad_conv(x, gn, w, b):
    a = F.silu(gn(x))
    a = torch.cat([a[:, :, :1].expand(-1, -1, 2, -1, -1), a], dim=2)
    return F.conv3d(a, w, b, padding=(0, 1, 1))


def _ours(backend):
    from lavin_fast.ops import GroupNormSiLU, causal_conv3d, group_norm_stats

    def fn(x, gn, w, b):
        mean, rstd = group_norm_stats(x, G, EPS)
        return causal_conv3d(x, w, b, norm=GroupNormSiLU(mean, rstd, gn.weight, gn.bias, G), backend=backend)

    return fn


def _make(cin, cout, T, H, W, dtype=torch.bfloat16, device="cuda"):
    x = torch.randn(1, cin, T, H, W, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    gn = torch.nn.GroupNorm(G, cin, eps=EPS).to(device, dtype)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-0.2, 0.2)
    w = (torch.randn(cout, cin, 3, 3, 3, device=device) / (27 * cin) ** 0.5).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last_3d)
    b = torch.randn(cout, device=device, dtype=dtype) * 0.1
    return x, gn, w, b


def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def run(budget_s: float) -> list[dict]:
    torch.backends.cudnn.benchmark = True  # give cuDNN its best algorithm per shape
    t_start = time.time()
    rows: list[dict] = []
    impls = {"published": _published_conv, "cudnn_pad": _cudnn_pad_conv, "torch": _ours("torch"),
             "hybrid": _ours("hybrid"), "triton": _ours("triton")}  # fmt: skip
    with torch.no_grad():
        for label, cin, cout, T, H, W in CASES:
            if time.time() - t_start > 0.6 * budget_s:
                rows.append({"case": label, "note": "skipped: time budget"})
                continue
            rows += _conv_rows(label, cin, cout, T, H, W, impls)
            torch.cuda.empty_cache()
        for label, c, T, H, W in BLOCK_CASES:
            if time.time() - t_start > 0.85 * budget_s:
                rows.append({"case": f"ResnetBlock {label}", "note": "skipped: time budget"})
                continue
            rows += _resnet_block_rows(label, c, T, H, W)
            torch.cuda.empty_cache()
        for label, c, T, H, W, Tz in SPATIAL_CASES:
            if time.time() - t_start > 0.9 * budget_s:
                rows.append({"case": f"SpatialNorm {label}", "note": "skipped: time budget"})
                continue
            rows += _spatial_rows(label, c, T, H, W, Tz)
            torch.cuda.empty_cache()
        for label, cin, cout, T, H, W in SWEEP_CASES:
            if time.time() - t_start > 0.9 * budget_s:
                rows.append({"case": f"config sweep {label}", "note": "skipped: time budget"})
                continue
            rows += _config_rows(label, cin, cout, T, H, W)
    return rows


# the decoder's SpatialNorm -> SiLU -> conv at its top level (C 128): 512x512 images, 17-frame clips
SPATIAL_CASES = [("img dec L3", 128, 1, 512, 512, 1), ("vid dec L3", 128, 17, 256, 256, 5)]


def _published_spatial(f, zq, gn, wy, by, wb, bb, w, b):
    """Published: zq upsampled (frame 0 alone, the rest together), 1x1x1 convs at full resolution,
    GroupNorm * y + b, SiLU, padded copy, conv."""
    T, H, W = f.shape[2:]
    if T > 1:
        up = torch.cat([F.interpolate(zq[:, :, :1], size=(1, H, W)),
                        F.interpolate(zq[:, :, 1:], size=(T - 1, H, W))], dim=2)  # fmt: skip
    else:
        up = F.interpolate(zq[:, :, :1], size=(1, H, W))
    a = F.silu(gn(f) * F.conv3d(up, wy, by) + F.conv3d(up, wb, bb))
    a = torch.cat([a[:, :, :1].expand(-1, -1, 2, -1, -1), a], dim=2)
    return F.conv3d(F.pad(a, (1, 1, 1, 1, 0, 0)), w, b)


def _ours_spatial(f, zq, gn, wy, by, wb, bb, w, b):
    from lavin_fast.ops import SpatialNormSiLU, causal_conv3d, group_norm_stats

    C, T = f.shape[1], f.shape[2]
    mean, rstd = group_norm_stats(f, G, EPS)
    a = rstd.repeat_interleave(C // G, dim=1) * gn.weight.float()  # GroupNorm(f) = f * a + d
    d = gn.bias.float() - mean.repeat_interleave(C // G, dim=1) * a
    y, bz = F.conv3d(zq, wy, by).float(), F.conv3d(zq, wb, bb).float()  # at the latent resolution
    scale = y * a[:, :, None, None, None]
    shift = torch.addcmul(bz, y, d[:, :, None, None, None])
    Tz = zq.shape[2]
    t_index = torch.zeros(T, dtype=torch.int32, device=f.device)
    if T > 1:
        t_index[1:] = 1 + torch.arange(T - 1, device=f.device) * (Tz - 1) // (T - 1)
    return causal_conv3d(f, w, b, norm=SpatialNormSiLU(scale, shift, t_index))


def _spatial_rows(label, c, T, H, W, Tz) -> list[dict]:
    f, gn, w, b = _make(c, c, T, H, W)
    zq = torch.randn(1, 16, Tz, H // 8, W // 8, device="cuda", dtype=torch.bfloat16)
    zq = zq.contiguous(memory_format=torch.channels_last_3d)
    wy, wb = (torch.randn(c, 16, 1, 1, 1, device="cuda", dtype=torch.bfloat16) * 0.25 for _ in range(2))
    by, bb = (torch.randn(c, device="cuda", dtype=torch.bfloat16) * 0.1 for _ in range(2))
    args = (f, zq, gn, wy, by, wb, bb, w, b)
    case = f"SpatialNorm {label} C{c} T{T} {H}x{W}"
    ref = _published_spatial(*args)
    err = _rel_err(_ours_spatial(*args), ref)
    rows, base = [], None
    for name, fn in (("published", _published_spatial), ("ours(auto)", _ours_spatial)):
        ms = cuda_time_ms(lambda fn=fn: fn(*args), warmup=2, iters=8)
        base = base or ms
        rows.append({"case": case, "impl": name, "ms": ms, "peak_mib": peak_memory_mib(lambda fn=fn: fn(*args)),
                     "speedup": base / ms, "max_rel_err": err if name != "published" else 0.0})  # fmt: skip
    return rows


# tile configurations of the Triton kernel timed against each other (all compile without spills for
# sm_90); the rule in gpu_conv_config picks 128x256x64 for Cout >= 256, else 128x128x64
SWEEP_CASES = [("vid enc L1", 256, 256, 9, 128, 128), ("img dec L0", 512, 512, 1, 64, 64)]
SWEEP_CONFIGS = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 32, 8, 4), (256, 128, 64, 8, 3)]


def _config_rows(label, cin, cout, T, H, W) -> list[dict]:
    import sys

    from lavin_fast.ops import GroupNormSiLU, group_norm_stats

    cc = sys.modules["lavin_fast.ops.causal_conv3d"]
    x, gn, w, b = _make(cin, cout, T, H, W)
    mean, rstd = group_norm_stats(x, G, EPS)
    norm = GroupNormSiLU(mean, rstd, gn.weight, gn.bias, G)
    p = cc._Problem(x, w, b, norm, None, False, T == 1)
    ap = cc._conv_input(p, 0)  # the norm pass's output: the sweep times the implicit GEMM alone
    case = f"config sweep {label} C{cin}->{cout} T{T} {H}x{W}"
    flops = 2.0 * T * H * W * cin * cout * 27
    rows, ref = [], None
    for bm, bn, bk, warps, stages in SWEEP_CONFIGS:
        cfg = cc.ConvConfig(bm, bn, bk, 8, warps, stages)
        out = cc._triton_conv(ap, w, b, None, T == 1, 0, cfg)
        ref = out if ref is None else ref
        ms = cuda_time_ms(lambda cfg=cfg: cc._triton_conv(ap, w, b, None, T == 1, 0, cfg), warmup=2, iters=8)
        rows.append({"case": case, "impl": f"triton {bm}x{bn}x{bk} w{warps} s{stages}", "ms": ms,
                     "tflops": flops / ms / 1e9, "max_rel_err": _rel_err(out, ref)})  # fmt: skip
    return rows


def _conv_rows(label, cin, cout, T, H, W, impls) -> list[dict]:
    from lavin_fast.ops.causal_conv3d import shape_key

    x, gn, w, b = _make(cin, cout, T, H, W)
    case = f"{label} C{cin}->{cout} T{T} {H}x{W}"
    flops = 2.0 * T * H * W * cin * cout * 27
    ref = _published_conv(x, gn, w, b)
    rows, ours, base_ms = [], {}, None
    for name, fn in impls.items():
        err = _rel_err(fn(x, gn, w, b), ref)
        ms = cuda_time_ms(lambda fn=fn: fn(x, gn, w, b), warmup=2, iters=8)
        mib = peak_memory_mib(lambda fn=fn: fn(x, gn, w, b))
        base_ms = base_ms or ms
        if name in ("torch", "hybrid", "triton"):
            ours[name] = ms
        rows.append({"case": case, "impl": name, "ms": ms, "tflops": flops / ms / 1e9, "peak_mib": mib,
                     "speedup": base_ms / ms, "max_rel_err": err})  # fmt: skip
    best = min(ours, key=ours.get)
    rows.append({"case": case, "impl": "choice", "note": f"{shape_key(x, w, True, T == 1)!r}: {best!r}"})
    return rows


def _resnet_block_rows(label, c, T, H, W) -> list[dict]:
    from lavin_fast.ops import GroupNormSiLU, causal_conv3d, group_norm_stats

    x, gn1, w1, b1 = _make(c, c, T, H, W)
    _, gn2, w2, b2 = _make(c, c, 1, 1, 1)

    def published():
        h = _published_conv(x, gn1, w1, b1)
        return x + _published_conv(h, gn2, w2, b2)

    def ours():
        m, r = group_norm_stats(x, G, EPS)
        h = causal_conv3d(x, w1, b1, norm=GroupNormSiLU(m, r, gn1.weight, gn1.bias, G))
        m, r = group_norm_stats(h, G, EPS)
        # the skip is added in the conv's epilogue
        return causal_conv3d(h, w2, b2, norm=GroupNormSiLU(m, r, gn2.weight, gn2.bias, G), residual=x)

    case = f"ResnetBlock {label} C{c} T{T} {H}x{W}"
    ref = published()
    err = _rel_err(ours(), ref)
    rows = []
    base = None
    for name, fn in (("published", published), ("ours(auto)", ours)):
        ms = cuda_time_ms(fn, warmup=2, iters=8)
        base = base or ms
        rows.append({"case": case, "impl": name, "ms": ms, "peak_mib": peak_memory_mib(fn), "speedup": base / ms,
                     "max_rel_err": err if name != "published" else 0.0})  # fmt: skip
    return rows
