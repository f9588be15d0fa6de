"""The data threads' stream protocol (lavin_fast.streams, docs/training.md), checked without a GPU.

torch.cuda.Stream / Event / stream() / current_stream() and Tensor.record_stream are replaced by recording fakes;
the simulated GPU work (DALI's output copy and the assembly in the loader's look-ahead thread, the VAE encode in
the training data thread, the training step in the main thread) logs which stream it is enqueued on and which
tensors it reads and writes. The checker then asserts, for every read of a tensor made on another stream:
- the reading stream waited, before the read, on an event recorded on the producing stream *after* the
  producer's last enqueue that wrote the tensor;
- the tensor was held for the reading stream (record_stream), unless it is a long-lived weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import pytest
import torch

from lavin_fast.data.incontext.config import InContextBatch
from lavin_fast.data.incontext.loader import build_incontext_loader
from lavin_fast.train import sources


class _Recorder:
    def __init__(self):
        self.log: list[tuple] = []
        self.held: list[tuple[torch.Tensor, object]] = []
        self.lock = threading.Lock()
        self.tls = threading.local()
        self.default = FakeStream(self, "default")
        self.keep: list[torch.Tensor] = []  # no id() reuse while the log refers to tensors

    def current(self):
        return getattr(self.tls, "stream", self.default)

    def add(self, entry: tuple) -> int:
        with self.lock:
            self.log.append(entry)
            return len(self.log) - 1

    def enqueue(self, op: str, reads=(), writes=()) -> None:
        self.keep.extend([*reads, *writes])
        self.add(("op", self.current(), op, [id(t) for t in reads], [id(t) for t in writes]))


class FakeStream:
    def __init__(self, rec: _Recorder, name: str):
        self.rec, self.name = rec, name

    def wait_event(self, event) -> None:
        self.rec.add(("wait", self, event))

    def synchronize(self) -> None:
        self.rec.add(("sync", self, threading.current_thread().name))

    def wait_stream(self, other) -> None:
        event = FakeEvent(self.rec)
        event.record(other)
        self.wait_event(event)

    def __repr__(self) -> str:
        return f"<stream {self.name}>"


class FakeEvent:
    def __init__(self, rec: _Recorder):
        self.rec, self.stream, self.pos = rec, None, None

    def record(self, stream=None) -> None:
        self.stream = stream if stream is not None else self.rec.current()
        self.pos = self.rec.add(("record", self.stream, self))

    def synchronize(self) -> None:
        self.rec.add(("sync", self.stream, threading.current_thread().name))


def check_protocol(rec: _Recorder, long_lived: set[int]) -> list[str]:
    """Every cross-stream read waited on an event recorded after the tensor's last write, and was held."""
    problems = []
    made: dict[int, tuple[FakeStream, int]] = {}
    held = {(id(t), s) for t, s in rec.held}
    for pos, entry in enumerate(rec.log):
        if entry[0] != "op":
            continue
        _, stream, op, reads, writes = entry
        for tid in reads:
            producer, ppos = made[tid]
            if producer is stream:
                continue
            waited = any(
                e[0] == "wait" and e[1] is stream and e[2].stream is producer and e[2].pos > ppos for e in rec.log[:pos]
            )
            if not waited:
                problems.append(
                    f"{op} on {stream} reads a tensor written at #{ppos} on {producer} with no wait on an event "
                    "recorded after that write"
                )
            if tid not in long_lived and (tid, stream) not in held:
                problems.append(f"{op} on {stream} reads a tensor of {producer} that was not held for {stream}")
        for tid in writes:
            made[tid] = (stream, pos)
    return problems


@pytest.fixture
def fake_cuda(monkeypatch):
    rec = _Recorder()
    names = iter(f"side{i}" for i in range(100))

    @contextlib.contextmanager
    def stream_ctx(s):
        before = getattr(rec.tls, "stream", None)
        rec.tls.stream = s
        try:
            yield
        finally:
            rec.tls.stream = before if before is not None else rec.default

    def record_stream(t, s):
        with rec.lock:
            rec.held.append((t, s))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream(rec, next(names)))
    monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: FakeEvent(rec))
    monkeypatch.setattr(torch.cuda, "stream", stream_ctx)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: rec.current())
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: rec.default)
    monkeypatch.setattr(torch.Tensor, "record_stream", record_stream)
    monkeypatch.setattr(
        torch.cuda, "synchronize", lambda device=None: rec.add(("sync", None, threading.current_thread().name))
    )
    return rec


class _FakeMaker:
    """The look-ahead thread's batch maker: DALI's output copy and the assembly, on the current stream."""

    def __init__(self, rec: _Recorder, b: int = 2):
        self.rec, self.b = rec, b

    def make(self, index: int, known_bad=None):
        ctx = torch.full((self.b, 3, 3, 4, 4), float(index))
        tgt = torch.full((self.b, 3, 1, 4, 4), float(index))
        self.rec.enqueue("DALI output copy", writes=[ctx, tgt])
        self.rec.enqueue("degrade + assemble", reads=[ctx, tgt], writes=[ctx, tgt])
        batch = InContextBatch(
            context=ctx, target=tgt, task=["t"] * self.b, context_segments=(1, 1, 1), target_segments=(1,), index=index
        )
        return batch, {}


class _FakeVAE(torch.nn.Module):
    def __init__(self, rec: _Recorder):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        rec.enqueue("VAE weights to the device", writes=[self.w])


def _gpu_dali_loader(rec: _Recorder):
    """A real InContextLoader set up as the DALI GPU backend (look-ahead thread), its batch maker faked."""
    loader = build_incontext_loader("demo", resolution=16, n_pairs=1, batch_size=2, backend="torch")
    loader.backend, loader.device = "dali", "gpu"
    loader.cfg = dataclasses.replace(loader.cfg, device_id=0, prefetch=2)
    loader.maker = _FakeMaker(rec)
    return loader


