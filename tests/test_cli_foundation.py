"""`lavin-fast info` and `lavin-fast kernels --report`: run without a GPU; every kernel compiles for sm_90."""

import json
import os
import subprocess
import sys

import pytest


def _run(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "lavin_fast.cli", *args], capture_output=True, text=True, env=env)


def test_info_reports_versions_and_backends():
    out = _run("info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["torch"] and info["triton"]
    assert info["backends"]["torch"]["usable"] is True
    for name, b in info["backends"].items():
        assert b["detail"], f"backend {name} gives no reason"
    text = _run("info")
    assert "backends:" in text.stdout


@pytest.fixture(scope="module")
def kernel_report():
    out = _run("kernels", "--report", "--json", "--check")
    results = json.loads(out.stdout) if out.stdout.strip().startswith("[") else None
    if results and results[0].get("anchor"):  # the public anchors' table first, then one row per kernel
        results = [r for r in results if not r.get("anchor")]
    return out, results


def test_every_registered_kernel_compiles_for_sm90_without_spills(kernel_report):
    out, results = kernel_report
    assert results, f"no report: {out.stderr[-2000:]}"
    problems = [f"{r['op']}/{r['kernel']} {r['label']}: {r['problems']}" for r in results if r["problems"]]
    assert not problems, "\n".join(problems)
    assert out.returncode == 0, out.stderr[-2000:]


def test_report_covers_qk_norm_rope(kernel_report):
    _, results = kernel_report
    mine = [r for r in results if r["op"] == "qk_norm_rope"]
    assert {r["kernel"] for r in mine} == {"_rms_norm_rope_fwd_kernel", "_rms_norm_rope_bwd_kernel"}
    assert all(r["registers"] and r["spill_bytes"] == 0 for r in mine)


def test_matrix_kernels_use_hgmma(kernel_report):
    _, results = kernel_report
    matrix = [r for r in results if r["expect_hgmma"]]
    assert all(r["hgmma"] > 0 for r in matrix), [r["kernel"] for r in matrix if not r["hgmma"]]


def test_unknown_command_fails():
    assert _run("no-such-command").returncode != 0


def test_every_kernel_has_a_static_estimate(kernel_report):
    _, results = kernel_report
    for r in results:
        assert r["ctas_per_sm"] and r["occupancy_limit"] and r["load_kind"], r["label"]
        assert (r["est_tflops"] or r["est_gbps"] or 0) > 0 and r["est_bound"], r["label"]
        assert r["non_mma_per_iter"] is not None and r["mufu_per_iter"] is not None, r["label"]
        if r["expect_hgmma"]:
            assert r["hgmma_per_iter"] and r["mma_flops_per_iter"] and r["est_tflops"], r["label"]
