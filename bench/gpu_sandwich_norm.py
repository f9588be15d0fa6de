"""Sandwich norm on the GPU: rms_norm_modulate and gated_rms_norm_residual, forward and backward, bf16.

For tokens N in {4k, 16k, 40k} (B = 2) x D in {512, 1024, 2304}: time of each implementation (CUDA C++,
Triton, torch eager reference, torch.compile of the reference, apex FusedRMSNorm + eager modulation
when apex is importable, and the Hopper baselines of Liger-Kernel when importable: LigerModulatedRMSNorm
(the same pre-norm fused, where the installed version has it) and LigerRMSNorm + eager modulation / tanh
gate and residual add), achieved bandwidth = minimum bytes / time, and that as a fraction of the
measured device copy bandwidth. Backward rows time autograd.grad of a retained graph (everything the
backward runs, including the dscale/dgate reduction). Minimum bytes (s = element size, N*D elements):
    modulate fwd: read x, write y                    2 N D s
    modulate bwd: read x, dy; write dx               3 N D s
    gated fwd:    read residual, h; write out        3 N D s
    gated bwd:    read h, dout; write dh             3 N D s   (d residual = d out, no traffic)
The [B, D] scale/gate and their gradients are negligible and not counted.
Run alone: python -m bench.run_gpu --only sandwich_norm
"""

from __future__ import annotations

import time

import torch

from bench.common import copy_bandwidth_gbs, cuda_time_ms

TITLE = "Sandwich norm (RMSNorm x (1 + scale); residual + tanh(gate) x RMSNorm), bf16, fwd and bwd"

TOKENS = (4096, 16384, 40960)
WIDTHS = (2304, 1024, 512)  # the target size first, so a tight budget still measures it
BATCH = 2
MIN_BYTES_PER_ELEM = {("modulate", "fwd"): 2, ("modulate", "bwd"): 3, ("gated", "fwd"): 3, ("gated", "bwd"): 3}


def _impls(kind: str) -> dict:
    """name -> callable(args) for each implementation available here (or a string: why not)."""
    from lavin_fast.ops import _cuda
    from lavin_fast.ops import sandwich_norm as sn

    op = sn.rms_norm_modulate if kind == "modulate" else sn.gated_rms_norm_residual
    ref = sn.reference_rms_norm_modulate if kind == "modulate" else sn.reference_gated_rms_norm_residual
    out: dict = {}
    usable, why = _cuda.status()
    out["cuda"] = (lambda *a: op(*a, backend="cuda")) if usable else f"unusable: {why}"
    out["triton"] = lambda *a: op(*a, backend="triton")
    out["torch eager"] = ref
    out["torch.compile"] = torch.compile(ref, dynamic=True)  # one compile for every shape
    try:
        from apex.normalization import FusedRMSNorm  # the published code's dependency
    except Exception as exc:
        out["apex FusedRMSNorm"] = f"not importable ({type(exc).__name__})"
    else:
        norms: dict[int, torch.nn.Module] = {}

        def apex_impl(*a):
            D = a[-1].shape[-1]
            norm = norms.setdefault(D, FusedRMSNorm(D, eps=1e-6, elementwise_affine=False).cuda())
            if kind == "modulate":
                x, s = a
                return norm(x) * (1 + s[:, None, :])
            r, h, g = a
            return r + torch.tanh(g)[:, None, :] * norm(h)

        out["apex FusedRMSNorm"] = apex_impl
    out.update(_liger_impls(kind))
    return out


def _liger_module(cls, D: int, **kw) -> torch.nn.Module:
    """A Liger norm without an affine weight where the installed version allows it (older ones
    always have a weight: ones, the same output, and a weight gradient the backward also computes)."""
    try:
        return cls(D, eps=1e-6, in_place=False, elementwise_affine=False, **kw).cuda()
    except TypeError:
        return cls(D, eps=1e-6, **kw).cuda()


def _liger_impls(kind: str) -> dict:
    """Hopper baselines from Liger-Kernel (Triton) when importable: LigerModulatedRMSNorm
    (RMSNorm(x) * (1 + scale), scale [B, D] shared over the tokens) for the modulated pre-norm, else
    LigerRMSNorm + eager modulation; LigerRMSNorm + eager tanh gate and residual add for the post-norm."""
    try:
        from liger_kernel.transformers import LigerRMSNorm
    except Exception as exc:
        return {"Liger": f"not importable ({type(exc).__name__}; pip install liger-kernel)"}
    norms: dict[tuple, torch.nn.Module] = {}
    out: dict = {}
    if kind == "modulate":
        try:
            from liger_kernel.transformers.modulated_rms_norm import LigerModulatedRMSNorm
        except Exception as exc:
            out["LigerModulatedRMSNorm"] = f"not in this liger-kernel ({type(exc).__name__})"
        else:

            def modulated(x, s):
                key = ("modulated", x.shape[-1])
                if key not in norms:
                    norms[key] = _liger_module(LigerModulatedRMSNorm, x.shape[-1])
                return norms[key](x, s)

            out["LigerModulatedRMSNorm"] = modulated

    def rms(t):
        key = ("rms", t.shape[-1])
        if key not in norms:
            norms[key] = _liger_module(LigerRMSNorm, t.shape[-1])
        return norms[key](t)

    if kind == "modulate":
        out["LigerRMSNorm + eager modulation"] = lambda x, s: rms(x) * (1 + s[:, None, :])
    else:
        out["LigerRMSNorm + eager gate"] = lambda r, h, g: r + torch.tanh(g)[:, None, :] * rms(h)
    return out


