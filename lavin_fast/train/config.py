"""Training configuration: one flat dataclass, YAML files and `--field value` overrides.

`load_config("tiny-cpu", ["--steps", "200", "--lr", "3e-4"])` reads the file, applies the overrides and
validates. A config is a path to a YAML file or the name of one shipped in the package
(lavin_fast/configs/: tiny-cpu, 0.1B, 1.0B, 3.4B; `shipped_configs()`); an existing file wins over a name. An unknown field (in the file or on the command line) is an error naming it and
listing the valid fields. `field_docs()` returns each field's docstring (used by `lavin-fast train
--list-fields` and docs/training.md).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import pathlib
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from lavin_fast.bounds import check_config_bounds
from lavin_fast.textfiles import read_text


class ConfigError(ValueError):
    """A bad config file, field name or value."""


AC_POLICIES = ("none", "full", "selective", "every")  # activation checkpointing (train/activation_checkpointing.py)


@dataclass
class TrainConfig:
    # --- model
    model: str = "tiny"
    """J-DiT size for `build_dit`: "0.1B", "1.0B", "3.4B" or a tiny test size."""
    model_overrides: dict = field(default_factory=dict)
    """Keyword overrides for `build_dit` (hidden_size, depth, num_heads, kv_group, drop_path, ...)."""
    grad_checkpointing: bool = False
    """Activation checkpointing of every J-DiT block (recompute in backward: less memory, ~1/3 more compute)."""
    compile: bool = False
    """torch.compile each J-DiT block (per block, so FSDP2 can shard between compiled regions)."""
    cpu_path: str = "auto"
    """CPU runs (lavin_fast/models/cpu_path.py): "eager", "compiled" (as `compile`), "bf16" (bfloat16 autocast, on
    CPUs with avx512_bf16 / AMX only), "compiled-bf16"; "auto": compiled when the run has enough steps to pay the
    compile back (docs/cpu.md), else eager; float32 either way. Other devices take "auto" only."""
    compile_backend: str = "inductor"
    """torch.compile backend with `compile` ("inductor"; "aot_eager" traces the same graphs without generating
    kernels, a quick way to check that a change still traces)."""
    activation_checkpointing: str = "auto"
    """Which activations the backward recomputes (train/activation_checkpointing.py): "none", "full" (every block),
    "selective" (every block keeps its matmul and attention outputs, recomputes the pointwise ops), "every" (every
    `activation_checkpointing_every`-th block in full); "auto": "full" if grad_checkpointing else "none"."""
    activation_checkpointing_every: int = 2
    """With activation_checkpointing "every": checkpoint blocks 0, k, 2k, ... (k = this)."""
    float8: bool = False
    """Train the J-DiT's block linears in float8 (torchao; GPUs with float8: H100/H200 and newer). Off by default
    until a GPU run has checked it; refused on the CPU and on older GPUs."""
    init_from: str | None = None
    """Start from these J-DiT weights (our checkpoint or the published safetensors); None: random init."""
    # --- data
    data: str | dict = "demo"
    """Data: "demo" (the embedded demo dataset through the frozen VAE), "latent-cache" (latent_cache), or online
    training from raw data: {sources: [MANIFEST_OR_DIR, ...], weights: {task: w}, backend: auto|dali|torch,
    queue: 2, num_threads: 2, prefetch: null} (decoded, augmented and encoded by the frozen VAE while the step
    runs; weights default to the paper's task mixture; num_threads: DALI's CPU threads per rank; prefetch: DALI
    batches made ahead, null: 2 on the GPU, 0 on the CPU; see docs/training.md). The latent cache with its own
    task mixture: {latent_cache: DIR (null: the field latent_cache), weights: {task: w}, prefetch: 2}."""
    latent_cache: str | None = None
    """Folder of precomputed latents (the data package's latent cache); used when data = "latent-cache"."""
    image_size: int = 64
    """Frame size in pixels (square) of the pixel data (the demo data or the online sources)."""
    num_pairs: int = 2
    """In-context example pairs per sequence (context = 2 * num_pairs + 1 frames with the query)."""
    tasks: list | dict | None = None
    """Task names to train on (None: every task the data package builds), mixed by the paper's sample counts; or a
    mapping {task: weight} that sets the mixture itself."""
    num_workers: int = 0
    """Data-loading worker processes."""
    # --- VAE
    vae_checkpoint: str | None = None
    """Published (or our) ST-VAE weights to encode with; None: build_vae(**vae_overrides), random or trained."""
    vae_overrides: dict = field(default_factory=dict)
    """Keyword overrides for `build_vae` (block_out_channels, layers_per_block, latent_channels, norm_num_groups)."""
    vae_weights: str | None = None
    """Weights of the VAE built from vae_overrides (e.g. the demo's quickly trained tiny VAE)."""
    # --- optimisation
    steps: int = 1000
    """Optimizer steps to train for (total, counting steps before a resume)."""
    batch_size: int = 8
    """Global batch: samples per optimizer step over all processes and accumulation micro-steps."""
    micro_batch_size: int = 8
    """Samples per process per forward/backward; gradient accumulation = batch_size / (micro_batch_size * world)."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    min_lr: float = 0.0
    """Final learning rate of the cosine schedule."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many steps."""
    schedule: str = "constant"
    """After warmup: "constant" or "cosine" (to min_lr at `steps`)."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to matrices only (not to norms, biases, embeddings vectors)."""
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    ema_decay: float = 0.9999
    """EMA momentum; the EMA copy is kept in float32."""
    null_prob: float | None = None
    """Probability that a sample's context is replaced by the null context (classifier-free guidance); None: the
    model's `uncond_ratio` (0.1 for the published sizes; set it through model_overrides like the published code)."""
    loss: str = "mse"
    """Objective: "mse" (Algorithm 1 of the paper) or "mse+l1" (the published training code adds 0.1 x L1)."""
    t_mean: float = 0.0
    """Mean of the logit-normal time distribution."""
    t_std: float = 1.0
    """Standard deviation of the logit-normal time distribution."""
    # --- systems
    device: str = "auto"
    """"auto" (CUDA if present), "cpu" or "cuda"."""
    precision: str = "auto"
    """"bf16" (autocast / FSDP2 bf16 params), "fp32", or "auto" (bf16 on CUDA, fp32 on CPU)."""
    parallel: str = "fsdp"
    """Multi-process strategy under torchrun: "fsdp" (FSDP2 fully_shard per block) or "ddp"."""
    dist_backend: str = "auto"
    """torch.distributed backend: "auto" (nccl on CUDA, gloo on CPU), "nccl" or "gloo"."""
    context_parallel: int = 1
    """Ranks that split one sequence (context parallelism, docs/training.md); must divide the processes. 1: off."""
    context_parallel_mode: str = "auto"
    """How attention crosses the cp ranks: "ulysses", "ring", "hybrid", or "auto" (Ulysses if the heads divide)."""
    context_parallel_ulysses: int = 0
    """Ulysses degree inside the "hybrid" mode (ring across the rest); 0: gcd(context_parallel, heads)."""
    dp_replicate: int = 0
    """Replicas of the sharded model (HSDP, parallel/mesh.py): processes = dp_replicate x dp_shard x
    context_parallel. 0: auto (shard inside a node, replicate across nodes)."""
    dp_shard: int = 0
    """Ranks that shard one model copy (FSDP2, with the cp ranks). 0: auto (processes per node / context_parallel)."""
    async_checkpoint: bool = True
    """Write checkpoints in the background (DCP async_save): training continues while the files are written and
    hashed; the save is awaited before the next one and before exit."""
    straggler_pct: float = 20.0
    """A logging step names a rank whose step time is this many percent above the median of the ranks."""
    seed: int = 0
    """Seed of the initialisation and of every training draw (times, noise, null context, VAE posterior)."""
    # --- output
    out_dir: str = "runs/default"
    """Run folder: checkpoints/, metrics.jsonl, tensorboard/, config.yaml, ema.safetensors."""
    save_every: int = 500
    """Checkpoint every this many steps (and at the end)."""
    keep_last: int = 2
    """Keep this many most recent checkpoints."""
    resume: bool = True
    """Resume from the latest checkpoint in out_dir/checkpoints when there is one."""
    trust_checkpoint: bool = False
    """Resume from a checkpoint of an older lavin-fast (pickled trainer_rank*.pt, no checksums). A pickle can run
    code when loaded: set this only for checkpoints whose origin you trust."""
    param_abs_limit: float = 1.0e6
    """A checkpoint is saved only while every parameter and EMA value is finite and below this in magnitude (a
    diverged run is stopped instead, naming the last good checkpoint)."""
    log_every: int = 10
    """Write metrics (JSON lines, TensorBoard) every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard scalars to out_dir/tensorboard."""
    progress: bool = True
    """Show the tqdm progress bar (rank 0)."""
    max_minutes: float | None = None
    """Stop (with a checkpoint) after this much wall time; None: run all steps."""
    peak_tflops: float | None = None
    """Dense bf16 peak of one device for MFU; None: from the device name (H100/H200 989.4), unknown: no MFU."""


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def field_docs() -> dict[str, str]:
    """Field name -> its docstring (the string literal under it in TrainConfig)."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[attr-defined]
    return docs


def _unknown(name: str, where: str) -> ConfigError:
    names = sorted(config_fields())
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown config field {name!r}{hint}; valid fields: {', '.join(names)}")


DATA_KEYS = ("sources", "weights", "backend", "queue", "num_threads", "prefetch")
"""the keys of an online `data:` mapping"""


def _coerce_data(value: Any) -> Any:
    """`data`: "demo" / "latent-cache", a mapping (YAML or a command-line string in braces), or a list of sources
    (short for {sources: [...]})."""
    if isinstance(value, str) and value.strip()[:1] in ("{", "["):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config field 'data': cannot read {value!r} as YAML: {exc}") from None
    if isinstance(value, list):
        value = {"sources": value}
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        return value
    raise ConfigError(f"config field 'data': expected a string or a mapping, got {value!r}")


CACHE_KEYS = ("latent_cache", "weights", "prefetch")
"""the keys of a latent-cache `data:` mapping (told apart from an online one by its `latent_cache` key)"""


def online_data(cfg: TrainConfig) -> dict[str, Any] | None:
    """The online-training data mapping with its defaults filled in, or None for "demo" / the latent cache."""
    if not isinstance(cfg.data, dict) or "latent_cache" in cfg.data:
        return None
    return {"weights": None, "backend": "auto", "queue": 2, "num_threads": 2, "prefetch": None, **cfg.data}


def cache_data(cfg: TrainConfig) -> dict[str, Any] | None:
    """The latent-cache data settings ({latent_cache: DIR or None, weights: None or {task: w}, prefetch}) of
    `data: latent-cache` or of a `data: {latent_cache: ...}` mapping; None for the other kinds of data."""
    if cfg.data == "latent-cache":
        return {"latent_cache": cfg.latent_cache, "weights": None, "prefetch": 2}
    if not isinstance(cfg.data, dict) or "latent_cache" not in cfg.data:
        return None
    spec = {"weights": None, "prefetch": 2, **cfg.data}
    spec["latent_cache"] = spec["latent_cache"] or cfg.latent_cache
    return spec


def _cache_check(cfg: TrainConfig, spec: dict[str, Any]) -> list[str]:
    """What is wrong with a `data: {latent_cache: ...}` mapping: keys, the folder, the weights (bounded, of tasks
    the cache holds). Reads the cache's index.json only."""
    from lavin_fast.bounds import task_weights_problem

    problems = []
    unknown = sorted(set(cfg.data) - set(CACHE_KEYS))
    if unknown:
        problems.append(f"unknown keys {unknown} (valid with latent_cache: {list(CACHE_KEYS)})")
    given = cfg.data.get("latent_cache")
    if given and cfg.latent_cache and str(given) != str(cfg.latent_cache):
        problems.append(f"'latent_cache' is {given!r} but the field latent_cache is {cfg.latent_cache!r}")
    root = spec["latent_cache"]
    if not isinstance(root, str) or not root:
        problems.append("'latent_cache' must name the cache folder (or be null with the field latent_cache set)")
    p = spec["prefetch"]
    if not (isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 64):
        problems.append(f"'prefetch' (micro-batches read ahead) must be an integer in [0, 64], got {p!r}")
    weights = spec["weights"]
    if weights is None:
        return problems
    problem = task_weights_problem(weights)
    if problem:
        return [*problems, f"'weights': {problem}"]
    if cfg.tasks is not None and set(cfg.tasks) != set(weights):
        problems.append(f"'weights' names {sorted(weights)} but the field 'tasks' is {sorted(cfg.tasks)}")
    index = pathlib.Path(root) / "index.json" if isinstance(root, str) and root else None
    if index is not None and not index.is_file():
        problems.append(f"no cache index {index} (build the cache with `lavin-fast data build-cache`)")
    elif index is not None:
        from lavin_fast.textfiles import read_json

        try:
            cached = read_json(index, "cache index").get("tasks", {})
        except (OSError, ValueError) as exc:
            return [*problems, f"cannot read {index}: {exc}"]
        absent = sorted(set(weights) - set(cached))
        if absent:
            problems.append(f"'weights' names tasks {absent} that the cache does not hold (it holds {sorted(cached)})")
    return problems


def _data_check(cfg: TrainConfig) -> tuple[bool, str]:
    """`data` names a known string, or a mapping of existing sources, known tasks with usable weights."""
    expected = (
        '"demo", "latent-cache", {sources: [MANIFEST_OR_DIR, ...], weights: {task: w}} or '
        "{latent_cache: DIR, weights: {task: w}}"
    )
    if isinstance(cfg.data, dict) and "latent_cache" in cfg.data:
        problems = _cache_check(cfg, cache_data(cfg))
        return not problems, f"{expected}: {'; '.join(problems)}"
    spec = online_data(cfg)
    if spec is None:
        return cfg.data in ("demo", "latent-cache"), expected
    from lavin_fast.bounds import task_weights_problem
    from lavin_fast.data.manifest import KNOWN_TASKS

    unknown = sorted(set(spec) - set(DATA_KEYS))
    sources, weights = spec.get("sources"), spec["weights"]
    problems = []
    if unknown:
        problems.append(f"unknown keys {unknown} (valid: {list(DATA_KEYS)})")
    if not isinstance(sources, list) or not sources or not all(isinstance(x, str) and x for x in sources):
        problems.append("'sources' must be a non-empty list of manifest files or directories")
    else:
        missing = [x for x in sources if x != "demo" and not pathlib.Path(x).exists()]
        if missing:
            problems.append(f"sources not found: {missing}")
    if weights is not None:
        problem = task_weights_problem(weights)
        if problem:
            problems.append(f"'weights': {problem}")
        elif sorted(set(weights) - KNOWN_TASKS):
            problems.append(f"'weights' names unknown tasks {sorted(set(weights) - KNOWN_TASKS)}")
        elif cfg.tasks is not None and set(cfg.tasks) != set(weights):
            problems.append(f"'weights' names {sorted(weights)} but the field 'tasks' is {sorted(cfg.tasks)}")
    if spec["backend"] not in ("auto", "dali", "torch"):
        problems.append(f"'backend' must be auto, dali or torch, got {spec['backend']!r}")
    if not (isinstance(spec["queue"], int) and not isinstance(spec["queue"], bool) and spec["queue"] >= 0):
        problems.append(f"'queue' (batches encoded ahead of the step) must be an integer >= 0, got {spec['queue']!r}")
    for key, least in (("num_threads", 1), ("prefetch", 0)):
        v = spec[key]
        if (v is not None or key == "num_threads") and not (
            isinstance(v, int) and not isinstance(v, bool) and v >= least
        ):
            problems.append(f"'{key}' must be an integer >= {least}, got {v!r}")
    return not problems, f"{expected}: {'; '.join(problems)}"


def _coerce(name: str, value: Any) -> Any:
    """Convert a YAML value or command-line string to the field's declared type."""
    if name == "data":
        return _coerce_data(value)
    if name == "tasks" and isinstance(value, str) and value.lstrip().startswith("{"):
        value = yaml.safe_load(value)
    if name == "tasks" and isinstance(value, dict):  # {task: weight}: the mixture as given
        return {str(k): float(v) for k, v in value.items()}
    hint = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    origin = typing.get_origin(base) or base
    if isinstance(value, str):
        if optional and value.lower() in ("none", "null", "~"):
            return None
        if origin in (list, dict):
            value = yaml.safe_load(value)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config field {name!r}: None is not allowed (expected {getattr(base, '__name__', base)})")
    try:
        if origin is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if origin is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if origin is float:
            return float(value)
        if origin is str:
            return str(value)
        if origin is list:
            if not isinstance(value, list):
                value = [value]
            return list(value)
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"config field {name!r}: cannot read {value!r} as {getattr(base, '__name__', base)}"
        ) from None
    return value


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _model_check(cfg: TrainConfig) -> tuple[bool, str]:
    """The J-DiT size and overrides name a buildable model (checked without building it)."""
    from lavin_fast.models.dit_configs import DIT_CONFIGS, get_config

    if cfg.init_from:  # our files carry their own config; a published file takes cfg.model
        if cfg.model not in DIT_CONFIGS:
            return False, f"one of {sorted(DIT_CONFIGS)}"
        return True, ""
    try:
        get_config(cfg.model, **cfg.model_overrides)
    except (TypeError, ValueError) as exc:
        return False, f"a known size {sorted(DIT_CONFIGS)} with valid model_overrides ({exc})"
    return True, ""


