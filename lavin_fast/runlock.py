"""One run per output folder: an exclusive `fcntl` lock on OUT_DIR/.lavin-fast.lock for train, build-cache and
sample --out-dir.

A second run on the same folder stops at once with a `RunLockError` naming the first run's pid and host (what that
run wrote into the lock file); the lock goes with its process, so a killed run leaves nothing to clean up (its file
stays, unlocked, and the next run takes it); a run that ends removes the file. Under torchrun each rank locks its own file (`.lavin-fast.rank{R}.lock`), so the ranks of one job
do not exclude each other while each rank of a second job on the same folder is refused.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
from collections.abc import Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no lock (documented)
    fcntl = None


class RunLockError(RuntimeError):
    """Another run holds the output folder."""


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def lock_path(out_dir: str | os.PathLike, rank: int | None = None) -> pathlib.Path:
    rank = _rank() if rank is None else rank
    name = ".lavin-fast.lock" if rank == 0 else f".lavin-fast.rank{rank}.lock"
    return pathlib.Path(out_dir) / name


@contextlib.contextmanager
def run_lock(out_dir: str | os.PathLike, what: str) -> Iterator[pathlib.Path]:
    """Hold the lock of `out_dir` (created) while the block runs; RunLockError if another process holds it."""
    folder = pathlib.Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise RunLockError(f"{what}: the output folder {str(folder)!r} is a file, not a folder")
    path = lock_path(folder)
    for _attempt in range(10):
        fd = _open(folder, path, what)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "an unknown process"
                os.close(fd)
                raise RunLockError(
                    f"{what}: {str(folder)!r} is in use by another run ({holder}); wait for it to end, or give "
                    "another output folder"
                ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file the previous holder removed while we opened it
            break
        os.close(fd)
    else:
        raise RunLockError(f"{what}: cannot take the lock {str(path)!r} (it keeps being replaced)")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still held: a waiting opener sees another inode and retries
        os.close(fd)  # releases the lock


def _open(folder: pathlib.Path, path: pathlib.Path, what: str) -> int:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        why = "a part of its path is a file" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror
        raise RunLockError(f"{what}: cannot write to the output folder {str(folder)!r} ({why or exc})") from None
