"""A byte budget shared by the pipeline's stages: it bounds the memory held in flight.

Its size is ``--max-memory``, or when that is not given ``auto_budget``: room for
``AUTO_ITEMS`` of the largest tensor's inputs and output at once (one being read, one merged,
one written, so the stages overlap also on the largest tensors), at least ``AUTO_MIN`` and at
most ``AUTO_MAX_SHARE`` of the memory the system has available (never below ``AUTO_MIN``).
Measured on the 2-core VM: a 70B-shaped ties merge (largest tensor's inputs and output
2.1 GB) projected at 484 s with a 2 GiB budget and 375 s with 6 GiB.
"""

from __future__ import annotations

import os
import threading

#: The automatic budget holds this many of the largest tensor's inputs and output.
AUTO_ITEMS = 3
#: ... and is at least this (the budget before it was automatic) ...
AUTO_MIN = 2 << 30
#: ... and at most this share of the available memory.
AUTO_MAX_SHARE = 0.5


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux ``MemAvailable``, else
    the free physical pages); None where neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def auto_budget(largest_item_bytes: int, available: int | None) -> int:
    """The budget when none is given: ``AUTO_ITEMS * largest_item_bytes``, at least
    ``AUTO_MIN``, at most ``AUTO_MAX_SHARE * available`` (when known) but never below
    ``AUTO_MIN``."""
    want = max(AUTO_MIN, AUTO_ITEMS * int(largest_item_bytes))
    if available:
        want = min(want, max(AUTO_MIN, int(AUTO_MAX_SHARE * available)))
    return want


class ByteBudget:
    """Counting semaphore over bytes.

    ``acquire(n)`` blocks until ``n`` more bytes fit under ``limit``. A request larger than the
    whole limit is granted when nothing else is held, so one huge tensor cannot deadlock the
    pipeline (peak memory is then that tensor's size).
    """

    def __init__(self, limit: int):
        if limit <= 0:
            raise ValueError("memory budget must be positive")
        self.limit = int(limit)
        self.held = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._closed = False

    def acquire(self, nbytes: int) -> None:
        with self._cond:
            while not self._closed and self.held > 0 and self.held + nbytes > self.limit:
                self._cond.wait()
            if self._closed:
                raise RuntimeError("pipeline stopped")
            self.held += nbytes
            self.peak = max(self.peak, self.held)

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.held -= nbytes
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiter with an error (used when another stage failed)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
