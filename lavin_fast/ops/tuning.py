"""A small first-call tuner for Triton launch configurations, with an on-disk cache.

On the first call of a shape bucket on a CUDA device, `FirstCallTuner.choose` times each candidate (at
most `max_candidates`, in the order given: the first is the static sm_90 report's pick) and keeps the
fastest. The choice is cached in memory and in a JSON file per op and GPU name, stamped with the Triton,
torch and lavin_fast versions: a file written under other versions is ignored (and replaced by the next
write), so a Triton upgrade re-tunes. One INFO line is logged per tuned bucket.

No timing happens where it cannot be trusted or cannot run, and each such case is logged once:
- inside a CUDA-graph capture (launches are recorded, not run): the cached or the static pick;
- on fake or traced tensors (torch.compile / make_fx / FakeTensorMode): the cached pick when the shapes
  are concrete, else the static pick, which the compiled graph then keeps;
- on non-CUDA tensors (the Triton interpreter) or with the op's tuning variable set to 0: the static pick.

Processes sharing a cache folder (the ranks of one node) each tune; a write re-reads the file, merges
and replaces it atomically, so a reader never sees half a file (two writers racing can still drop one
entry, which a later run re-tunes).
The cache holds only JSON (configuration labels and timings), never code. Its folder is
$LAVIN_FAST_TUNE_CACHE, else $XDG_CACHE_HOME/lavin_fast/tune, else ~/.cache/lavin_fast/tune.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
MAX_CANDIDATES = 4

Timer = Callable[[Callable[[], None]], float]


def default_timer(fn: Callable[[], None]) -> float:
    """Mean milliseconds of fn on the current CUDA stream (Triton's do_bench: warm-up, L2 flushed between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=25))


def cache_dir() -> pathlib.Path:
    explicit = os.environ.get("LAVIN_FAST_TUNE_CACHE")
    if explicit:
        return pathlib.Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "lavin_fast" / "tune"


def versions() -> dict[str, str]:
    """The versions a cached timing is valid for."""
    import lavin_fast

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - Triton-less installs never tune
        triton_version = "none"
    return {"format": str(CACHE_FORMAT), "triton": triton_version, "torch": torch.__version__,
            "lavin_fast": lavin_fast.__version__}  # fmt: skip


def tuning_setting(env_var: str) -> bool:
    """True (the default: unset or 1) times candidates on a GPU's first call of a bucket; 0 keeps the static pick."""
    value = os.environ.get(env_var, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{env_var} must be 0 (the static model's pick, no timing) or 1 (measure), got {value!r}")
    return value == "1"


def _is_traced(tensors: Sequence[Any]) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    if torch.compiler.is_compiling():
        return True
    return any(isinstance(t, torch.Tensor) and is_fake(t) for t in tensors)


def _concrete(bucket: tuple) -> bool:
    return all(not isinstance(x, torch.SymInt | torch.SymFloat | torch.SymBool) for x in bucket)


class FirstCallTuner:
    """Chooses one of a few launch configurations per (kernel, shape bucket) by timing them once per GPU.

    op: names the cache file and the log lines. env_var: the 0/1 switch (tuning_setting).
    timer(fn) -> milliseconds (default_timer on CUDA; tests pass a fake). device_name(device) -> str names
    the GPU (torch.cuda.get_device_name by default). directory: the cache folder (cache_dir() by default).
    devices: the device types it times on (tests add "cpu" to drive the Triton interpreter).
    """

    def __init__(
        self,
        op: str,
        env_var: str,
        *,
        timer: Timer | None = None,
        device_name: Callable[[torch.device], str] | None = None,
        directory: pathlib.Path | str | None = None,
        max_candidates: int = MAX_CANDIDATES,
        devices: tuple[str, ...] = ("cuda",),
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", op):
            raise ValueError(f"op name {op!r} must be a plain file-name part")
        self.op = op
        self.env_var = env_var
        self.timer = timer or default_timer
        self.device_name = device_name or (lambda d: torch.cuda.get_device_name(d))
        self.directory = pathlib.Path(directory) if directory is not None else None
        self.max_candidates = max_candidates
        self.devices = devices
        self._memory: dict[tuple[str, str], int] = {}
        self._files: dict[str, dict] = {}
        self._said: set[tuple] = set()
        self._lock = threading.Lock()

    def chosen(self) -> dict[str, str]:
        """This process's choices so far: 'kernel|bucket...' -> the chosen candidate's label."""
        out = {}
        for (_gpu, key), idx in self._memory.items():
            labels = key.rsplit("|", 1)[-1].split("/")
            out[key.rsplit("|", 1)[0]] = labels[idx]
        return out

    # ----- the cache file ---------------------------------------------------------------------------------

    def cache_path(self, gpu: str) -> pathlib.Path:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower() or "gpu"
        return (self.directory or cache_dir()) / f"{self.op}-{slug}.json"

    def _load(self, gpu: str) -> dict:
        """The entries of this GPU's file if it was written under the current versions, else {}."""
        if gpu in self._files:
            return self._files[gpu]
        path = self.cache_path(gpu)
        entries: dict = {}
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            data = None
        except (OSError, ValueError) as exc:
            log.warning("%s: ignoring the unreadable tuning cache %s (%s)", self.op, path, exc)
            data = None
        if isinstance(data, dict):
            if data.get("versions") == versions() and data.get("gpu") == gpu and isinstance(data.get("entries"), dict):
                entries = data["entries"]
            else:
                log.info("%s: tuning cache %s was written under %s, not %s: re-tuning", self.op, path,
                         data.get("versions"), versions())  # fmt: skip
        self._files[gpu] = entries
        return entries

    def _store(self, gpu: str, key: str, entry: dict) -> pathlib.Path:
        entries = self._load(gpu)
        entries[key] = entry
        self._files.pop(gpu)  # re-read: keep what other processes wrote since (under the same versions)
        entries = {**self._load(gpu), **entries}
        self._files[gpu] = entries
        path = self.cache_path(gpu)
        data = {"gpu": gpu, "versions": versions(), "entries": entries}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(f.name, path)  # atomic: a concurrent reader sees the old or the new file
        except OSError as exc:
            log.warning("%s: could not write the tuning cache %s (%s); the choice holds for this process", self.op,
                        path, exc)  # fmt: skip
        return path

    def _say_once(self, what: tuple, msg: str, *args) -> None:
        if what not in self._said:
            self._said.add(what)
            log.warning(msg, *args)

    # ----- choosing ---------------------------------------------------------------------------------------

    def choose(
        self,
        kernel: str,
        bucket: tuple,
        candidates: Sequence[Any],
        run: Callable[[Any], None],
        *,
        device: torch.device,
        tensors: Sequence[Any] = (),
    ) -> Any:
        """The candidate to launch for `kernel` at this shape `bucket` (a tuple of ints and strings).

        run(candidate) launches the kernel once with that candidate (it must leave the outputs as a plain
        launch would, e.g. zero an accumulator first). tensors: the launch's tensors (fake ones mean a trace).
        """
        if not candidates:
            raise ValueError(f"{self.op}: no candidate configurations for {kernel}")
        candidates = list(candidates)[: self.max_candidates]
        if len(candidates) == 1 or device.type not in self.devices or not tuning_setting(self.env_var):
            return candidates[0]
        labels = [str(c) for c in candidates]
        traced = _is_traced(tensors)
        if traced and not _concrete(bucket):
            self._say_once(("symbolic", kernel), "%s: %s traced with symbolic shapes: the static pick %s is compiled "
                           "in, not a measured one", self.op, kernel, labels[0])  # fmt: skip
            return candidates[0]
        key = f"{kernel}|{'|'.join(str(x) for x in bucket)}|{'/'.join(labels)}"
        gpu = self.device_name(device)
        with self._lock:
            hit = self._memory.get((gpu, key))
            if hit is None:
                entry = self._load(gpu).get(key)
                if isinstance(entry, dict) and entry.get("choice") in labels:
                    hit = labels.index(entry["choice"])
                    self._memory[(gpu, key)] = hit
            if hit is not None:
                return candidates[hit]
            if traced:
                self._say_once(("traced", key), "%s: %s first seen inside a torch.compile/make_fx trace at %s: not "
                               "timed there; the static pick %s is compiled in (run the shape once eagerly to tune "
                               "it)", self.op, kernel, bucket, labels[0])  # fmt: skip
                return candidates[0]
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                self._say_once(("graph", key), "%s: %s first seen inside a CUDA-graph capture at %s: not timed "
                               "there; using the static pick %s", self.op, kernel, bucket, labels[0])  # fmt: skip
                return candidates[0]
            times, errors = [], []
            for cand, label in zip(candidates, labels, strict=True):
                try:
                    ms = float(self.timer(lambda cand=cand: run(cand)))
                except Exception as exc:  # a candidate that fails to compile or launch is out, not fatal
                    log.debug("%s: %s candidate %s failed: %s", self.op, kernel, label, exc)
                    errors.append(f"{label}: {type(exc).__name__}: {exc}")
                    ms = math.inf
                times.append(ms)
            best = min(range(len(times)), key=lambda i: times[i])
            if math.isinf(times[best]):  # the timing itself failed (e.g. no memory for do_bench's L2 flush)
                log.warning("%s: timing every candidate of %s at %s failed (%s); launching the static pick %s "
                            "untimed, not cached", self.op, kernel, bucket, errors[0][:300], labels[0])  # fmt: skip
                return candidates[0]
            self._memory[(gpu, key)] = best
            path = self._store(gpu, key, {"choice": labels[best], "ms": dict(zip(labels, times, strict=True))})
        log.info("%s: tuned %s at %s on %s: %s %.3f ms (static pick %s %.3f ms, %d candidates); cached in %s",
                 self.op, kernel, bucket, gpu, labels[best], times[best], labels[0], times[0], len(labels),
                 path)  # fmt: skip
        return candidates[best]
