"""Counter-based random stream for DARE masks (the reference implementation).

Entry ``j`` of model ``i`` in output tensor ``name`` is kept with probability ``p`` when

    philox4x32_10(counter=(lo32(j >> 2), hi32(j >> 2), 0, 0), key=dare_key(seed, name, i))[j & 3] >> 8
        < threshold24(p)

The stream depends only on (seed, tensor name, model index, element index), never on the
backend, thread count, processing order or batching. The C++ and Triton backends implement
the same function; tests check that their masks are identical to this one.
"""

from __future__ import annotations

import hashlib

import numpy as np

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def threshold24(p: float) -> int:
    """Integer keep threshold: an entry is kept iff its 24-bit uniform draw is below it."""
    return int(min(max(round(float(p) * (1 << 24)), 0), 1 << 24))


def dare_key(seed: int, name: str, model_index: int) -> tuple[int, int]:
    """The 64-bit Philox key (two 32-bit words) for one model's mask of one tensor."""
    material = f"mergecore-dare\0{int(seed)}\0{name}\0{int(model_index)}".encode()
    digest = hashlib.blake2b(material, digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def _mulhilo(a: int, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prod = b.astype(np.uint64) * np.uint64(a)
    return (prod >> np.uint64(32)).astype(np.uint64), (prod & np.uint64(_MASK32)).astype(np.uint64)


def philox4x32(counter_lo: np.ndarray, counter_hi: np.ndarray, key0: int, key1: int) -> np.ndarray:
    """Philox4x32-10 on counters ``(lo, hi, 0, 0)``; returns an (n, 4) uint32 array."""
    c0 = counter_lo.astype(np.uint64)
    c1 = counter_hi.astype(np.uint64)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = key0 & _MASK32, key1 & _MASK32
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def random_words(n: int, key0: int, key1: int, start: int = 0) -> np.ndarray:
    """The 32-bit words for elements ``start .. start+n-1`` (uint32 array of length n)."""
    if n <= 0:
        return np.zeros(0, dtype=np.uint32)
    first, last = start >> 2, (start + n - 1) >> 2
    ctr = np.arange(first, last + 1, dtype=np.uint64)
    words = philox4x32(ctr & np.uint64(_MASK32), ctr >> np.uint64(32), key0, key1).reshape(-1)
    offset = start - (first << 2)
    return words[offset : offset + n]


def keep_mask(n: int, threshold: int, key0: int, key1: int) -> np.ndarray:
    """Boolean keep mask of the DARE drop for n elements."""
    return (random_words(n, key0, key1) >> np.uint32(8)) < np.uint32(threshold)
