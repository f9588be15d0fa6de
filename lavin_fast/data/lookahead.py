"""Run-ahead: batches that are pure functions of their stream index, made ahead of the caller in one background
thread. The in-context pixel loader (DALI backend) and the latent cache loader both use it."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class RunAhead:
    """Makes `make(index, *snapshot())` for index, index + 1, ..., index + depth in one worker thread.

    `get(index)` returns the result for `index` (made now if it was not ahead) and queues the next `depth`;
    `snapshot()` is called on the caller's thread at submission (e.g. a copy of the skipped-file set, so the
    worker never reads a dict the caller is changing). `initializer` runs once in the worker (e.g. binding the
    rank's CUDA device). Exceptions raised by `make` are raised by `get`."""

    def __init__(
        self,
        make: Callable[..., Any],
        depth: int,
        *,
        snapshot: Callable[[], tuple] | None = None,
        initializer: Callable[..., None] | None = None,
        initargs: tuple = (),
        name: str = "lavin-fast-data",
    ):
        if depth < 0:
            raise ValueError(f"depth: expected >= 0 batches ahead, got {depth}")
        self.make, self.depth, self.snapshot = make, int(depth), snapshot
        self._init, self._initargs, self._name = initializer, initargs, name
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}

    def submit(self, index: int) -> Future:
        if index not in self._pending:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=self._name, initializer=self._init, initargs=self._initargs
                )
            args = self.snapshot() if self.snapshot is not None else ()
            self._pending[index] = self._pool.submit(self.make, index, *args)
        return self._pending[index]

    def get(self, index: int) -> Any:
        """The result for `index`, consumed; `index + 1 .. index + depth` are queued behind it."""
        fut = self.submit(index)
        for i in range(index + 1, index + 1 + self.depth):
            self.submit(i)
        del self._pending[index]
        return fut.result()

    def peek(self, index: int) -> Any:
        """The result for `index` without consuming it (a queued one stays queued)."""
        fut = self._pending.get(index)
        if fut is not None:
            return fut.result()
        result = self.submit(index).result()
        del self._pending[index]
        return result

    def drop_before(self, index: int) -> None:
        """Forget the queued work before `index` (after a seek)."""
        for i in [i for i in self._pending if i < index]:
            self._pending.pop(i).cancel()

    def close(self) -> None:
        """Cancel the queued work and stop the thread (a later get() starts a new one)."""
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
