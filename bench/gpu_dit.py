"""J-DiT training step (forward + backward, bf16) per backend: torch reference ops + SDPA vs our kernels.

Rows: one joint block and the whole model of the 1.0B and 3.4B sizes at the published training shape
(512 x 512 images, 4 context pairs + query: Tc = 9 context frames + Tx = 1 target frame, 32 x 32 patches
per frame, 10,240 joint tokens), batch 1. Implementations:
- torch: every lavin_fast.ops call on its torch backend (RoPE by separate ops, torch SDPA);
- ours: backend "auto" (our kernels where they accept the input), RoPE in the QK-norm op;
- ours+rope_in_attn: the same with the RoPE inside the attention kernel (decides `rope_in_attention`).
Drop path is off (it is random work); the model rows use the faster "ours" RoPE placement of the block rows.
Run alone: `python -m bench.run_gpu --only dit`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bench.common import cuda_time_ms

TITLE = "J-DiT forward + backward (bf16, B=1, Tc=9 + Tx=1 frames of 32x32 patches = 10,240 tokens)"
BUDGET_WEIGHT = 2  # share of the suite's benchmark time (bench/run_gpu.py)

TC, TX, HP, WP, BATCH = 9, 1, 32, 32, 1
DEVICE = "cuda"  # a CPU smoke run of the case builders sets "cpu" and small sizes
IMPLS = {
    "torch": dict(backend="torch", rope_in_attention=False),
    "ours": dict(backend="auto", rope_in_attention=False),
    "ours+rope_in_attn": dict(backend="auto", rope_in_attention=True),
}


def _block_flops(cfg, joint_len: int, blocks: int) -> float:
    """Matmul FLOPs of forward + backward (3x forward) of `blocks` joint blocks: the per-token GEMMs
    (2 * tokens * weights) plus attention (4 * L^2 * H * hd); embedders and modulations left out."""
    D, F = cfg.hidden_size, cfg.mlp_hidden
    per_token = D * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim * D + 3 * D * F
    gemm = 2 * BATCH * joint_len * per_token
    attn = 4 * BATCH * joint_len**2 * cfg.num_heads * cfg.head_dim
    return 3.0 * blocks * (gemm + attn)


def _block_case(name: str, impl: dict) -> tuple[Callable[[], None], float, int]:
    from lavin_fast.models.dit_blocks import JointBlock, Layout, Segment
    from lavin_fast.models.dit_configs import get_config

    cfg = get_config(name, drop_path=0.0, **impl)
    blk = JointBlock(cfg).to(device=DEVICE, dtype=torch.bfloat16).train()
    with torch.no_grad():  # random modulations so that the gates are not all zero
        for m in (blk.cond_mod, blk.x_mod):
            m.weight.normal_(std=0.02)
    D, hw = cfg.hidden_size, HP * WP
    mk = lambda *s: torch.randn(*s, device=DEVICE, dtype=torch.bfloat16)
    cs, xs = mk(BATCH, TC * hw, D).requires_grad_(), mk(BATCH, TX * hw, D).requires_grad_()
    sc, sx = mk(BATCH, D), mk(BATCH, D)
    gc, gx = mk(BATCH, TC * hw, D), mk(BATCH, TX * hw, D)
    layout = Layout(HP, WP, (Segment(0, TC, 0, TX, 0),))

    def step():
        oc, ox = blk(cs, xs, sc, sx, layout)
        torch.autograd.backward((oc, ox), (gc, gx))

    tokens = BATCH * (TC + TX) * hw
    return step, _block_flops(cfg, (TC + TX) * hw, 1), tokens


_MODELS: dict[str, torch.nn.Module] = {}  # one size at a time, switched between backends by configure()


def _model_case(name: str, impl: dict) -> tuple[Callable[[], None], float, int]:
    from lavin_fast.models import build_dit

    model = _MODELS.get(name)
    if model is None:
        _MODELS.clear()
        torch.cuda.empty_cache()
        model = build_dit(name, device=DEVICE, dtype=torch.bfloat16, drop_path=0.0).train()
        with torch.no_grad():  # leave the zero init: give every modulation and the output a random weight
            for n, p in model.named_parameters():
                if "mod" in n or "final_layer" in n:
                    p.normal_(std=0.02)
        _MODELS[name] = model
    model.configure(**impl)
    h, w = HP * 2, WP * 2
    x = torch.randn(BATCH, 16, TX, h, w, device=DEVICE, dtype=torch.bfloat16)
    cond = torch.randn(BATCH, 16, TC, h, w, device=DEVICE, dtype=torch.bfloat16)
    t = torch.rand(BATCH, device=DEVICE)
    g = torch.randn(BATCH, 16, TX, h, w, device=DEVICE)

    def step():
        model.zero_grad(set_to_none=True)
        model(x, t, cond).backward(g)

    tokens = BATCH * (TC + TX) * HP * WP
    return step, _block_flops(model.cfg, (TC + TX) * HP * WP, model.cfg.depth), tokens


def run(budget_s: float = 45.0) -> list[dict]:
    start = time.time()
    rows: list[dict] = []
    plan = [("block", n, i) for n in ("1.0B", "3.4B") for i in IMPLS]
    plan += [("model", n, i) for n in ("1.0B", "3.4B") for i in ("torch", "ours")]
    base: dict[tuple[str, str], float] = {}
    best_rope: dict[str, str] = {}
    for what, name, impl_name in plan:
        if time.time() - start > budget_s:
            rows.append({"case": f"{what} {name}", "impl": impl_name, "note": "skipped: time budget spent"})
            continue
        impl = IMPLS[impl_name]
        if what == "model" and impl_name == "ours":  # the faster RoPE placement measured on the block rows
            impl_name = best_rope.get(name, "ours")
            impl = IMPLS[impl_name]
        row = {"case": f"{what} {name}", "impl": impl_name}
        try:
            fn, flops, tokens = (_block_case if what == "block" else _model_case)(name, impl)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            iters = 5 if what == "block" else 3
            ms = cuda_time_ms(fn, warmup=2, iters=iters, flush_l2=False)
            row.update(
                ms=ms,
                tokens_per_s=tokens / (ms * 1e-3),
                tflops=flops / (ms * 1e-3) / 1e12,
                peak_mib=torch.cuda.max_memory_allocated() / 2**20,
            )
            if impl_name == "torch":
                base[(what, name)] = ms
            elif (what, name) in base:
                row["speedup"] = base[(what, name)] / ms
            if what == "block" and impl_name != "torch":
                prev = [r for r in rows if r["case"] == row["case"] and r.get("impl", "").startswith("ours")]
                if not prev or ms < min(r.get("ms", float("inf")) for r in prev):
                    best_rope[name] = impl_name
        except Exception as exc:  # a failing backend is a row, not the end of the suite
            row["note"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        fn = None
        torch.cuda.empty_cache()
    _MODELS.clear()
    return rows


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
