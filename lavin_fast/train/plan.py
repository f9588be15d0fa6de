"""Before booking GPUs: does a J-DiT training run fit, on which mesh, and how long should a step take?

`plan(PlanInput(...))` returns a `Plan`: the mesh (parallel/mesh.py's auto rule, or the given degrees), memory per GPU
by part, step time from the FLOPs and the static sm_90 kernel estimates, communication per mesh dimension, and MFU.
Every figure is an estimate from a model, not a measurement. `lavin-fast plan` prints it.

Memory per GPU (bytes; P parameters, S = dp_shard x cp ranks sharing one copy):
- parameters 4P/S (float32 masters), gradients 4P/S (float32, reduce-scattered), AdamW 8P/S, EMA 4P/S; with
  gradient accumulation, the unsharded float32 gradients of the micro-steps before the sync (4P);
- FSDP2 buffers (S > 1): the bf16 parameters of two blocks (the current one and the prefetched next) and the float32
  gradients of one block before its reduce-scatter;
- activations of one micro-batch: per block and token, a*D + b*M values (D width, M SwiGLU hidden) by policy,
  plus (90 + 2D) per token outside the blocks. a, b were measured on the reference implementation (CPU, float32,
  live storages after the forward, per added block): none a=21.1 b=3.84, selective a=7.3 b=1.94, full a=1 b=0
  (the block's inputs). The tests check the whole model against measured peaks of tiny configs (within 20%) on
  that implementation (the torch forms); the C++ CPU kernels keep less (1-4% lower peaks there).
  On the GPU the values are bf16 (2 bytes); the fused kernels keep fewer intermediates than the reference, so the
  figure is on the high side there;
- the backward of a checkpointed block first recomputes what it did not keep (one block at a time);
- the peak on the CPU (live bytes): everything fixed + the larger of (activations + that recompute) and the
  gradients, which arrive while the activations are freed; on CUDA (reserved bytes, what runs out): the sum, since
  FSDP2 allocates the gradient shards on its reduce-scatter stream, whose cached blocks the activations' freed blocks
  (the compute stream's) cannot serve. Checked against torchtitan's published Llama 3.1 8B figures (reserved memory
  on 8 and 128 H100s: the 15.4 GiB they differ by is the sharded state, 16 B per parameter over S = 8 less over
  S = 128, plus the slack; the max rule gave 11.6 GiB): `published_state_check()`;
- allocator slack: 10% of the peak on CUDA.

Step time: the matrix FLOPs at the static estimate of a bf16 GEMM (perf anchors: 738 TFLOP/s on H100), attention at
the static estimates of our hd64/72/128 forward and backward kernels, the pointwise ops' bytes at 90% of HBM
bandwidth; recomputation adds the forward FLOPs of the checkpointed blocks (full) or their pointwise bytes
(selective). FSDP's all-gathers / reduce-scatters overlap the compute (only what exceeds 90% of the compute shows);
the HSDP all-reduce of each gradient shard overlaps the backward the same way; the context-parallel all-to-alls
sit on the critical path. Links: published nccl-tests bus bandwidths of 8-GPU H100 HGX nodes, large messages (see the
constants below; the 90% overlap is an assumption that the one published FSDP2 overlap measurement found agrees
with). The kernel figures are static upper estimates, never measured here: read a step time as a lower bound, an MFU
as an upper one (band: a measured MFU 0.6-1.0x of it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

from lavin_fast.models.dit_configs import DiTConfig, get_config
from lavin_fast.parallel.mesh import MeshShape, resolve_mesh
from lavin_fast.perf.baseline import attention_rates
from lavin_fast.perf.gpus import GPUS
from lavin_fast.train.config import AC_POLICIES as POLICIES
from lavin_fast.train.metrics import DiTShape, dit_forward_flops

GIB = 2**30
# values kept per block per token: a*D + b*M, by policy (module docstring)
ACT_COEF = {"none": (21.1, 3.84), "selective": (7.3, 1.94), "full": (1.0, 0.0)}
NONBLOCK_PER_TOKEN = (90.0, 2.0)  # 90 + 2D values per token outside the blocks

# attention: the static sm_90 estimates of our default kernels (lavin_fast/perf/static_baseline.json, read by
# attention_rates(); `lavin-fast kernels --report`), TFLOP/s
# the linears: a published H100 figure, not our model's (its GEMM family errs by up to +52% out of sample): the
# best of Triton's matmul tutorial in triton-lang/triton#3672 (3072^3 fp16, 524.7 TFLOP/s; cuBLAS is faster)
GEMM_TFLOPS = 524.7
# Link rates, GB/s per GPU as nccl-tests' bus bandwidth (bytes each GPU moves / time), measured on 8-GPU H100 HGX nodes
# at large messages (the planner's bytes per GPU follow the same convention):
NVLINK_BUSBW = 370.0
"""all-gather, reduce-scatter, all-to-all (and ring all-reduce) inside a node: 450 GB/s NVLink line rate less NCCL's
~20% protocol overhead, as stated by NCCL's maintainer in NVIDIA/nccl-tests#212 (2024-05-06)"""
NVLS_ALLREDUCE_BUSBW = 480.0
"""all-reduce inside a node (NVLink SHARP, NCCL's default there): ~480 GB/s peak (NVIDIA/nccl-tests#212); measured 476
(nccl-tests#290) and 480 (nccl-tests#309)"""
IB_BUSBW = 45.7
"""across nodes, per GPU with one 400 Gb/s NDR NIC each: all_reduce busbw 365.84 GB/s measured on 4 H100 nodes x 8
GPU-NIC pairs (NVIDIA/nccl-tests#309) = 45.7 GB/s per NIC; NCCL's maintainers expect 46-48 per NIC (nccl-tests#290)"""
OVERLAP = 0.9
"""share of the compute time that FSDP's collectives can hide behind. An assumption, consistent with the one published
measurement found: FSDP2 on Llama 3 8B, 2 H200s, 324 ms of NCCL kernels entirely inside 370 ms of compute (88% of it
hidden, nothing exposed; the example output of pytorch/torchtitan#2418's overlap analyzer); beyond 88% unmeasured"""


