"""Host-side helpers of the launchers: offsets tables, program tables, one upload per call.

A launch describes many tensors with int64 tables of *element offsets* relative to one
reference tensor per dtype. All tables of one launch are packed into one int64 array and
copied to the device once (pinned memory, asynchronous), so launching does not wait for the
GPU.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import torch

MAX_NUMEL = (1 << 31) - 1  # element indices are int32 inside the selection kernels


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def f32_bits(x: float) -> int:
    """The bit pattern of ``float32(x)`` as a signed 32-bit int (for int64 tables)."""
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


def rel_offset(t: torch.Tensor, ref: torch.Tensor, what: str) -> int:
    """Offset of ``t`` from ``ref`` in elements (both of one dtype)."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{what}: dtype {t.dtype} differs from {ref.dtype} in one launch")
    delta = t.data_ptr() - ref.data_ptr()
    size = t.element_size()
    if delta % size:
        raise ValueError(f"{what}: data pointer is not aligned to its element size {size}")
    return delta // size


def all_aligned(refs: Sequence[torch.Tensor], offsets: Sequence[int]) -> bool:
    """True when every reference is 16-byte aligned and every offset a multiple of 16."""
    return all(r.data_ptr() % 16 == 0 for r in refs) and all(o % 16 == 0 for o in offsets)


class Tables:
    """Collects int64 arrays, uploads them as one buffer, hands back device views."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._size = 0

    def add(self, values) -> int:
        """Queue an array (any shape, flattened); returns its handle."""
        arr = np.ascontiguousarray(np.asarray(values, dtype=np.int64).reshape(-1))
        self._parts.append(arr)
        self._size += max(arr.size, 1)
        return len(self._parts) - 1

    def upload(self, device: torch.device) -> list[torch.Tensor]:
        """One host-to-device copy; returns one int64 device view per queued array."""
        flat = np.zeros(max(self._size, 1), dtype=np.int64)
        bounds = []
        pos = 0
        for arr in self._parts:
            flat[pos : pos + arr.size] = arr
            bounds.append((pos, arr.size))
            pos += max(arr.size, 1)
        host = torch.from_numpy(flat)
        if device.type == "cuda":
            host = host.pin_memory()
            dev = host.to(device, non_blocking=True)
        else:
            dev = host.to(device)
        return [dev[p : p + max(s, 1)] for p, s in bounds]


def program_table(ntiles: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """For tiles of many jobs in one grid: each program's (job, tile)."""
    counts = np.asarray(ntiles, dtype=np.int64)
    jobs = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    tiles = np.arange(int(counts.sum()), dtype=np.int64) - starts
    return jobs, tiles


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def group_by(items: Sequence, key) -> dict:
    """Indices of ``items`` grouped by ``key(item)``, in first-seen order."""
    groups: dict = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return groups
