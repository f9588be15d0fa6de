"""GPU benchmark of the full-size ST-VAE in bfloat16 (bench/run_gpu.py contract).

Cases: encode and decode of a batch of 512x512 images (one-frame clips, the in-context use) and of a
17-frame 256x256 clip. Implementations: ours (one-frame fast path; and forced onto the general path for
images), the published structure run plainly (bench/published_vae.py) in eager PyTorch and under
torch.compile, and ours under torch.compile when the budget allows. Each row: median ms, peak memory
allocated during one call above what was allocated before, speedup against the published structure in
eager mode measured in the same run, and the max relative difference of the output from the published
structure's (random weights, same for both).
"""

from __future__ import annotations

import time

import torch

TITLE = "ST-VAE (full size, bf16): ours vs the published structure"
BUDGET_WEIGHT = 1.5  # share of the suite's benchmark time (bench/run_gpu.py)

IMAGES = (4, 512)  # batch, side
CLIP = (17, 256)  # frames, side
DEVICE = "cuda"
OVERRIDES: dict = {}  # model overrides (a CPU smoke run of this file uses a tiny model)


def _models():
    from bench.published_vae import PublishedVAE, randomize_vae_
    from lavin_fast.models import build_vae

    torch.manual_seed(0)
    ours = build_vae(device=DEVICE, dtype=torch.bfloat16, **OVERRIDES)
    randomize_vae_(ours)
    with torch.device("meta"):
        pub = PublishedVAE(**OVERRIDES)
    pub.load_state_dict(ours.state_dict(), assign=True)  # shares the tensors: no second copy of the weights
    return ours, pub.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def run(budget_s: float) -> list[dict]:
    from bench.common import cuda_time_ms, peak_memory_mib

    t_start = time.time()
    ours, pub = _models()
    B, S = IMAGES
    T, side = CLIP
    img = torch.rand(B, 3, S, S, device=DEVICE, dtype=torch.bfloat16) * 2 - 1
    clip = torch.rand(1, 3, T, side, side, device=DEVICE, dtype=torch.bfloat16) * 2 - 1
    rows: list[dict] = []
    with torch.no_grad():
        z_img = ours.encode(img).mean
        z_clip = ours.encode(clip).mean
        cases = {
            f"image encode {B}x{S}x{S}": {
                "published eager": lambda: pub.encode(img[:, :, None])[0][:, :, 0],
                "ours": lambda: ours.encode(img).mean,
                "ours general path": lambda: ours.encode(img, fast=False).mean,
            },
            f"image decode {B}x{S}x{S}": {
                "published eager": lambda: pub.decode(z_img[:, :, None])[:, :, 0],
                "ours": lambda: ours.decode(z_img),
                "ours general path": lambda: ours.decode(z_img, fast=False),
            },
            f"clip encode {T}x{side}x{side}": {
                "published eager": lambda: pub.encode(clip)[0],
                "ours": lambda: ours.encode(clip).mean,
            },
            f"clip decode {T}x{side}x{side}": {
                "published eager": lambda: pub.decode(z_clip),
                "ours": lambda: ours.decode(z_clip),
            },
        }
        for case, impls in cases.items():
            ref = impls["published eager"]()
            base = None
            for impl, fn in impls.items():
                out = fn()
                ms = cuda_time_ms(fn, warmup=1, iters=5)
                peak = peak_memory_mib(fn)
                base = ms if impl == "published eager" else base
                rows.append({"case": case, "impl": impl, "ms": ms, "peak_mib": round(peak, 1),
                             "speedup": base / ms, "rel_diff_vs_published": _rel(out, ref)})  # fmt: skip
                del out
            del ref
        # torch.compile rows while the budget lasts (compilation dominates their cost)
        from lavin_fast.models.vae_blocks import RunContext

        refs = {
            f"image encode {B}x{S}x{S}": pub.encode(img[:, :, None])[0][:, :, 0],
            f"image decode {B}x{S}x{S}": pub.decode(z_img[:, :, None])[:, :, 0],
        }
        penc, pdec = torch.compile(pub.encoder), torch.compile(pub.decoder)
        oenc, odec = torch.compile(ours.encoder), torch.compile(ours.decoder)
        lat = z_img.shape[1]
        compiled = [
            ("published compiled", f"image encode {B}x{S}x{S}", lambda: penc(img[:, :, None])[:, :lat, 0]),
            ("published compiled", f"image decode {B}x{S}x{S}", lambda: pdec(z_img[:, :, None])[:, :, 0]),
            ("ours compiled", f"image encode {B}x{S}x{S}", lambda: oenc(img[:, :, None], RunContext())[:, :lat, 0]),
            ("ours compiled", f"image decode {B}x{S}x{S}", lambda: odec(z_img[:, :, None], RunContext())[:, :, 0]),
        ]
        for impl, case, fn in compiled:
            if time.time() - t_start > 0.6 * budget_s:
                rows.append({"case": case, "impl": impl, "note": "skipped: benchmark budget spent"})
                continue
            try:
                out = fn()  # compiles
                ms = cuda_time_ms(fn, warmup=1, iters=5)
                peak = peak_memory_mib(fn)
                base = next(r["ms"] for r in rows if r["case"] == case and r["impl"] == "published eager")
                rows.append({"case": case, "impl": impl, "ms": ms, "peak_mib": round(peak, 1),
                             "speedup": base / ms, "rel_diff_vs_published": _rel(out, refs[case])})  # fmt: skip
            except Exception as exc:  # a compile failure is a result to report, not a crash of the suite
                rows.append({"case": case, "impl": impl, "note": f"failed: {type(exc).__name__}: {exc}"[:200]})
    return rows