@dataclass
class PlanInput:
    model: str | DiTConfig = "3.4B"
    gpus: int = 8
    gpu: str = "h100"
    gpus_per_node: int = 8
    batch: int = 256
    """global batch (sequences per optimizer step)"""
    micro_batch: int = 0
    """sequences per GPU per forward/backward; 0: chosen with the policy (see ac)"""
    resolution: int = 512
    frames: int = 1
    """latent frames of each item (1: images)"""
    num_pairs: int = 4
    cp: int = 1
    ac: str = "auto"
    """activation checkpointing policy, or "auto": with micro_batch 0, the (micro-batch, policy) pair that fits
    with the shortest estimated step"""
    ac_every: int = 2
    dp_replicate: int = 0
    dp_shard: int = 0
    value_bytes: int = 2
    """bytes of an activation value (2: bf16 on the GPU; 4: float32 on the CPU)"""
    vae_down: int = 8
    ema: bool = True
    """the trainer's float32 EMA copy (False: a stack that keeps none, for comparisons with published figures)"""


@dataclass
class Plan:
    input: PlanInput
    mesh: MeshShape
    ac: str
    tokens: int
    """tokens of one sequence (context + target)"""
    memory_gib: dict[str, float] = field(default_factory=dict)
    step_s: float = 0.0
    compute_s: dict[str, float] = field(default_factory=dict)
    comm_gb: dict[str, float] = field(default_factory=dict)
    comm_s: dict[str, float] = field(default_factory=dict)
    mfu: float = 0.0
    accum: int = 1
    activations_by_policy: dict[str, float] = field(default_factory=dict)
    params: int = 0

    @property
    def memory_total_gib(self) -> float:
        return self.memory_gib["total"]

    @property
    def fits(self) -> bool:
        return self.memory_total_gib <= GPUS[self.input.gpu].memory_gib * 0.95


