"""Reusable host byte buffers for the pipeline's inputs and outputs.

A fresh ``torch.empty`` of a large buffer is a fresh mapping: the kernel supplies and zeroes
every page on first touch (about 0.2 s per GB on the CPU machines we measured), and a pinned
allocation on CUDA costs even more. A merge reads and writes the same few tensor shapes over
and over (every layer has the same q/k/v/o/mlp sizes), so the pipeline takes its buffers
from this pool and gives them back when the bytes were consumed: in steady state no page is
faulted in twice.

Matching: a request of ``n`` bytes takes the smallest free buffer whose capacity is in
``[n, max(n * fit, size(n))]``, where ``size(n)`` is ``n`` rounded up to ``granule`` (for
pinned buffers, then to a power of two: what PyTorch's pinned allocator pins);
otherwise a new buffer of ``size(n)`` bytes is made.
Bound: when the buffers' total capacity would pass ``capacity``, free buffers are dropped,
least recently given back first. Buffers in use are never dropped (the pipeline's
``ByteBudget`` bounds those), so the pool's memory stays at most ``capacity`` plus what is in
use beyond it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class BufferPool:
    """A thread-safe pool of 1-D ``uint8`` host buffers (pinned when ``pin_memory``)."""

    def __init__(self, capacity: int, *, pin_memory: bool = False, fit: float = 1.25,
                 granule: int = 1 << 16):
        if capacity <= 0:
            raise ValueError("buffer pool capacity must be positive")
        self.capacity = int(capacity)
        self.pin_memory = pin_memory
        self.fit = float(fit)
        self.granule = int(granule)
        self._lock = threading.Lock()
        self._free: OrderedDict[int, torch.Tensor] = OrderedDict()  # data_ptr -> buffer
        self._in_use: dict[int, torch.Tensor] = {}
        self.total = 0  # capacity of every buffer the pool holds (free or in use)
        self.allocations = 0  # buffers made (a measure of reuse: few means good reuse)
        self.reuses = 0

    def take(self, nbytes: int, *, phase: int | None = None, align: int = 4096
             ) -> torch.Tensor:
        """A buffer of exactly ``nbytes`` bytes (a view of a pooled buffer); give it back
        with :meth:`give` when its bytes are no longer needed.

        ``phase``: the view starts at an address congruent to ``phase`` modulo ``align``
        (``TensorReader.direct_phase``: a buffer placed so that an ``O_DIRECT`` read lands
        in it without a copy); the pooled buffer is then ``align`` bytes larger."""
        if phase is None:
            return self._take(int(nbytes))
        base = self._take(int(nbytes) + align)
        skip = (phase - base.data_ptr()) % align
        view = base[skip: skip + int(nbytes)]
        if skip:
            with self._lock:
                self._in_use[view.data_ptr()] = self._in_use.pop(base.data_ptr())
        return view

    def buffer_size(self, nbytes: int) -> int:
        """Bytes of the buffer made for a request of ``nbytes``: rounded up to ``granule``;
        pinned buffers to a power of two, because PyTorch's pinned (caching host) allocator
        pins that much anyway, and the pool's accounting must count what is pinned."""
        size = max(self.granule, -(-nbytes // self.granule) * self.granule)
        if self.pin_memory:
            size = 1 << (size - 1).bit_length()
        return size

    def _take(self, nbytes: int) -> torch.Tensor:
        size = self.buffer_size(nbytes)
        largest = max(size, nbytes * self.fit)
        with self._lock:
            best = None
            for ptr, buf in self._free.items():
                cap = buf.numel()
                if nbytes <= cap <= largest and (best is None or cap < best[1].numel()):
                    best = (ptr, buf)
            if best is not None:
                del self._free[best[0]]
                self._in_use[best[0]] = best[1]  # keyed by the view's first byte
                self.reuses += 1
                return best[1][:nbytes]
            dropped = []
            while self._free and self.total + size > self.capacity:
                dropped.append(self._free.popitem(last=False)[1])
                self.total -= dropped[-1].numel()
            self.total += size
            self.allocations += 1
        if dropped and self.pin_memory:
            # the pinned allocator keeps freed blocks pinned for reuse; unpin them now, or the
            # page-locked memory would grow past the pool's capacity
            del dropped
            _release_cached_pinned_memory()
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin_memory)
        with self._lock:
            self._in_use[buf.data_ptr()] = buf
        return buf[:nbytes]

    def give(self, view: torch.Tensor) -> None:
        """Return a buffer that :meth:`take` handed out (any view starting at the first byte
        of what it handed out); giving back something else is an error."""
        with self._lock:
            buf = self._in_use.pop(view.data_ptr(), None)
            if buf is None:
                raise ValueError("BufferPool.give: not a buffer taken from this pool")
            self._free[buf.data_ptr()] = buf

    def owns(self, view: torch.Tensor) -> bool:
        """True when ``view`` starts at a buffer of this pool that is in use."""
        with self._lock:
            return view.data_ptr() in self._in_use

    def clear(self) -> None:
        """Drop every free buffer (buffers in use stay valid)."""
        with self._lock:
            for buf in self._free.values():
                self.total -= buf.numel()
            self._free.clear()


def _release_cached_pinned_memory() -> None:
    """Unpin the pinned host blocks PyTorch's allocator caches but nothing uses."""
    release = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    if release is None:  # older torch
        release = getattr(torch._C, "_host_emptyCache", None)
    if release is not None:
        release()
