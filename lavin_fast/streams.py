"""The stream protocol of the data threads (docs/training.md, "Streams of the data threads").

A thread that makes GPU tensors for another thread (the in-context loader's look-ahead thread, the training data
thread) works on a CUDA stream of its own and hands tensors over in one way:

1. `own_stream(device)`: the producer's stream. All of a batch's GPU work (DALI output copy, degradations,
   assembly, VAE encode) is enqueued on it, inside `on_stream(stream)`.
2. `start_event(device)` / `wait_start(stream, event)`: when a producer thread starts, it waits once on an event
   recorded on the starting thread's stream (weights copied there before, e.g. the VAE's, have then landed).
3. `hand_over(stream)`: after the producer's *last* enqueue for a batch, an event is recorded on its stream and
   travels with the tensors.
4. `take_over(tensors, event, device)`: the consumer's current stream waits on that event, and every tensor
   that crossed is held for the consumer's stream (`record_stream`), so that the caching allocator does not hand
   its memory out while the consumer still reads it after the producer dropped it.

No host synchronisation is needed anywhere in this: ordering is by events between streams. On the CPU every
function here is a no-op (stream None, event None).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def _is_cuda(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


def own_stream(device: torch.device | str | None):
    """A new CUDA stream on `device` for a producer thread; None on the CPU."""
    return torch.cuda.Stream(torch.device(device)) if _is_cuda(device) else None


@contextlib.contextmanager
def on_stream(stream) -> Iterator[None]:
    """Make `stream` the calling thread's current stream (None: leave it)."""
    if stream is None:
        yield
        return
    with torch.cuda.stream(stream):
        yield


def start_event(device: torch.device | str | None):
    """An event on the calling thread's current stream, recorded now (None on the CPU); a producer thread started
    right after waits on it once (`wait_start`)."""
    if not _is_cuda(device):
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(torch.device(device)))
    return event


def wait_start(stream, event) -> None:
    if stream is not None and event is not None:
        stream.wait_event(event)


def hand_over(stream):
    """The event to hand over with a batch: recorded on the producer's `stream` after its last enqueue (call it
    after the batch's last GPU operation). None when there is no stream (CPU)."""
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def take_over(tensors: Iterable[torch.Tensor], event, device: torch.device | str | None) -> None:
    """On the consumer's side (its current stream on `device`): wait on the producer's event, then hold every
    tensor for this stream. No-op when `event` is None (CPU, or produced on this same stream)."""
    if event is None:
        return
    consumer = torch.cuda.current_stream(torch.device(device))
    consumer.wait_event(event)
    for t in tensors:
        t.record_stream(consumer)