@functools.lru_cache(maxsize=32)
def count_params(cfg: DiTConfig) -> tuple[int, int, int]:
    """(all parameters, trainable ones, parameters of the largest block), from a meta-device build."""
    import torch

    from lavin_fast.models.dit import JDiT

    with torch.device("meta"):
        m = JDiT(cfg)
    total = sum(p.numel() for p in m.parameters())
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    block = max(sum(p.numel() for p in b.parameters()) for b in m.blocks)
    return total, trainable, block


def sequence_tokens(cfg: DiTConfig, inp: PlanInput) -> tuple[int, int]:
    """(context tokens, target tokens) of one sequence: 2N+1 context items (N example pairs and the query)."""
    side = inp.resolution // inp.vae_down // cfg.patch_size
    per_item = side * side * inp.frames
    return (2 * inp.num_pairs + 1) * per_item, per_item


def activation_values(cfg: DiTConfig, tokens: int, policy: str, every: int = 2) -> float:
    """Values kept by one sequence's forward under `policy` (module docstring)."""
    d, m = cfg.hidden_size, cfg.mlp_hidden
    per = {p: a * d + b * m for p, (a, b) in ACT_COEF.items()}
    if policy == "every":
        full = len(range(0, cfg.depth, every))
        blocks = full * per["full"] + (cfg.depth - full) * per["none"]
    else:
        blocks = cfg.depth * per[policy]
    return tokens * (blocks + NONBLOCK_PER_TOKEN[0] + NONBLOCK_PER_TOKEN[1] * d)


def memory(
    cfg: DiTConfig,
    inp: PlanInput,
    mesh: MeshShape,
    policy: str,
    *,
    cuda: bool = True,
    accum: int = 1,
    params: tuple[int, int, int] | None = None,
) -> dict[str, float]:
    """Peak bytes per GPU by part (module docstring), in GiB, with the peak ("total"). `params`: (all, trainable,
    largest block) parameters instead of the J-DiT's count (another model's state, e.g. a published figure's)."""
    total, trainable, block = params or count_params(cfg)
    s = mesh.dp_shard * mesh.cp
    lc, lx = sequence_tokens(cfg, inp)
    tokens = math.ceil((lc + lx) / mesh.cp)
    values = inp.micro_batch * inp.value_bytes
    per_block_none = tokens * sum(
        c * v for c, v in zip(ACT_COEF["none"], (cfg.hidden_size, cfg.mlp_hidden), strict=True)
    )
    per_block_kept = tokens * sum(c * v for c, v in zip(ACT_COEF[policy if policy != "every" else "full"],
                                                        (cfg.hidden_size, cfg.mlp_hidden), strict=True))  # fmt: skip
    out = {
        "parameters": 4 * total / s,
        "optimizer": 8 * trainable / s,
        "ema": 4 * trainable / s if inp.ema else 0.0,
        "fsdp_buffers": (2 * 2 * block + 4 * block) if s > 1 else 0.0,
        # micro-steps before the last keep their (unsharded under FSDP2) float32 gradients until the sync
        "accumulated_gradients": 4 * trainable if accum > 1 else 0.0,
        "activations": values * activation_values(cfg, tokens, policy, inp.ac_every),
        # the backward of a checkpointed block first recomputes what it did not keep
        "recompute": values * (per_block_none - per_block_kept) if policy != "none" else 0.0,
        "gradients": 4 * trainable / s,
    }
    # live bytes: the gradients arrive while the activations are freed, so the peak holds the larger of the two; the
    # CUDA caching allocator keeps both reserved (the gradient shards come from FSDP2's reduce-scatter stream)
    fixed = sum(v for k, v in out.items() if k not in ("activations", "recompute", "gradients"))
    acts = out["activations"] + out["recompute"]
    peak = fixed + (acts + out["gradients"] if cuda else max(acts, out["gradients"]))
    out["allocator_slack"] = 0.1 * peak if cuda else 0.0
    out = {k: v / GIB for k, v in out.items()}
    out["total"] = (peak / GIB) + out["allocator_slack"]
    return out