def _pixel_multiple(cfg: TrainConfig) -> int:
    """image_size must divide into whole patches of latent pixels: VAE downsampling x patch size."""
    from lavin_fast.models.dit_configs import get_config

    blocks = cfg.vae_overrides.get("block_out_channels")
    down = 2 ** (len(blocks) - 1) if blocks and not cfg.vae_checkpoint else 8
    try:
        patch = get_config(cfg.model, **cfg.model_overrides)
        return down * patch.patch_size
    except (TypeError, ValueError):
        return down * 2


def validate(cfg: TrainConfig) -> TrainConfig:
    """Range checks that do not need the process group (batch divisibility is checked by the trainer). Every
    numeric field is checked here, so that a bad value stops the run before anything is built or written."""
    model_ok, model_expected = _model_check(cfg)
    data_ok, data_expected = _data_check(cfg)
    multiple = _pixel_multiple(cfg) if model_ok else 1
    from lavin_fast.models.cpu_path import CPU_PATHS

    checks = [
        ("model", model_ok, model_expected),
        ("lr", _finite(cfg.lr) and cfg.lr > 0, "a finite number > 0"),
        ("min_lr", _finite(cfg.min_lr) and 0 <= cfg.min_lr <= cfg.lr, "in [0, lr]"),
        ("weight_decay", _finite(cfg.weight_decay) and cfg.weight_decay >= 0, "a finite number >= 0"),
        ("eps", _finite(cfg.eps) and cfg.eps > 0, "a finite number > 0"),
        ("grad_clip", _finite(cfg.grad_clip) and cfg.grad_clip >= 0, "a finite number >= 0 (0: no clipping)"),
        ("t_mean", _finite(cfg.t_mean), "a finite number"),
        ("t_std", _finite(cfg.t_std) and cfg.t_std > 0, "a finite number > 0"),
        ("max_minutes", cfg.max_minutes is None or (_finite(cfg.max_minutes) and cfg.max_minutes > 0), "> 0 or None"),
        ("peak_tflops", cfg.peak_tflops is None or (_finite(cfg.peak_tflops) and cfg.peak_tflops > 0), "> 0 or None"),
        ("param_abs_limit", _finite(cfg.param_abs_limit) and cfg.param_abs_limit > 0, "a finite number > 0"),
        ("num_workers", cfg.num_workers >= 0, ">= 0"),
        (
            "image_size",
            cfg.image_size >= 8 and cfg.image_size % multiple == 0,
            f"a multiple of {multiple} (VAE downsampling x patch size) and >= 8",
        ),
        ("steps", cfg.steps >= 1, ">= 1"),
        ("batch_size", cfg.batch_size >= 1, ">= 1"),
        ("micro_batch_size", cfg.micro_batch_size >= 1, ">= 1"),
        ("warmup_steps", cfg.warmup_steps >= 0, ">= 0"),
        ("schedule", cfg.schedule in ("constant", "cosine"), '"constant" or "cosine"'),
        ("ema_decay", _finite(cfg.ema_decay) and 0 <= cfg.ema_decay < 1, "in [0, 1)"),
        ("null_prob", cfg.null_prob is None or (_finite(cfg.null_prob) and 0 <= cfg.null_prob <= 1), "in [0, 1]"),
        ("loss", cfg.loss in ("mse", "mse+l1"), '"mse" or "mse+l1"'),
        ("device", cfg.device in ("auto", "cpu", "cuda"), '"auto", "cpu" or "cuda"'),
        ("precision", cfg.precision in ("auto", "bf16", "fp32"), '"auto", "bf16" or "fp32"'),
        ("cpu_path", cfg.cpu_path in CPU_PATHS, " or ".join(f'"{n}"' for n in CPU_PATHS)),
        ("parallel", cfg.parallel in ("fsdp", "ddp"), '"fsdp" or "ddp"'),
        ("dist_backend", cfg.dist_backend in ("auto", "nccl", "gloo"), '"auto", "nccl" or "gloo"'),
        ("context_parallel", cfg.context_parallel >= 1, ">= 1"),
        (
            "context_parallel_mode",
            cfg.context_parallel_mode in ("auto", "ulysses", "ring", "hybrid"),
            '"auto", "ulysses", "ring" or "hybrid"',
        ),
        ("context_parallel_ulysses", cfg.context_parallel_ulysses >= 0, ">= 0"),
        (
            "compile_backend",
            cfg.compile_backend in ("inductor", "aot_eager", "eager"),
            '"inductor", "aot_eager" or "eager"',
        ),
        ("dp_replicate", cfg.dp_replicate >= 0, ">= 0 (0: auto)"),
        ("dp_shard", cfg.dp_shard >= 0, ">= 0 (0: auto)"),
        ("straggler_pct", _finite(cfg.straggler_pct) and cfg.straggler_pct > 0, "a finite number > 0"),
        (
            "activation_checkpointing",
            cfg.activation_checkpointing in ("auto", *AC_POLICIES),
            '"auto", "none", "full", "selective" or "every"',
        ),
        ("activation_checkpointing_every", cfg.activation_checkpointing_every >= 1, ">= 1"),
        ("data", data_ok, data_expected),
        ("save_every", cfg.save_every >= 1, ">= 1"),
        ("keep_last", cfg.keep_last >= 1, ">= 1"),
        ("log_every", cfg.log_every >= 1, ">= 1"),
        ("betas", len(cfg.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in cfg.betas), "two numbers in [0, 1)"),
        ("num_pairs", cfg.num_pairs >= 1, ">= 1"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise ConfigError(f"config field {name!r}: expected {expected}, got {getattr(cfg, name)!r}")
    try:  # the upper bounds (lavin_fast/bounds.py), which only memory would otherwise enforce
        check_config_bounds(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cfg


def from_dict(values: dict[str, Any], where: str = "config") -> TrainConfig:
    fields = config_fields()
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            raise _unknown(name, where)
        kwargs[name] = _coerce(name, value)
    return validate(TrainConfig(**kwargs))


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """["--steps", "200", "--lr=3e-4", "--compile"] -> {"steps": "200", "lr": "3e-4", "compile": "true"}."""
    out: dict[str, str] = {}
    fields = config_fields()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: expected --field value, got {arg!r}")
        key, eq, val = arg[2:].partition("=")
        name = key.replace("-", "_")
        if name not in fields:
            raise _unknown(name, "command line")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or (nxt.startswith("--") and not _is_number(nxt)):
                if typing.get_type_hints(TrainConfig)[name] is not bool:
                    raise ConfigError(f"command line: --{key} needs a value")
                val = "true"  # a bare boolean flag
            else:
                val, i = nxt, i + 1
        out[name] = val
        i += 1
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def shipped_configs() -> dict[str, pathlib.Path]:
    """Name -> path of the YAML configs inside the package (lavin_fast/configs/*.yaml)."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def resolve_config(name_or_path: str | pathlib.Path) -> pathlib.Path:
    """An existing file as given, else a shipped config by name ("3.4B", "3.4B.yaml" or "configs/3.4B.yaml")."""
    p = pathlib.Path(name_or_path)
    if p.is_file():
        return p
    shipped = shipped_configs()
    name = p.name[: -len(".yaml")] if p.name.endswith(".yaml") else p.name
    if name in shipped and p.parent in (pathlib.Path("."), pathlib.Path("configs")):
        return shipped[name]
    raise ConfigError(
        f"config {str(name_or_path)!r} is neither a file nor a shipped config name; shipped: {', '.join(shipped)}"
    )


def load_config(path: str | pathlib.Path | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Read a YAML config (a file or a shipped name, see `resolve_config`; None: the defaults), apply
    overrides, validate."""
    values: dict[str, Any] = {}
    where = "config"
    if path is not None:
        p = resolve_config(path)
        try:
            loaded = yaml.safe_load(read_text(p, "config file")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {str(p)!r}: expected a mapping of field: value, got {type(loaded).__name__}"
            )
        values.update(loaded)
        where = f"config file {str(p)!r}"
    cfg = from_dict(values, where)
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        for name in extra:
            if name not in config_fields():
                raise _unknown(name, "overrides")
        merged = dataclasses.asdict(cfg)
        merged.update({k: _coerce(k, v) for k, v in extra.items()})
        cfg = validate(TrainConfig(**merged))
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
