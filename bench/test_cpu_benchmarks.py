"""CPU benchmarks under pytest-benchmark: the ST-VAE (bench/cpu_vae.py's models), the J-DiT (bench/cpu_dit.py's
3.4B-shaped model; bench/cpu_dit.py itself prints the side-by-side rows), the ops' torch paths and the data
pipeline (task builders, PIL decode, the in-context loader).

    make bench-cpu        # runs these, saves the run under bench/results/cpu/ (pytest-benchmark autosave)
    make bench-compare    # the last two saved runs side by side (pytest-benchmark compare)

Not part of `make test` (pyproject's testpaths is tests/): these time, they do not check. Each benchmark runs a
fixed number of rounds (pedantic mode) so that the whole file takes about a minute on 2 cores.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")


def _bench(benchmark, fn, rounds: int = 5):
    with torch.no_grad():
        return benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)


# ----------------------------------------------------------------------------------------------
# ST-VAE: the reduced-width model of bench/cpu_vae.py, ours against the published structure.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae_models():
    from bench.cpu_vae import _models

    ours, published = _models()
    img = torch.rand(2, 3, 96, 96) * 2 - 1
    clip = torch.rand(1, 3, 9, 48, 48) * 2 - 1
    with torch.no_grad():
        z_img = ours.encode(img).mean
    return {"ours": ours, "published": published, "img": img, "clip": clip, "z_img": z_img}


VAE_CASES = {
    "image_encode_2x96x96-ours": lambda m: m["ours"].encode(m["img"]),
    "image_encode_2x96x96-ours_general_path": lambda m: m["ours"].encode(m["img"], fast=False),
    "image_encode_2x96x96-published": lambda m: m["published"].encode(m["img"][:, :, None]),
    "image_decode_2x96x96-ours": lambda m: m["ours"].decode(m["z_img"]),
    "image_decode_2x96x96-published": lambda m: m["published"].decode(m["z_img"][:, :, None]),
    "clip_encode_9x48x48-ours": lambda m: m["ours"].encode(m["clip"]),
    "clip_encode_9x48x48-published": lambda m: m["published"].encode(m["clip"]),
}


@pytest.mark.benchmark(group="vae")
@pytest.mark.parametrize("case", list(VAE_CASES))
def test_vae(benchmark, vae_models, case):
    _bench(benchmark, lambda: VAE_CASES[case](vae_models), rounds=3)


# ----------------------------------------------------------------------------------------------
# J-DiT: bench/cpu_dit.py's 3.4B-shaped model (1,024 tokens), eager, float32 and (CPUs with it) bfloat16.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit_case():
    from bench.cpu_dit import CONTEXT_FRAMES, LATENT, TARGET_FRAMES, dit_models

    ours, _ = dit_models(None)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, LATENT[0], TARGET_FRAMES, *LATENT[1:], generator=g)
    cond = torch.randn(1, LATENT[0], CONTEXT_FRAMES, *LATENT[1:], generator=g)
    return ours, x, torch.rand(1, generator=g), cond


@pytest.mark.benchmark(group="dit")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dit_forward(benchmark, dit_case, dtype):
    import copy

    from lavin_fast.models.cpu_path import cpu_bf16_support

    if dtype == "bfloat16" and not cpu_bf16_support()[0]:
        pytest.skip(cpu_bf16_support()[1])
    ours, x, t, cond = dit_case
    dt = getattr(torch, dtype)
    m = ours if dt == torch.float32 else copy.deepcopy(ours).to(dt)
    _bench(benchmark, lambda: m(x.to(dt), t, cond.to(dt)), rounds=3)


# ----------------------------------------------------------------------------------------------
# Ops: the torch backend (the CPU path and every kernel's reference), float32.
# ----------------------------------------------------------------------------------------------
def _ops_cases() -> dict:
    from lavin_fast.ops import attention, gated_rms_norm_residual, qk_norm_rope, rms_norm_modulate
    from lavin_fast.ops.causal_conv3d import causal_conv3d

    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    x, scale, gate = r(2, 1024, 512), r(2, 512), r(2, 512)
    grid = (4, 16, 16)  # L = 1024
    q, k, v = r(1, 1024, 8, 64), r(1, 1024, 2, 64), r(1, 1024, 2, 64)
    qw, kw = r(8 * 64), r(2 * 64)
    vid, w3, b3 = r(1, 32, 5, 32, 32), r(32, 32, 3, 3, 3) * 0.05, r(32)
    return {
        "rms_norm_modulate_2x1024x512": lambda: rms_norm_modulate(x, scale, backend="torch"),
        "gated_rms_norm_residual_2x1024x512": lambda: gated_rms_norm_residual(x, x, gate, backend="torch"),
        "qk_norm_rope_L1024_8q2kv_hd64": lambda: qk_norm_rope(q, k, qw, kw, grid, backend="torch"),
        "attention_rope_L1024_8q2kv_hd64": lambda: attention(q, k, v, rope_grid=grid, backend="torch"),
        "causal_conv3d_32ch_5x32x32": lambda: causal_conv3d(vid, w3, b3, backend="torch"),
        "causal_conv3d_32ch_1x32x32_folded": lambda: causal_conv3d(vid[:, :, :1], w3, b3, backend="torch"),
    }


OPS = _ops_cases()


@pytest.mark.benchmark(group="ops-torch")
@pytest.mark.parametrize("case", list(OPS))
def test_op_torch_path(benchmark, case):
    _bench(benchmark, OPS[case], rounds=10)


# ----------------------------------------------------------------------------------------------
# Data: task builders (one thread, as the in-process loader runs them), PIL decode, the in-context loader.
# ----------------------------------------------------------------------------------------------
def _computed_tasks() -> list[str]:
    from lavin_fast.data.tasks import COMPUTED_TASKS

    return list(COMPUTED_TASKS)


@pytest.mark.benchmark(group="data-tasks")
@pytest.mark.parametrize("task", _computed_tasks())
def test_task_builder(benchmark, task):
    from lavin_fast.data.tasks import build_pairs

    images = torch.rand(8, 3, 128, 128) * 2 - 1
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _bench(benchmark, lambda: build_pairs(task, images, torch.Generator().manual_seed(0)))
    finally:
        torch.set_num_threads(before)


@pytest.mark.benchmark(group="data-decode")
def test_pil_decode_resize_16_jpegs(benchmark, tmp_path):
    from lavin_fast.data.benchmark import PilImageDataset, make_jpeg_set

    ds = PilImageDataset(make_jpeg_set(tmp_path, n=16), resolution=256)
    _bench(benchmark, lambda: [ds[i] for i in range(len(ds))])


@pytest.mark.benchmark(group="data-incontext")
def test_incontext_loader_demo_batch(benchmark):
    from lavin_fast.data.incontext import build_incontext_loader

    loader = build_incontext_loader("demo", resolution=64, n_pairs=2, batch_size=8, backend="torch")
    try:
        _bench(benchmark, lambda: next(loader), rounds=10)
    finally:
        loader.close()
