"""The GPUs the static model and the planner know: data-sheet facts only (no torch, no Triton), so that the command
line's --help can list them without importing the kernels."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    clock_ghz: float  # sustained SM clock under load (assumed)
    hbm_gbps: float  # data-sheet HBM bandwidth, GB/s
    memory_gib: float = 80.0  # HBM capacity
    peak_bf16_tflops: float = 989.4  # dense bf16 tensor-core peak (data sheet)
    # L2 -> SM bandwidth, GB/s, for a working set spread over the whole L2 (both partitions): measured, not a data
    # sheet figure. te42kyfo/gpu-benches gpu-l2-cache/h200.txt: 9.7-10.0 TB/s for 10-40 MB data sets on an H200
    # (132 SMs, the GH100 die and L2 of the H100 SXM and NVL: used for all three); its h100_pcie.txt: 6.9 TB/s on
    # 114 SMs (8.0 TB/s scaled to 132 SMs, a power-capped 350 W card; not used: the public GEMM anchors rule it out,
    # docs/static_report.md, L2 bandwidth)
    l2_gbps: float = 9700.0


GPUS = {
    "h100": Gpu("H100 SXM", 132, 1.755, 3350.0, 80.0, 989.4),
    "h200": Gpu("H200 SXM", 132, 1.755, 4800.0, 141.0, 989.4),
    "h100nvl": Gpu("H100 NVL", 132, 1.755, 3900.0, 94.0, 835.0),  # some public anchors were measured on it
}
DEFAULT_GPU = "h100"
