"""sha256 of output shards: one file, or many at once with a progress bar.

Checking a finished 70B output (``mergecore verify``) or the kept shards of an interrupted
one (``--resume``) reads every byte it holds again, which takes minutes; the bar says how far
it is, on a terminal only (stderr), never with ``quiet``.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: Bytes read (and hashed) per call; large enough for hashlib to release the GIL.
HASH_CHUNK = 16 << 20
#: Files hashed at once (each thread reads and hashes one file).
HASH_THREADS = 4


def file_sha256(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """sha256 (hex) of a whole file, read in chunks; ``on_bytes(n)`` after each chunk."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return h.hexdigest()


class _HashProgress:
    """A tqdm bar over the bytes hashed (thread-safe updates); inert when not shown."""

    def __init__(self, total: int, label: str, quiet: bool):
        self.bar = None
        self.lock = threading.Lock()
        if not quiet and total > 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000,
                            desc=label, dynamic_ncols=True, leave=False)

    def __call__(self, nbytes: int) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def hash_files(paths: Sequence[Path], *, label: str = "checksums",
               quiet: bool = True) -> list[str | None]:
    """sha256 (hex) of each of ``paths``, in order; None for a file that cannot be read.

    Up to ``HASH_THREADS`` files are hashed at once (hashlib releases the GIL on large
    buffers). Unless ``quiet``, a progress bar over their total size (titled ``label``) is
    shown on stderr when it is a terminal.
    """
    sizes = []
    for p in paths:
        try:
            sizes.append(Path(p).stat().st_size)
        except OSError:
            sizes.append(0)
    progress = _HashProgress(sum(sizes), label, quiet)
    stop = threading.Event()  # set when the caller is interrupted: the workers quit early

    def on_bytes(nbytes: int) -> None:
        if stop.is_set():
            raise _Stopped
        progress(nbytes)

    def one(path: Path) -> str | None:
        try:
            return file_sha256(path, on_bytes)
        except OSError:
            return None

    pool = ThreadPoolExecutor(max(1, min(HASH_THREADS, len(paths))))
    try:
        digests = list(pool.map(one, paths))
    except BaseException:  # Ctrl-C, SIGTERM: do not wait for every file to be hashed
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)  # each worker stops after one chunk
        raise
    finally:
        progress.close()
    pool.shutdown()
    return digests


class _Stopped(Exception):
    """Raised inside a hashing worker once the caller has stopped waiting."""


__all__ = ["HASH_CHUNK", "file_sha256", "hash_files"]