def transformer_params(
    vocab: int, width: int, layers: int, heads: int, kv_heads: int, ffn: int
) -> tuple[int, int, int]:
    """(all, trainable, one block's) parameters of a Llama-style decoder (untied embeddings, SwiGLU, RMSNorm weights)."""
    kv = width // heads * kv_heads
    block = 2 * width * width + 2 * width * kv + 3 * width * ffn + 2 * width
    total = 2 * vocab * width + layers * block + width
    return total, total, block


# Published per-GPU memory of FSDP2 runs whose only difference is the FSDP degree (same model, local batch, sequence,
# activation checkpointing): the difference is the sharded state, which the planner models with no J-DiT-specific
# term. Reserved CUDA memory (torchtitan logs torch.cuda.max_memory_reserved) of Llama 3.1 8B (8.03 B parameters,
# no EMA), local batch 2, 8192 tokens: (source, technique, (FSDP ranks, GiB), (FSDP ranks, GiB)).
LLAMA31_8B = transformer_params(128256, 4096, 32, 32, 8, 14336)
PUBLISHED_FSDP_MEMORY = (
    ("torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Tables 1 and 3 (H100 96 GB, selective AC)",
     "FSDP", (8, 82.4), (128, 67.0)),
    ("torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Tables 1 and 3 (H100 96 GB, selective AC)",
     "FSDP + torch.compile", (8, 77.0), (128, 62.0)),
    ("torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Tables 1 and 3 (H100 96 GB, selective AC)",
     "FSDP + torch.compile + float8", (8, 76.8), (128, 61.8)),
    ("torchtitan benchmarks/llama3_8b_h200_2025-06_torchtitan.md (H200, 4 and 8 nodes)",
     "FSDP + torch.compile + float8 (float8 all-gather)", (32, 47.96), (64, 46.97)),
)  # fmt: skip


def published_state_check(cuda_rule: bool = True) -> list[dict]:
    """The planner's memory model against PUBLISHED_FSDP_MEMORY: per row the published difference between the two
    FSDP degrees and the planner's (its activation terms cancel, so a same-width J-DiT config stands in for them);
    `cuda_rule` False uses the live-bytes (max) rule instead of the reserved-bytes sum."""
    cfg = DiTConfig(hidden_size=4096, depth=32, num_heads=32, kv_group=4)
    inp = PlanInput(model=cfg, micro_batch=2, resolution=512, num_pairs=3, ac="selective", ema=False)

    def total(ranks: int) -> float:
        out = memory(cfg, inp, MeshShape(1, ranks, 1), "selective", cuda=True, params=LLAMA31_8B)
        if not cuda_rule:  # the same parts, the live-bytes peak, with the same slack
            fixed = sum(v for k, v in out.items() if k not in ("activations", "recompute", "gradients",
                                                               "allocator_slack", "total"))  # fmt: skip
            return 1.1 * (fixed + max(out["activations"] + out["recompute"], out["gradients"]))
        return out["total"]

    rows = []
    for source, technique, (n1, m1), (n2, m2) in PUBLISHED_FSDP_MEMORY:
        planned = total(n1) - total(n2)
        rows.append({"source": source, "technique": technique, "ranks": (n1, n2), "published_gib": m1 - m2,
                     "planned_gib": planned, "error": planned / (m1 - m2) - 1})  # fmt: skip
    return rows


def _rate(table: dict[int, float], head_dim: int) -> float:
    return table[min(table, key=lambda h: (abs(h - head_dim), h))]


