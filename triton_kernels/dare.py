"""DARE: Philox4x32-10 keep masks, the keep-mask evaluation of every mask kind, masked L1.

Random mask (bit-identical to ``mergecore.rng``): entry j is kept iff
``philox(counter=(lo32(j >> 2), hi32(j >> 2), 0, 0), key)[j & 3] >> 8 < threshold24``.
Philox4x32-10 round: ``(hi0, lo0) = M0 * c0``, ``(hi1, lo1) = M1 * c2`` (32x32 -> 64 bits),
``c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)``; the key is bumped by ``(W0, W1)`` before
every round but the first. All words are uint32 (products wrap, ``tl.umulhi`` gives the
high half); the per-round keys are computed on the host and read from the mask row.
One Philox call yields the words of 4 consecutive entries.

Top / band masks: ``in(T, J) = key > T or (key == T and j < J)`` with
``key = bits(|d|)``; keep = ``in(upper) and not in(drop)``. Each mask is reduced on the host to
the cheapest of five kinds: all (no per-element work), top, band, random, none.

Masked L1, per job: ``(sum |d|, sum |d| * keep)`` with ``d = fl32(x) - fl32(base)``, fp32 per
tile, tile partials combined in fp64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from triton_kernels import _config
from triton_kernels._common import abs_key, job_and_tile, load_f32, load_offset
from triton_kernels._host import (
    launch_groups,
    reduce_launch,
    rel_offset,
)

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_ROUNDS = 10
_MASK32 = 0xFFFFFFFF

KIND_ALL = 0
KIND_TOP = 1
KIND_BAND = 2
KIND_RANDOM = 3
KIND_NONE = 4
KEY_NONE = 0xFFFFFFFF
KEY_MAX = 0x7FFFFFFF
MASK_FIELDS = 6 + 2 * _ROUNDS  # kind, t1, j1, t2, j2, threshold24, round keys


def _top_kind(threshold: int, cutoff: int, n: int) -> str:
    """"none", "all" or "top" for ``TopSet(threshold, cutoff)`` on n entries."""
    if threshold > KEY_MAX or (cutoff <= 0 and threshold == KEY_MAX):
        return "none"
    if threshold == 0 and cutoff >= n:
        return "all"
    return "top"


def mask_row(mask: tuple, n: int, what: str = "mask") -> list[int]:
    """The table row of one mask, given as a tuple.

    ``("all",)``, ``("top", T, J)``, ``("band", T_upper, J_upper, T_drop, J_drop)`` or
    ``("random", threshold24, key0, key1)``. Top sets are reduced to the cheapest kind
    (empty -> none, everything -> all); thresholds fit int32 and cutoffs are clamped to n.
    """
    kind = mask[0]
    rest = [0] * (2 * _ROUNDS)
    if kind == "random":
        _, thr, key0, key1 = mask
        keys = []
        k0, k1 = int(key0) & _MASK32, int(key1) & _MASK32
        for r in range(_ROUNDS):
            keys += [(k0 + r * _W0) & _MASK32, (k1 + r * _W1) & _MASK32]
        return [KIND_RANDOM, 0, 0, 0, 0, int(thr)] + keys
    if kind == "all":
        return [KIND_ALL, 0, 0, 0, 0, 0] + rest
    if kind not in ("top", "band"):
        raise ValueError(f"{what}: unknown mask kind {kind!r}")
    t1, j1 = int(mask[1]), min(int(mask[2]), n)
    upper = _top_kind(t1, j1, n)
    if upper == "none":
        return [KIND_NONE, 0, 0, 0, 0, 0] + rest
    drop = "none" if kind == "top" else _top_kind(int(mask[3]), min(int(mask[4]), n), n)
    if drop == "all":
        return [KIND_NONE, 0, 0, 0, 0, 0] + rest
    if n > KEY_MAX and (upper == "top" or drop == "top"):
        raise ValueError(f"{what}: top-k masks support at most {KEY_MAX} elements, got {n}")
    if drop == "none":
        if upper == "all":
            return [KIND_ALL, 0, 0, 0, 0, 0] + rest
        return [KIND_TOP, t1, j1, 0, 0, 0] + rest
    t2, j2 = int(mask[3]), min(int(mask[4]), n)
    if upper == "all":
        t1, j1 = 0, n
    return [KIND_BAND, t1, j1, t2, j2, 0] + rest


def launch_flags(rows: list[list[int]]) -> tuple[bool, bool]:
    """(any top/band mask, any random mask) among mask rows: the kernels' TOPS / RANDOM."""
    kinds = {r[0] for r in rows}
    return bool(kinds & {KIND_TOP, KIND_BAND}), KIND_RANDOM in kinds


