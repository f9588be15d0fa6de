"""Loud failures of the static report (issues 25 and 30): a kernel that does not compile prints its compiler
error and fails `kernels --report` (and `--check`); a Triton whose PTX the ptxas in use cannot read is an error
naming both versions; fp16 wgmma is an MMA kernel, not a memory kernel; the baseline ships inside the package."""

from __future__ import annotations

import argparse
import types

import pytest

from lavin_fast.perf import aot
from lavin_fast.perf import baseline as pb
from lavin_fast.perf import sass_model as sm


def _insn(text: str) -> sm.Insn:
    op, _, rest = text.partition(" ")
    return sm.Insn(0, op, rest)


def test_fp16_wgmma_with_one_type_suffix_is_counted_as_mma():
    block = [_insn("WARPGROUP.ARRIVE"), _insn("HGMMA.64x64x16.F32 R24, gdesc[UR8], R24, gsb0"),
             _insn("WARPGROUP.DEPBAR.LE gsb0, 0x0")]  # fmt: skip
    c = sm.count_block(block)
    assert c["hgmma"] == 1 and c["hgmma_shapes"] == {"64x64x16.SS": 1}
    assert c["mma_flops"] == 2 * 64 * 64 * 16
    assert c["non_mma"] == 2
    bf16 = sm.count_block([_insn("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24")])
    assert bf16["mma_flops"] == 2 * 64 * 128 * 16


def _args(**kw):
    base = dict(report=True, json=True, op=None, gpu="h100", check=False, baseline=str(pb.DEFAULT_BASELINE),
                measured=None, update_baseline=False)  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def _row(**kw):
    row = dict(op="attention", kernel="k", label="l", num_warps=4, num_stages=2, problems=[], error=None,
               error_detail=None, est_tflops=100.0)  # fmt: skip
    row.update(kw)
    return row


@pytest.mark.parametrize("check", [False, True])
def test_a_compile_error_fails_the_report_and_prints_the_compiler_message(monkeypatch, capsys, check):
    from lavin_fast.cli import kernels
    from lavin_fast.perf import kernel_report

    detail = "RuntimeError: PTX .version 9.4 does not support .target sm_90a\nptxas fatal: Unsupported .version 9.4"
    rows = [_row(), _row(kernel="broken", error="RuntimeError: ptxas fatal", error_detail=detail,
                         problems=["does not compile: RuntimeError: ptxas fatal"], est_tflops=None)]  # fmt: skip
    monkeypatch.setattr(kernel_report, "report", lambda *a, **k: [dict(r) for r in rows])
    rc = kernels.run(_args(check=check))
    err = capsys.readouterr().err
    assert rc == 1
    assert "attention/broken" in err and "Unsupported .version 9.4" in err
    monkeypatch.setattr(kernel_report, "report", lambda *a, **k: [dict(rows[0])])
    assert kernels.run(_args(check=False)) == 0


def test_compile_spec_keeps_the_whole_error_message():
    fake = types.SimpleNamespace(__name__="fake_kernel", arg_names=["x_ptr", "n"])
    spec = aot.AotSpec(op="attention", kernel=fake, signature={"x_ptr": "*bf16"}, constexprs={}, label="fake")
    r = aot.compile_spec(spec)
    assert r.error and "signature lacks argument 'n'" in r.error_detail
    assert r.problems == [f"does not compile: {r.error}"]


def test_a_ptxas_that_cannot_read_tritons_ptx_is_an_error_naming_both_versions():
    info = {"triton": "3.9.0", "ptxas": "/x/ptxas", "ptxas_release": "12.8", "ptx_emitted": 94, "ptx_readable": 87}
    with pytest.raises(RuntimeError, match=r"Triton 3\.9\.0 emits PTX ISA 9\.4.*CUDA 12\.8\) reads PTX ISA up to 8\.7"):
        aot.check_toolchain(info)
    with pytest.raises(RuntimeError, match=r"Triton 3\.9\.0 wrote PTX \.version 9\.4.*CUDA 12\.8"):
        aot.check_ptx_version("//\n.version 9.4\n.target sm_90a\n", info)
    aot.check_ptx_version(".version 8.7\n", info)  # readable: no error
    ok = aot.check_toolchain()  # the Triton installed here and its own ptxas
    assert ok["ptx_emitted"] <= ok["ptx_readable"] and ok["ptxas_release"]


def test_the_baseline_ships_inside_the_package():
    import lavin_fast

    root = pb.DEFAULT_BASELINE.resolve().parent
    assert str(root).startswith(str(__import__("pathlib").Path(lavin_fast.__file__).resolve().parent))
    assert pb.DEFAULT_BASELINE.exists() and pb.load_baseline(pb.DEFAULT_BASELINE)["kernels"]