def _inputs(kind: str, N: int, D: int) -> list[torch.Tensor]:
    L = N // BATCH
    x = torch.randn(BATCH, L, D, device="cuda", dtype=torch.bfloat16)
    v = 0.5 * torch.randn(BATCH, D, device="cuda", dtype=torch.bfloat16)
    if kind == "modulate":
        return [x.requires_grad_(), v.requires_grad_()]
    r = torch.randn(BATCH, L, D, device="cuda", dtype=torch.bfloat16)
    return [r.requires_grad_(), x.requires_grad_(), v.requires_grad_()]


def _measure(kind: str, N: int, D: int, impls: dict, copy: float, compile_ok: bool) -> list[dict]:
    """Rows of every implementation for one shape: fwd and bwd time, bandwidth, speedup vs eager."""
    args = _inputs(kind, N, D)
    dy = torch.randn(args[-2].shape, device="cuda", dtype=torch.bfloat16)
    out: list[dict] = []
    for name, fn in impls.items():
        if isinstance(fn, str) or (name == "torch.compile" and not compile_ok):
            continue
        try:
            fwd_ms = cuda_time_ms(lambda fn=fn: fn(*args), iters=8)
            y = fn(*args)
            bwd_ms = cuda_time_ms(lambda y=y: torch.autograd.grad(y, args, dy, retain_graph=True), warmup=2, iters=8)
            del y
        except Exception as exc:  # one failing impl must not hide the others
            out.append({"case": f"{kind} N={N} D={D}", "impl": name, "note": f"failed: {exc}"[:200]})
            continue
        for pas, ms in (("fwd", fwd_ms), ("bwd", bwd_ms)):
            gbps = MIN_BYTES_PER_ELEM[(kind, pas)] * N * D * 2 / (ms * 1e-3) / 1e9
            out.append({"case": f"{kind} {pas} N={N} D={D}", "impl": name, "pass": pas, "ms": ms, "gbps": gbps,
                        "pct_copy": 100.0 * gbps / copy})  # fmt: skip
            if name == "triton" and pas == "fwd" and N == 16384:  # one kernel launch, the static report's shape
                op = (
                    "rms_norm_modulate/_modulate_fwd_kernel"
                    if kind == "modulate"
                    else "gated_rms_norm_residual/_gated_fwd_kernel"
                )
                out[-1]["kernel_key"] = f"{op}/D={D} bf16, 16k tokens"  # bench/run_gpu.py -> <stem>-measured.json
    eager = {r["pass"]: r["ms"] for r in out if r.get("impl") == "torch eager" and "pass" in r}
    for r in out:
        if "pass" in r:
            r["speedup_vs_eager"] = eager[r["pass"]] / r["ms"] if r["pass"] in eager else None
            del r["pass"]
    return sorted(out, key=lambda r: r["case"])


def run(budget_s: float) -> list[dict]:
    try:  # compiled backwards donate buffers and then refuse retain_graph=True, which the bwd timing needs
        import torch._functorch.config as functorch_config

        with functorch_config.patch(donated_buffer=False):
            return _run(budget_s)
    except (ImportError, AttributeError):
        return _run(budget_s)


def _run(budget_s: float) -> list[dict]:
    t0 = time.time()
    copy = copy_bandwidth_gbs()
    rows: list[dict] = [{"case": "device copy", "impl": "torch copy_", "gbps": copy, "note": "reference bandwidth"}]
    impls = {kind: _impls(kind) for kind in ("modulate", "gated")}
    for kind in ("modulate", "gated"):
        rows += [{"case": kind, "impl": n, "note": fn} for n, fn in impls[kind].items() if isinstance(fn, str)]
    for D in WIDTHS:
        for N in TOKENS:
            for kind in ("modulate", "gated"):
                if time.time() - t0 > 0.85 * budget_s:
                    rows.append({"case": f"{kind} N={N} D={D}", "note": "skipped: out of time budget"})
                    continue
                # compiling is the slow part: past 60% of the budget, keep only the kernels' rows
                rows += _measure(kind, N, D, impls[kind], copy, compile_ok=time.time() - t0 < 0.6 * budget_s)
    torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    from bench.run_gpu import markdown_table

    print(markdown_table(run(40.0)))