@triton.jit
def philox4x32_10(c0, c1, c2, c3, round_keys):
    """Philox4x32-10 on uint32 counter words; ``round_keys`` points at 20 key words."""
    for r in tl.static_range(10):
        k0 = tl.load(round_keys + 2 * r).to(tl.uint32)
        k1 = tl.load(round_keys + 2 * r + 1).to(tl.uint32)
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def random_words(start, round_keys, BLOCK: tl.constexpr):
    """The 32-bit words of entries ``start .. start+BLOCK-1`` (``start % 4 == 0``)."""
    ctr = start // 4 + tl.arange(0, BLOCK // 4)
    c0 = (ctr & 0xFFFFFFFF).to(tl.uint32)
    c1 = (ctr >> 32).to(tl.uint32)
    zero = tl.zeros([BLOCK // 4], dtype=tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, zero, zero, round_keys)
    # entry 4c + w takes word w of counter c
    return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK])


@triton.jit
def _in_top(mrow, key, idx32):
    t = tl.load(mrow).to(tl.int32)
    j = tl.load(mrow + 1).to(tl.int32)
    return (key > t) | ((key == t) & (idx32 < j))


@triton.jit
def keep_block(mrow, key, idx, start, BLOCK: tl.constexpr, TOPS: tl.constexpr,
               RANDOM: tl.constexpr):
    """Keep mask of entries ``idx = start + arange(BLOCK)`` for the mask row ``mrow``.

    Kinds: 0 all, 1 top, 2 band (top minus drop), 3 random, 4 none. ``TOPS`` / ``RANDOM``:
    the launch may hold top/band or random masks (otherwise that code is left out).
    ``key``: int32 keys; top/band compare in int32 (keys, thresholds and indices < 2**31).
    """
    kind = tl.load(mrow)
    keep = (key >= 0) & (kind != 4)
    if TOPS:  # noqa: SIM102 - compile-time flag, then a runtime kind
        if (kind == 1) | (kind == 2):
            idx32 = idx.to(tl.int32)
            keep = _in_top(mrow + 1, key, idx32)
            if kind == 2:
                keep = keep & (~_in_top(mrow + 3, key, idx32))
    if RANDOM:  # noqa: SIM102 - compile-time flag, then a runtime kind
        if kind == 3:
            thr = tl.load(mrow + 5).to(tl.int32)
            words = random_words(start, mrow + 6, BLOCK)
            keep = (words >> 8).to(tl.int32) < thr
    return keep


@triton.jit
def _l1_tile(b_ptr, x_ptr, mrow, offs, start, n, MASKED: tl.constexpr, BLOCK: tl.constexpr,
             TOPS: tl.constexpr, RANDOM: tl.constexpr):
    valid = offs < n
    d = load_f32(x_ptr, offs, valid, MASKED) - load_f32(b_ptr, offs, valid, MASKED)
    a = tl.abs(d)
    keep = keep_block(mrow, abs_key(d), offs, start, BLOCK, TOPS, RANDOM)
    return tl.sum(a, 0), tl.sum(tl.where(keep, a, 0.0), 0)


@triton.jit
def _l1_kernel(in_ref, jobs, prog_job, prog_tile, partial,
               MULTI: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
               ROW: tl.constexpr, TOPS: tl.constexpr, RANDOM: tl.constexpr):
    job, tile = job_and_tile(prog_job, prog_tile, MULTI)
    row = jobs + job * ROW
    n = tl.load(row)
    b_ptr = in_ref + load_offset(row + 1, ALIGNED)
    x_ptr = in_ref + load_offset(row + 2, ALIGNED)
    start = tile * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        total, kept = _l1_tile(b_ptr, x_ptr, row + 3, offs, start, n, False, BLOCK, TOPS,
                               RANDOM)
    else:
        total, kept = _l1_tile(b_ptr, x_ptr, row + 3, offs, start, n, True, BLOCK, TOPS,
                               RANDOM)
    out = partial + tl.program_id(0).to(tl.int64) * 2
    tl.store(out, total)
    tl.store(out + 1, kept)


def masked_l1_many(jobs: Sequence[tuple[torch.Tensor, torch.Tensor, tuple]]) -> list[tuple[float, float]]:
    """``(L1(d), L1(d * keep))`` for each job ``(base, x, mask)`` (see ``mask_row``)."""
    results: list[tuple[float, float]] = [(0.0, 0.0)] * len(jobs)
    block = _config.L1_BLOCK
    width = 3 + MASK_FIELDS
    for _group, idx in launch_groups(jobs, lambda j: (j[0].device, j[0].dtype),
                                     lambda j: j[0].numel()):
        ref = jobs[idx[0]][0]
        rows, offsets = [], []
        for i in idx:
            base, x, mask = jobs[i]
            n = base.numel()
            ob = rel_offset(base, ref, f"masked_l1 job {i} (base)")
            ox = rel_offset(x, ref, f"masked_l1 job {i} (x)")
            rows.append([n, ob, ox] + mask_row(mask, n, f"masked_l1 job {i}"))
            offsets += [ob, ox]
        tops, random = launch_flags([r[3:] for r in rows])
        sums = reduce_launch(_l1_kernel, ref, rows, offsets, width=2, block=block,
                             warps=_config.L1_WARPS, ROW=width, TOPS=tops, RANDOM=random)
        for i, s in zip(idx, sums):
            results[i] = (s[0], s[1])
    return results
