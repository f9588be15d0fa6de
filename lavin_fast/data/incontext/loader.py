"""The loader: an endless, resumable stream of InContextBatch over the batch maker, in the calling process, in
DataLoader workers (torch backend) or run ahead in a thread (DALI backend), with the skipped files and the
stream position in its state."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch

from lavin_fast.data.incontext.batches import BatchMaker
from lavin_fast.data.incontext.config import InContextBatch, LoaderConfig
from lavin_fast.data.incontext.planner import check_stream_state, seek_index, stream_state
from lavin_fast.data.incontext.sources import _build_pools, _load_sources, _warn_skip
from lavin_fast.data.lookahead import RunAhead
from lavin_fast.data.pipelines import dali_available
from lavin_fast.devices import bind_thread_device
from lavin_fast.streams import hand_over, on_stream, own_stream, take_over

_log = logging.getLogger(__name__)


class _IndexDataset(torch.utils.data.Dataset):
    def __init__(self, maker: BatchMaker, known_bad: set[str]):
        self.maker, self.known_bad = maker, known_bad

    def __getitem__(self, index: int):
        return self.maker.make(index, self.known_bad)

    def __len__(self) -> int:  # an endless stream: a large, finite length for the sampler's sake
        return 2**62


class _FromIndex(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        i = self.start
        while True:
            yield i
            i += 1


def _first(x):
    return x


def choose_backend(backend: str, source: str, num_workers: int = 0) -> tuple[str, str]:
    """(backend, why) for a loader's `backend` setting: a named one as asked; `auto` is DALI when it is importable,
    the torch decoders otherwise (and for the embedded demo data, and when DataLoader workers are asked for)."""
    if backend != "auto":
        return backend, f"backend={backend!r} asked for"
    if source == "demo":
        return "torch", "the embedded demo data is decoded in memory"
    if num_workers:
        return "torch", f"num_workers={num_workers} asks for DataLoader workers"
    ok, why = dali_available()
    if ok:
        return "dali", "nvidia.dali is importable"
    return "torch", why


class InContextLoader:
    """An endless, resumable stream of InContextBatch (see the module docstring)."""

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike], cfg: LoaderConfig):
        cfg.validate()
        self.cfg = cfg
        name = str(source) if isinstance(source, (str, os.PathLike)) else ", ".join(str(s) for s in source)
        backend, why = choose_backend(cfg.backend, name, cfg.num_workers)
        if cfg.backend == "auto":
            _log.info("data: %s decoders (%s)", "DALI" if backend == "dali" else "torch (PIL)", why)
        device = cfg.device
        if device == "auto":
            device = "gpu" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            device = "gpu"
        if backend == "torch" and device == "gpu" and cfg.device not in ("auto",):
            raise ValueError(
                f"device: 'gpu' applies to the DALI backend; the torch backend decodes on the CPU"
                f"{f' (backend auto chose torch: {why})' if cfg.backend == 'auto' else ''}"
            )
        if backend == "dali" and cfg.num_workers:
            raise ValueError(
                f"num_workers: {cfg.num_workers} applies to the torch backend; DALI parallelises with num_threads"
            )
        if backend == "dali":
            ok, why = dali_available()
            if not ok:
                raise RuntimeError(f"backend 'dali': {why}; use backend='torch'")
        if backend == "torch":
            device = "cpu"  # PIL decodes on the CPU; move batches with batch.to(...)
        if device == "gpu" and cfg.device_id is None:  # the building thread's device, bound in the worker thread
            self.cfg = cfg = replace(cfg, device_id=torch.cuda.current_device())
        self.backend, self.device, self.source = backend, device, name
        self._src = _load_sources(source, cfg, backend)
        pools, weights = _build_pools(self._src, cfg)
        self.pools, self.weights = pools, weights
        self.maker = BatchMaker(cfg, self._src, pools, weights, backend, device)
        self.skipped: dict[str, str] = dict(self._src.startup_skipped)
        """files skipped as unreadable: path -> reason"""
        self._next = 0
        self._it = None
        self._ahead_of: RunAhead | None = None
        self._ahead_stream = None  # the look-ahead thread's own CUDA stream (DALI backend on the GPU)

    @property
    def tasks(self) -> list[str]:
        return sorted(self.pools)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __iter__(self) -> InContextLoader:
        return self

    def _stream(self):
        if self.cfg.num_workers == 0:
            return None
        ds = _IndexDataset(self.maker, set(self.skipped))
        return iter(
            torch.utils.data.DataLoader(
                ds,
                batch_size=None,
                sampler=_FromIndex(self._next),
                num_workers=self.cfg.num_workers,
                collate_fn=_first,
                persistent_workers=False,
                prefetch_factor=2,
            )
        )

    def _make_here(self, index: int):
        want, before = self.cfg.batch_threads, torch.get_num_threads()
        if want is None or want == before:
            return self.maker.make(index, set(self.skipped))
        torch.set_num_threads(want)
        try:
            return self.maker.make(index, set(self.skipped))
        finally:
            torch.set_num_threads(before)

    def _record(self, bad: dict[str, str]) -> None:
        for ref, why in bad.items():
            if ref not in self.skipped:
                _warn_skip(ref, why)
                self.skipped[ref] = why

    def _depth(self) -> int:
        if self.backend != "dali":
            return 0
        if self.cfg.prefetch is None:
            return 2 if self.device == "gpu" else 0
        return self.cfg.prefetch

    def _ahead(self) -> bool:
        return self._depth() > 0

    def _runner(self) -> RunAhead:
        """DALI backend: batches made in the one background thread that owns the DALI pipelines.
        No thread-count switching there (torch's setting is global to the process)."""
        if self._ahead_of is None:
            # CUDA's current device is per thread (a new one starts on device 0): bind this rank's device there
            gpu = torch.device("cuda", self.cfg.device_id) if self.device == "gpu" else torch.device("cpu")
            self._ahead_of = RunAhead(
                self._make_ahead,  # on the thread's own stream, handed over by an event (lavin_fast.streams)
                self._depth(),
                snapshot=lambda: (set(self.skipped),),
                initializer=bind_thread_device,
                initargs=(gpu,),
            )
        return self._ahead_of

    def _gpu(self) -> torch.device | None:
        return torch.device("cuda", self.cfg.device_id) if self.device == "gpu" else None

    def _make_ahead(self, index: int, known_bad: set[str]):
        """In the look-ahead thread: the batch made on the thread's own stream (DALI's output copy, the
        degradations, the assembly), with the event recorded after the last of it (lavin_fast.streams)."""
        if self._ahead_stream is None:
            self._ahead_stream = own_stream(self._gpu())
        with on_stream(self._ahead_stream):
            batch, bad = self.maker.make(index, known_bad)
            event = hand_over(self._ahead_stream)
        return batch, bad, event

    def _taken(self, made):
        """A look-ahead batch, usable on the calling thread's current stream (waits on its event there, holds it)."""
        batch, bad, event = made
        if event is not None:  # None: made on the CPU
            take_over((batch.context, batch.target), event, self._gpu())
        return batch, bad

    def __next__(self) -> InContextBatch:
        if self._ahead():
            batch, bad = self._taken(self._runner().get(self._next))
        elif self.cfg.num_workers == 0:
            batch, bad = self._make_here(self._next)
        else:
            if self._it is None:
                self._it = self._stream()
            batch, bad = next(self._it)
        self._record(bad)
        self._next += 1
        return batch

    def batch_at(self, index: int) -> InContextBatch:
        """The batch at any position of the stream (does not move the stream)."""
        if self._ahead():
            batch, bad = self._taken(self._runner().peek(index))
        else:
            batch, bad = self._make_here(index)
        self._record(bad)
        return batch

    def close(self) -> None:
        """Stop the background thread / workers (also done when the loader is garbage-collected)."""
        if self._ahead_of is not None:
            self._ahead_of.close()
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._it = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def state_dict(self) -> dict:
        """Position of the stream (the next batch's index) and what identifies it."""
        return {**stream_state(self._next, self.cfg, self.weights), "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position: the following batches equal those of the saved run."""
        self._next = check_stream_state(state, self.state_dict(), "InContextLoader")
        self.skipped.update(state.get("skipped", {}))
        self._it = None  # restart the workers at the new position
        if self._ahead_of is not None:
            self._ahead_of.drop_before(self._next)

    @property
    def can_seek(self) -> bool:
        """Whether seek() can continue the stream at a global sample position (an elastic stream)."""
        return self.cfg.elastic

    def seek(self, samples: int) -> None:
        """Continue an elastic stream at global sample `samples` (a resume on another number of ranks: together the
        ranks draw the samples an uninterrupted run would have drawn from there on)."""
        self._next = seek_index(samples, self.cfg, "InContextLoader")
        self._it = None
        if self._ahead_of is not None:
            self._ahead_of.close()


def build_incontext_loader(
    source: str | os.PathLike | Sequence[str | os.PathLike] = "demo",
    resolution: int | tuple[int, int] = 256,
    n_pairs: int = 4,
    batch_size: int = 8,
    tasks: Sequence[str] | dict[str, float] | None = None,
    seed: int = 0,
    shard_id: int = 0,
    num_shards: int = 1,
    backend: str = "auto",
    **kwargs,
) -> InContextLoader:
    """An in-context loader over `source` ("demo", a manifest file, or an image/clip directory, or a list of them).

    tasks: None (all the source provides), a list of names (equal weights) or {name: weight}.
    Further keyword arguments are LoaderConfig fields (device, num_workers, augment, ...)."""
    if tasks is not None and not isinstance(tasks, dict):
        if isinstance(tasks, str):
            tasks = [tasks]
        tasks = {str(t): 1.0 for t in tasks}
    unknown = [k for k in kwargs if k not in LoaderConfig.__dataclass_fields__]
    if unknown:
        raise ValueError(f"build_incontext_loader: unknown options {unknown}; see LoaderConfig")
    cfg = LoaderConfig(
        resolution=resolution,
        n_pairs=n_pairs,
        batch_size=batch_size,
        tasks=tasks,
        seed=seed,
        shard_id=shard_id,
        num_shards=num_shards,
        backend=backend,
        **kwargs,
    )
    return InContextLoader(source, cfg)
