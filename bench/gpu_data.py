"""GPU data benchmark (bench/run_gpu.py contract): DALI with mixed GPU decoding (nvJPEG) against
DALI's CPU operators and PIL in a torch DataLoader (same files, same workers); online training's data path
(decode + augment + computed task + the published-size ST-VAE encoding every frame on the GPU) with the torch
decoder and with DALI mixed decoding; and the computed task builders on the GPU against the CPU. DALI is optional
on the device image: without it the DALI rows say so and the others still run."""

from __future__ import annotations

import pathlib
import tempfile
import time

TITLE = "Data: DALI mixed decoding vs CPU vs PIL DataLoader; the online path with the VAE; task builders on the GPU"


def run(budget_s: float) -> list[dict]:
    from lavin_fast.data import benchmark
    from lavin_fast.data.pipelines import dali_available

    t0 = time.perf_counter()
    files = benchmark.make_jpeg_set(tempfile.mkdtemp(prefix="lavin_fast_gpu_data_"), n=64)
    # six measurements share the budget; keep a margin for set-up
    per = max(1.0, (budget_s - 10.0) / 10)
    common = dict(resolution=256, batch_size=32, workers=4, seconds=per)
    rows = [benchmark.bench_pil(files, **common)]
    ok, why = dali_available()
    if ok:
        rows.append(benchmark.bench_dali(files, device="cpu", **common))
        rows.append(benchmark.bench_dali(files, device="gpu", **common))
    else:
        rows.append({"impl": "DALI", "note": f"not measured: {why}"})
    # the online path at 256 px: 2 sequences of 1 example pair + query per batch (8 frames), the published VAE
    from lavin_fast.models.vae import build_vae

    vae = build_vae(device="cuda").eval()
    online = dict(resolution=256, batch_size=2, n_pairs=1, seconds=per, vae=vae, encode_device="cuda")
    folder = str(pathlib.Path(files[0]).parent)
    rows.append(benchmark.bench_online(folder, "torch", "cpu", **online))
    if ok:
        rows.append(benchmark.bench_online(folder, "dali", "gpu", **online))
    del vae
    base = rows[0]["images_per_s"]
    for r in rows:
        if "images_per_s" in r:
            r["speedup"] = r["images_per_s"] / base
    cpu = {r["impl"]: r["images_per_s"] for r in benchmark.bench_tasks("cpu", 256, 8, seconds=per / 6)}
    for r in benchmark.bench_tasks("cuda", 256, 8, seconds=per / 6):
        r["speedup_vs_cpu"] = r["images_per_s"] / cpu[r["impl"]]
        rows.append(r)
    rows.append({"impl": "total", "seconds": round(time.perf_counter() - t0, 1)})
    return rows
