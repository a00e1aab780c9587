"""Reusable host byte buffers for the streaming pipeline.

A checkpoint repeats the same tensor sizes layer after layer, so the buffer that held layer
i's ``q_proj`` fits layer i+1's. Taking it again skips the page faults of a fresh allocation
(the kernel zero-fills every new 4 KiB page on first touch: about 0.2 s of CPU per GB read
or written, measured on the 2-core CI machine) and, for CUDA, the cost of pinning new memory.

``take(n)`` hands out the smallest free buffer whose capacity lies in ``[n, 2n]`` (else a new
one of exactly ``n`` bytes); ``give(buf)`` returns it. Free buffers are kept up to
``keep_bytes`` in total; beyond that the largest are dropped. Callers count every byte they
hold against the pipeline's ``ByteBudget`` as before, so taken buffers stay within the budget
and free ones add at most ``keep_bytes``.
"""

from __future__ import annotations

import bisect
import threading

import torch


class BufferPool:
    """A thread-safe pool of 1-D ``uint8`` tensors (pinned when ``pin_memory``)."""

    def __init__(self, keep_bytes: int, *, pin_memory: bool = False):
        if keep_bytes < 0:
            raise ValueError(f"keep_bytes must be >= 0, got {keep_bytes}")
        self.keep_bytes = int(keep_bytes)
        self.pin_memory = pin_memory
        self._free: list[tuple[int, int, torch.Tensor]] = []  # (capacity, serial, buffer)
        self._free_bytes = 0
        self._serial = 0
        self._lock = threading.Lock()
        self.reused = 0
        self.allocated = 0

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    def take(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes`` bytes (at most twice that when reused)."""
        nbytes = int(nbytes)
        with self._lock:
            k = bisect.bisect_left(self._free, (nbytes, -1))
            if k < len(self._free) and self._free[k][0] <= 2 * max(nbytes, 1):
                capacity, _, buf = self._free.pop(k)
                self._free_bytes -= capacity
                self.reused += 1
                return buf
            self.allocated += 1
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)

    def give(self, buf: torch.Tensor) -> None:
        """Return a buffer from :meth:`take`; nothing may use it afterwards."""
        capacity = buf.numel()
        if capacity == 0 or capacity > self.keep_bytes:
            return
        with self._lock:
            self._serial += 1
            bisect.insort(self._free, (capacity, self._serial, buf))
            self._free_bytes += capacity
            while self._free_bytes > self.keep_bytes:
                dropped, _, _ = self._free.pop()  # the largest
                self._free_bytes -= dropped