def step_time(cfg: DiTConfig, inp: PlanInput, mesh: MeshShape, policy: str, accum: int) -> tuple[dict, dict, dict]:
    """(compute seconds by part, communication GB per GPU by mesh dimension, communication seconds) of one step."""
    gpu = GPUS[inp.gpu]
    attn_fwd, attn_bwd = attention_rates()
    shape = DiTShape(cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.num_heads // cfg.kv_group,
                     cfg.hidden_size // cfg.num_heads, cfg.mlp_hidden, cfg.patch_size, cfg.in_channels)  # fmt: skip
    lc, lx = sequence_tokens(cfg, inp)
    seqs = inp.micro_batch * accum / mesh.cp  # sequences' worth of work per GPU per step
    fwd = dit_forward_flops(shape, lc, lx)
    fwd_linear = dit_forward_flops(shape, lc, lx, attention=False)
    fwd_attn = fwd - fwd_linear
    recompute = {
        "none": 0.0,
        "selective": 0.0,
        "full": 1.0,
        "every": len(range(0, cfg.depth, inp.ac_every)) / cfg.depth,
    }
    r = recompute[policy]
    hd = shape.head_dim
    compute = {
        "matmul": seqs * fwd_linear * (3 + r) / (GEMM_TFLOPS * 1e12),
        "attention": seqs * fwd_attn * ((1 + r) / _rate(attn_fwd, hd) + 2 / _rate(attn_bwd, hd)) / 1e12,
    }
    values = activation_values(cfg, lc + lx, "none") - activation_values(cfg, lc + lx, "full")
    passes = 3 + (1 if policy in ("selective", "full") else r)  # write, read, gradient (+ recompute)
    compute["pointwise"] = seqs * values * 2 * passes / (0.9 * gpu.hbm_gbps * 1e9)
    total, trainable, _ = count_params(cfg)
    s, rep = mesh.dp_shard * mesh.cp, mesh.dp_replicate
    comm_gb = {
        # all-gather bf16 in the forward and again in the backward of every micro-step; reduce-scatter the float32
        # gradients once per step (micro-steps before the last accumulate without syncing)
        "dp_shard": (accum * 4 * total + 4 * trainable) * (s - 1) / s / 1e9 if s > 1 else 0.0,
        # HSDP: all-reduce of the float32 gradient shard across the replicas, once per step
        "dp_replicate": 2 * 4 * trainable / s * (rep - 1) / rep / 1e9 if rep > 1 else 0.0,
        # Ulysses: q, k, v, o all-to-all per block, forward + backward (x2) + recompute
        "cp": (seqs * mesh.cp) * cfg.depth * 4 * (lc + lx) / mesh.cp * cfg.hidden_size * 2 * (3 + r)
        * (mesh.cp - 1) / mesh.cp / 1e9 if mesh.cp > 1 else 0.0,
    }  # fmt: skip
    node = inp.gpus_per_node
    comm_s = {
        "dp_shard": comm_gb["dp_shard"] / (NVLINK_BUSBW if s <= node else IB_BUSBW),
        "dp_replicate": comm_gb["dp_replicate"] / (NVLS_ALLREDUCE_BUSBW if mesh.world <= node else IB_BUSBW),
        "cp": comm_gb["cp"] / (NVLINK_BUSBW if mesh.cp <= node else IB_BUSBW),
    }
    return compute, comm_gb, comm_s


def plan(inp: PlanInput) -> Plan:
    """The plan for `inp` (ValueError for a mesh or batch that does not divide)."""
    if inp.gpu not in GPUS:
        raise ValueError(f"gpu: expected one of {sorted(GPUS)}, got {inp.gpu!r}")
    cfg = get_config(inp.model) if isinstance(inp.model, str) else inp.model
    mesh = resolve_mesh(inp.gpus, inp.cp, inp.dp_replicate, inp.dp_shard, per_node=inp.gpus_per_node)
    if inp.micro_batch == 0 or inp.ac == "auto":  # the fastest (micro-batch, policy) that fits
        if inp.batch % mesh.dp:
            raise ValueError(f"batch {inp.batch} is not a multiple of the {mesh.dp} data-parallel ranks")
        per_rank = inp.batch // mesh.dp
        micros = [inp.micro_batch] if inp.micro_batch else [b for b in range(per_rank, 0, -1) if per_rank % b == 0]
        acs = [inp.ac] if inp.ac != "auto" else ["none", "selective", "every", "full"]
        cands = [plan(dataclasses.replace(inp, micro_batch=b, ac=a)) for b in micros for a in acs]
        fit = [c for c in cands if c.fits]
        return min(fit, key=lambda c: c.step_s) if fit else min(cands, key=lambda c: c.memory_total_gib)
    if inp.ac not in POLICIES:
        raise ValueError(f"ac: expected auto or one of {POLICIES}, got {inp.ac!r}")
    per_step = inp.micro_batch * mesh.dp
    if inp.batch % per_step:
        raise ValueError(f"batch {inp.batch} is not a multiple of micro_batch x data-parallel ranks = {per_step}")
    accum = inp.batch // per_step
    policy = inp.ac
    out = Plan(inp, mesh, policy, sum(sequence_tokens(cfg, inp)), accum=accum)
    out.params = count_params(cfg)[0]
    out.memory_gib = memory(cfg, inp, mesh, policy, accum=accum)
    out.activations_by_policy = {
        ac: memory(cfg, inp, mesh, ac, accum=accum)["activations"] for ac in ("none", "selective", "every", "full")
    }
    out.compute_s, out.comm_gb, out.comm_s = step_time(cfg, inp, mesh, policy, accum)
    compute = sum(out.compute_s.values())
    hidden = max(0.0, out.comm_s["dp_shard"] + out.comm_s["dp_replicate"] - OVERLAP * compute)
    out.step_s = compute + hidden + out.comm_s["cp"]
    shape_flops = _model_flops(cfg, inp) * inp.batch
    out.mfu = shape_flops / (out.step_s * inp.gpus * GPUS[inp.gpu].peak_bf16_tflops * 1e12)
    return out


def _model_flops(cfg: DiTConfig, inp: PlanInput) -> float:
    shape = DiTShape(cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.num_heads // cfg.kv_group,
                     cfg.hidden_size // cfg.num_heads, cfg.mlp_hidden, cfg.patch_size, cfg.in_channels)  # fmt: skip
    lc, lx = sequence_tokens(cfg, inp)
    return 3 * dit_forward_flops(shape, lc, lx)


def format_plan(p: Plan) -> str:
    """A plain-text report of one plan."""
    i = p.input
    lines = [
        f"{i.model if isinstance(i.model, str) else 'custom'} J-DiT ({p.params / 1e9:.2f}B parameters) on {i.gpus} x "
        f"{i.gpu.upper()} ({i.gpus_per_node} per node), {i.resolution} px, {i.frames} frame(s), {i.num_pairs} pairs: "
        f"{p.tokens} tokens per sequence",
        f"mesh: {p.mesh.describe()}  (HSDP: {'yes' if p.mesh.dp_replicate > 1 else 'no'}); batch {i.batch} = "
        f"micro-batch {i.micro_batch} x {p.mesh.dp} data ranks x {p.accum} accumulation",
        f"activation checkpointing: {p.ac}" + (f" (every {i.ac_every})" if p.ac == "every" else ""),
        "memory per GPU (GiB, estimate):",
    ]
    for k, v in p.memory_gib.items():
        lines.append(f"  {k:<22} {v:8.2f}")
    by = ", ".join(f"{k} {v:.2f}" for k, v in p.activations_by_policy.items())
    lines.append(f"  activations by policy (GiB): {by}")
    cap = GPUS[i.gpu].memory_gib
    lines.append(f"  fits in {cap:.0f} GiB: {'yes' if p.fits else 'NO'}")
    lines.append("step (static estimate; a lower bound on time):")
    for k, v in p.compute_s.items():
        lines.append(f"  compute {k:<10} {v * 1e3:9.1f} ms")
    for k in ("dp_shard", "dp_replicate", "cp"):
        lines.append(f"  comm {k:<13} {p.comm_gb[k]:8.2f} GB/GPU {p.comm_s[k] * 1e3:9.1f} ms")
    lines.append(f"  step time        {p.step_s:9.3f} s   estimated MFU {100 * p.mfu:.1f}% (upper estimate; band "
                 f"{60 * p.mfu:.0f}-{100 * p.mfu:.0f}%)")  # fmt: skip
    return "\n".join(lines)


def as_dict(p: Plan) -> dict:
    d = dataclasses.asdict(p)
    d["mesh"] = dataclasses.asdict(p.mesh)
    d["fits"] = p.fits
    if not isinstance(p.input.model, str):
        d["input"]["model"] = dataclasses.asdict(p.input.model)
    return d
