"""A byte budget shared by the pipeline's stages: it bounds the memory held in flight."""

from __future__ import annotations

import threading


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