@pytest.mark.parametrize("depth", [1, 2])
def test_data_thread_hand_over_follows_the_stream_protocol(fake_cuda, monkeypatch, depth):
    """Loader look-ahead thread -> training data thread (VAE encode) -> training step, three streams: every consumer
    waits on an event recorded after the producer's last enqueue, and every tensor that crosses is held. The old
    code made the data stream wait on the default stream *before* the batch was fetched, while the look-ahead
    thread enqueued the DALI copy and the assembly on the default stream afterwards, and held nothing there."""
    rec = fake_cuda
    vae = _FakeVAE(rec)

    def fake_encode(vae_, pixels, segments, gens):
        out = pixels.mean(1, keepdim=True)
        rec.enqueue("VAE encode", reads=[pixels, vae_.w], writes=[out])
        return out

    monkeypatch.setattr(sources, "encode_segments", fake_encode)
    loader = _gpu_dali_loader(rec)
    inner = sources.VAEEncodedSource(
        loader, vae, seed=0, rank=0, world=1, micro_batch=2, device=torch.device("cpu")
    )  # tensors stay on the CPU; the streams are the fakes' (BackgroundSource's device below)
    bg = sources.BackgroundSource(inner, depth, "cuda:0")
    try:
        for _ in range(4):
            x, c = bg.next_batch()
            rec.enqueue("training step", reads=[x, c])
    finally:
        bg.close()
    problems = check_protocol(rec, long_lived={id(vae.w)})
    assert not problems, "\n".join(problems[:8])
    assert [e for e in rec.log if e[0] == "sync"] == []  # ordering by events only: no host waits anywhere
    streams = {e[1].name for e in rec.log if e[0] == "op"}
    assert len(streams) == 3, streams  # look-ahead, data thread, training: each its own


def test_checker_catches_a_missing_wait_and_a_missing_hold(fake_cuda):
    """The checker itself: a read on another stream without the wait, or without the hold, is reported."""
    rec = fake_cuda
    side = torch.cuda.Stream()
    t = torch.zeros(2)
    with torch.cuda.stream(side):
        rec.enqueue("produce", writes=[t])
        early = torch.cuda.Event()
        early.record(side)
        rec.enqueue("produce more", reads=[t], writes=[t])
    rec.default.wait_event(early)  # recorded before the last write: not enough
    rec.enqueue("consume", reads=[t])
    problems = check_protocol(rec, long_lived=set())
    assert any("no wait" in p for p in problems) and any("not held" in p for p in problems)
    rec.log.clear()
    rec.held.clear()
    with torch.cuda.stream(side):
        rec.enqueue("produce", writes=[t])
        done = torch.cuda.Event()
        done.record(side)
    rec.default.wait_event(done)
    t.record_stream(rec.default)
    rec.enqueue("consume", reads=[t])
    assert check_protocol(rec, long_lived=set()) == []


@pytest.mark.gpu
@pytest.mark.parametrize("look_ahead", [False, True])
def test_online_data_thread_on_cuda_matches_the_cpu_path(monkeypatch, look_ahead):
    """The online data thread on CUDA (its own stream, pinned non-blocking copies, the VAE encode there, the
    hand-over to the step's stream) gives the CPU path's latents, batch for batch. look_ahead: the loader's
    look-ahead thread also works on the GPU (its batches moved to CUDA there, as DALI's GPU output would be), so
    three streams hand over. The VAE runs its torch reference on both sides (this checks the data path, not the
    kernels), no TF32, and the posterior's mode (CUDA and CPU generators draw different numbers)."""
    import copy

    from lavin_fast.models.vae import build_vae

    monkeypatch.setenv("LAVIN_FAST_BACKEND", "torch")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    encode = sources.encode_segments
    monkeypatch.setattr(sources, "encode_segments", lambda vae, px, seg, gens: encode(vae, px, seg, None))
    torch.manual_seed(0)
    vae = build_vae(device="cpu", block_out_channels=[8, 8, 8], layers_per_block=1, norm_num_groups=4).eval()
    kw = dict(resolution=32, n_pairs=1, batch_size=2, seed=3, backend="torch")
    cpu = sources.VAEEncodedSource(
        build_incontext_loader("demo", **kw), vae, seed=0, rank=0, world=1, micro_batch=2, device=torch.device("cpu")
    )
    expect = [cpu.next_batch() for _ in range(3)]

    dev = torch.device("cuda", torch.cuda.current_device())
    loader = build_incontext_loader("demo", **kw)
    if look_ahead:
        loader.backend, loader.device = "dali", "gpu"
        loader.cfg = dataclasses.replace(loader.cfg, device_id=dev.index, prefetch=2)
        make = loader.maker.make

        def make_on_gpu(index, known_bad=None):
            batch, bad = make(index, known_bad)
            return batch.to(dev, non_blocking=False), bad

        loader.maker.make = make_on_gpu
    inner = sources.VAEEncodedSource(
        loader, copy.deepcopy(vae).to(dev), seed=0, rank=0, world=1, micro_batch=2, device=dev
    )
    bg = sources.BackgroundSource(inner, 2, dev)
    try:
        for x_cpu, c_cpu in expect:
            x, c = bg.next_batch()
            assert x.device == dev and c.device == dev
            torch.testing.assert_close(x.cpu(), x_cpu, atol=1e-3, rtol=1e-3)
            torch.testing.assert_close(c.cpu(), c_cpu, atol=1e-3, rtol=1e-3)
    finally:
        bg.close()
