"""Exact top-k selection over the keys ``key(j) = bits(|fl32(x[j]) - fl32(base[j])|)``.

Result per (pair, k): ``(T, J)`` meaning ``{j : key(j) > T or (key(j) == T and j < J)}``, the k
largest keys, lowest index first among equal keys. Canonical form (every path returns it):
k == 0 -> ``(0xFFFFFFFF, 0)``; k == n -> ``(0, n)``; otherwise T is the key of the k-th
ranked entry and J = n when every entry with key T is in the set, else J = 1 + the index of
the last entry with key T in the set. The tensor is never sorted.

Fast path (``_config.SELECT_STRATEGY == "auto"``), per (base, x) pair and k:
1. Sample ``S <= n / 16`` keys (stratified, jittered positions) and sort the *sample*; the
   sample ranks around ``k * S / n`` +- ``Z`` binomial deviations give key bounds
   ``Tlo <= Thi``.
2. One scan over the data (pairs sharing a base read it once): count keys ``> Thi`` and
   compact the candidates ``Tlo <= key <= Thi`` as (key, index). Tile t claims space in
   region ``t % R`` of the selection's candidate buffer with one atomic add on that region's
   counter (R counters on separate cache lines, so the claims do not serialize on one
   address); a tile's candidates stay contiguous and in index order, and a tile table
   records where they are.
3. Exact finish on the candidates: four 8-bit digit-histogram passes give T and the rank of
   the cutoff among the entries with key T; if that cutoff excludes some of them, per-tile
   counts of key == T (one flat pass of atomic adds over the candidates) and one scan of
   those counts, then of one tile, locate the index J.
4. If the bounds missed (k outside ``(count > Thi, count >= Tlo]``) or a region of the
   candidate buffer overflowed (many keys tied inside the band), the pair is redone by the
   radix path.

Radix path: the same digit passes, tile counts and scan, over the full data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from triton_kernels import _config
from triton_kernels._common import abs_key, job_and_tile, load_f32, load_offset
from triton_kernels._host import (
    MAX_NUMEL,
    Tables,
    all_aligned,
    cdiv,
    launch_groups,
    launch_options,
    rel_offset,
    upload_launch,
)

KEY_NONE = 0xFFFFFFFF
KEY_MAX = 0x7FFFFFFF
# selection ("segment") row: n, base_off, x_off, k, sample pos lo, sample pos hi,
# candidate offset, region capacity, first tile, tiles, regions, first counter slot
_SEG = 12
_RES = 8  # T, rank in T, need cut, ok, J, count of T, count above T, (spare)
_HIST = 4 * 256
_SLOT = 16  # int64 counters per region: one per 128-byte line
_REGIONS_CAP = 64  # power of two >= _config.SELECT_REGIONS_MAX

# How often each path ran in this process (read by tests and benchmarks); "misses" keeps
# the counts of the last few selections whose sampled bounds missed (for diagnosis).
STATS: dict = {"sampled": 0, "fallback": 0, "radix": 0, "misses": []}


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _sample_kernel(in_ref, rows, out, COMPOSITE: tl.constexpr, BLOCK: tl.constexpr):
    """Stratified sample: position p of S takes index floor((p*n + h(p) mod n) / S).

    COMPOSITE: store ``(row << 32) | key`` (int64, rows of any size, one flat sort);
    otherwise store the int32 key, rows padded with -1 to a common length (a sort per row).
    """
    r = tl.program_id(0).to(tl.int64)
    row = rows + r * 6
    n = tl.load(row)
    b_ptr = in_ref + tl.load(row + 1)
    x_ptr = in_ref + tl.load(row + 2)
    size = tl.load(row + 3)
    first = tl.load(row + 4)
    pad = tl.load(row + 5)  # padding slots before the row's samples (per-row layout)
    q = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    p = q - pad
    valid = (p >= 0) & (p < size)
    h = ((p + 1) * 0x61C88647 + r * 0x1B873593) & 0x7FFFFFFF
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & 0x7FFFFFFF
    h = h ^ (h >> 13)
    idx = tl.where(valid, (p * n + h % n) // size, 0)
    d = load_f32(x_ptr, idx, valid, True) - load_f32(b_ptr, idx, valid, True)
    key = abs_key(d)
    if COMPOSITE:
        tl.store(out + first + p, (r << 32) | key.to(tl.int64), mask=valid)
    else:
        tl.store(out + first - pad + q, tl.where(valid, key, -1), mask=q < pad + size)


@triton.jit
def _bound(sorted_keys, pos, default):
    """Key at ascending sample position ``pos`` (its low 32 bits), or ``default`` if pos < 0."""
    v = tl.load(sorted_keys + tl.maximum(pos, 0)).to(tl.int64)
    return tl.where(pos >= 0, v - ((v >> 32) << 32), default)


@triton.jit
def _scan_tile(in_ref, b_ptr, rows, segs, sorted_keys, cnt64, cand_key, cand_idx, tiletab,
               r0, rc, offs, tile, n, MASKED: tl.constexpr, ALIGNED: tl.constexpr,
               BLOCK: tl.constexpr):
    valid = offs < n
    b = load_f32(b_ptr, offs, valid, MASKED)
    lane0 = tl.arange(0, BLOCK) == 0
    for r in range(r0, r0 + rc):
        row = rows + r * 3
        x_ptr = in_ref + load_offset(row, ALIGNED)
        s0 = tl.load(row + 1)
        sc = tl.load(row + 2)
        key = abs_key(load_f32(x_ptr, offs, valid, MASKED) - b)
        for s in range(s0, s0 + sc):
            seg = segs + s * 12
            lo = _bound(sorted_keys, tl.load(seg + 4), 0).to(tl.int32)
            hi = _bound(sorted_keys, tl.load(seg + 5), 0x7FFFFFFF).to(tl.int32)
            above = valid & (key > hi)
            band = valid & (key >= lo) & (key <= hi)
            band32 = band.to(tl.int32)
            count = tl.sum(band32, 0)
            packed = (tl.sum(above.to(tl.int32), 0).to(tl.int64) << 32) + count.to(tl.int64)
            rcap = tl.load(seg + 7)
            region = tile % tl.load(seg + 10)
            begin = count * 0
            if packed != 0:
                # one active lane claims the space; its old value reaches every thread through
                # a reduction (not through the broadcast of a scalar atomic's result)
                slot = cnt64 + tl.load(seg + 11) + region * 16
                old = tl.atomic_add(slot + tl.zeros([BLOCK], dtype=tl.int64),
                                    tl.where(lane0, packed, 0), mask=lane0, sem="relaxed")
                old = tl.sum(tl.where(lane0, old, 0), 0)
                begin = (old - ((old >> 32) << 32)).to(tl.int32)
            local = begin + tl.cumsum(band32, 0) - 1
            store = band & (local < rcap)
            pos = tl.load(seg + 6) + region * rcap + local
            tl.store(cand_key + pos, key, mask=store)
            tl.store(cand_idx + pos, offs.to(tl.int32), mask=store)
            tt = (tl.load(seg + 8) + tile) * 2
            tl.store(tiletab + tt, (region * rcap + begin).to(tl.int32))
            tl.store(tiletab + tt + 1, count)
            tl.debug_barrier()


@triton.jit
def _scan_kernel(in_ref, groups, rows, segs, prog_job, prog_tile, sorted_keys, cnt64, cand_key,
                 cand_idx, tiletab,
                 MULTI: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Count keys above Thi and compact the band's candidates, one tile per program."""
    g, tile = job_and_tile(prog_job, prog_tile, MULTI)
    grp = groups + g * 4
    n = tl.load(grp)
    b_ptr = in_ref + load_offset(grp + 1, ALIGNED)
    r0 = tl.load(grp + 2)
    rc = tl.load(grp + 3)
    start = tile * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _scan_tile(in_ref, b_ptr, rows, segs, sorted_keys, cnt64, cand_key, cand_idx, tiletab,
                   r0, rc, offs, tile, n, False, ALIGNED, BLOCK)
    else:
        _scan_tile(in_ref, b_ptr, rows, segs, sorted_keys, cnt64, cand_key, cand_idx, tiletab,
                   r0, rc, offs, tile, n, True, ALIGNED, BLOCK)


@triton.jit
def _pick(hist, r):
    """Bin b holding the r-th largest (1-based) of a 256-bin histogram.

    Returns (b, rank of the target inside bin b, count in bins above b, count in bin b).
    """
    bins = tl.arange(0, 256)
    h = tl.load(hist + bins).to(tl.int64)
    above = tl.sum(h, 0) - tl.cumsum(h, 0)
    sel = (above < r) & (r <= above + h)
    b = tl.max(tl.where(sel, bins, -1), 0)
    n_above = tl.sum(tl.where(sel, above, 0), 0)
    n_in = tl.sum(tl.where(sel, h, 0), 0)
    return b, r - n_above, n_above, n_in


@triton.jit
def _seg_counts(seg, cnt64, FROM_CAND: tl.constexpr):
    """(rank of the target among the candidates, candidates, above count, no region full)."""
    n = tl.load(seg)
    k = tl.load(seg + 3)
    if FROM_CAND:
        regions = tl.arange(0, 64)
        packed = tl.load(cnt64 + tl.load(seg + 11) + regions * 16,
                         mask=regions < tl.load(seg + 10), other=0)
        above = packed >> 32
        band = packed - (above << 32)
        gt = tl.sum(above, 0)
        m = tl.sum(band, 0)
        fits = tl.max(band, 0) <= tl.load(seg + 7)
    else:
        gt = k * 0
        m = n
        fits = k >= 0
    return k - gt, m, gt, fits


@triton.jit
def _cand_keys(cand_key, cnt64, seg, offs):
    """Candidate keys at flat positions ``offs`` of the region space, and their validity."""
    rcap = tl.load(seg + 7)
    region = offs // rcap
    inside = region < tl.load(seg + 10)
    packed = tl.load(cnt64 + tl.load(seg + 11) + region * 16, mask=inside, other=0)
    used = tl.minimum(packed - ((packed >> 32) << 32), rcap)
    valid = inside & (offs - region * rcap < used)
    key = tl.load(cand_key + tl.load(seg + 6) + offs, mask=valid, other=0)
    return key, valid


@triton.jit
def _tile_keys(in_ref, seg, cand_key, tiletab, t, FROM_CAND: tl.constexpr, BLOCK: tl.constexpr):
    """Keys of tile t (in index order) and their validity: candidates or full data."""
    lanes = tl.arange(0, BLOCK)
    if FROM_CAND:
        tt = (tl.load(seg + 8) + t) * 2
        begin = tl.load(tiletab + tt)
        valid = lanes < tl.load(tiletab + tt + 1)
        key = tl.load(cand_key + tl.load(seg + 6) + begin + lanes, mask=valid, other=0)
    else:
        offs = t * BLOCK + lanes
        valid = offs < tl.load(seg)
        d = (load_f32(in_ref + tl.load(seg + 2), offs, valid, True)
             - load_f32(in_ref + tl.load(seg + 1), offs, valid, True))
        key = abs_key(d)
    return key, valid


@triton.jit
def _digit_kernel(in_ref, segs, cnt64, hist, cand_key, nprog,
                  P: tl.constexpr, FROM_CAND: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of key byte P (bits 31-8P..24-8P) over keys matching the picked prefix."""
    pid = tl.program_id(0)
    s = (pid // nprog).to(tl.int64)
    q = (pid % nprog).to(tl.int64)
    seg = segs + s * 12
    r, _m, _gt, _fits = _seg_counts(seg, cnt64, FROM_CAND)
    hs = hist + s * 1024
    prefix = 0
    for i in tl.static_range(P):
        b, r, _above, _count = _pick(hs + i * 256, r)
        prefix = prefix * 256 + b
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([256], dtype=tl.int32)
    if FROM_CAND:
        space = tl.load(seg + 7) * tl.load(seg + 10)
    else:
        space = tl.load(seg)
    for t in range(q, tl.cdiv(space, BLOCK), nprog):
        offs = t * BLOCK + lanes
        if FROM_CAND:
            key, valid = _cand_keys(cand_key, cnt64, seg, offs)
        else:
            valid = offs < space
            d = (load_f32(in_ref + tl.load(seg + 2), offs, valid, True)
                 - load_f32(in_ref + tl.load(seg + 1), offs, valid, True))
            key = abs_key(d)
        if P > 0:
            match = valid & ((key >> (32 - 8 * P)) == prefix)
        else:
            match = valid
        digit = tl.where(match, (key >> (24 - 8 * P)) & 255, 0)
        h = tl.histogram(digit, 256)
        missing = BLOCK - tl.sum(match.to(tl.int32), 0)
        acc += h - tl.where(tl.arange(0, 256) == 0, missing, 0)
    tl.atomic_add(hs + P * 256 + tl.arange(0, 256), acc, sem="relaxed")


@triton.jit
def _pick_kernel(segs, cnt64, hist, res, FROM_CAND: tl.constexpr):
    """T, the rank among keys == T, and whether the bounds held (one program per selection)."""
    s = tl.program_id(0).to(tl.int64)
    seg = segs + s * 12
    n = tl.load(seg)
    r, m, gt, fits = _seg_counts(seg, cnt64, FROM_CAND)
    ok = (r >= 1) & (r <= m) & fits
    hs = hist + s * 1024
    prefix = 0
    n_in = m * 0
    for i in tl.static_range(4):
        b, r, n_above, n_in = _pick(hs + i * 256, r)
        prefix = prefix * 256 + b
        gt += n_above
    ok = ok & (r >= 1) & (r <= n_in)
    out = res + s * 8
    tl.store(out, prefix.to(tl.int64))
    tl.store(out + 1, r)
    tl.store(out + 2, (ok & (r < n_in)).to(tl.int64))
    tl.store(out + 3, ok.to(tl.int64))
    tl.store(out + 4, n)
    tl.store(out + 5, n_in)
    tl.store(out + 6, gt)


@triton.jit
def _tcount_kernel(in_ref, segs, res, cnt64, tcnt, cand_key, cand_idx, nprog,
                   FROM_CAND: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr):
    """Per tile of TILE entries: how many keys equal T (only where the cutoff splits T).

    Candidates: one flat pass, each key == T adds 1 to its tile's count (``tcnt`` zeroed).
    Full data: each tile is counted directly.
    """
    pid = tl.program_id(0)
    s = (pid // nprog).to(tl.int64)
    q = (pid % nprog).to(tl.int64)
    seg = segs + s * 12
    if tl.load(res + s * 8 + 2) != 0:
        thr = tl.load(res + s * 8).to(tl.int32)
        first = tl.load(seg + 8)
        lanes = tl.arange(0, BLOCK)
        if FROM_CAND:
            space = tl.load(seg + 7) * tl.load(seg + 10)
            cbase = tl.load(seg + 6)
            for t in range(q, tl.cdiv(space, BLOCK), nprog):
                offs = t * BLOCK + lanes
                key, valid = _cand_keys(cand_key, cnt64, seg, offs)
                eq = valid & (key == thr)
                idx = tl.load(cand_idx + cbase + offs, mask=eq, other=0)
                tl.atomic_add(tcnt + first + idx // TILE, eq.to(tl.int32), mask=eq,
                              sem="relaxed")
        else:
            for t in range(q, tl.load(seg + 9), nprog):
                key, valid = _tile_keys(in_ref, seg, cand_key, tcnt, t, False, TILE)
                tl.store(tcnt + first + t, tl.sum((valid & (key == thr)).to(tl.int32), 0))


@triton.jit
def _resolve_kernel(in_ref, segs, res, tiletab, tcnt, cand_key, cand_idx,
                    FROM_CAND: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    """Index of the r-th entry with key T (index order): tile by prefix counts, then lane."""
    s = tl.program_id(0).to(tl.int64)
    seg = segs + s * 12
    out = res + s * 8
    if tl.load(out + 2) != 0:
        thr = tl.load(out).to(tl.int32)
        r = tl.load(out + 1)
        first = tl.load(seg + 8)
        ntiles = tl.load(seg + 9)
        run = r * 0
        hit_tile = r * 0 - 1
        before = r * 0
        for t0 in range(0, ntiles, RBLOCK):
            tt = t0 + tl.arange(0, RBLOCK)
            c = tl.load(tcnt + first + tt, mask=tt < ntiles, other=0).to(tl.int64)
            incl = run + tl.cumsum(c, 0)
            hit = (tt < ntiles) & (incl >= r) & (incl - c < r)
            found = tl.max(tl.where(hit, tt, -1), 0)
            before = tl.where(found >= 0, tl.sum(tl.where(hit, incl - c, 0), 0), before)
            hit_tile = tl.maximum(hit_tile, found)
            run += tl.sum(c, 0)
        t = tl.maximum(hit_tile, 0)
        key, valid = _tile_keys(in_ref, seg, cand_key, tiletab, t, FROM_CAND, BLOCK)
        eq = valid & (key == thr)
        lane_hit = eq & (tl.cumsum(eq.to(tl.int32), 0) == (r - before))
        lanes = tl.arange(0, BLOCK)
        if FROM_CAND:
            begin = tl.load(tiletab + (first + t) * 2)
            idx = tl.load(cand_idx + tl.load(seg + 6) + begin + lanes, mask=valid, other=0)
            j = tl.max(tl.where(lane_hit, idx.to(tl.int64), -1), 0)
        else:
            j = tl.max(tl.where(lane_hit, t * BLOCK + lanes, -1), 0)
        tl.store(out + 4, j + 1)
        tl.store(out + 3, ((hit_tile >= 0) & (j >= 0)).to(tl.int64))


# ----------------------------------------------------------------------------- host side


def _sample_size(n: int) -> int:
    return max(1, min(_config.SAMPLE_MAX, n // _config.SAMPLE_MIN_RATIO))


def _bounds(n: int, k: int, size: int, first: int) -> tuple[int, int, int]:
    """Ascending sample positions of Tlo and Thi (-1: unbounded) and the expected band size."""
    p = k / n
    mid = k * size / n - 1.0  # descending sample rank of the k-th key
    margin = _config.SAMPLE_Z * math.sqrt(size * p * (1.0 - p)) + _config.SAMPLE_SLACK
    desc_hi = min(math.floor(mid - margin), size - 1)
    desc_lo = max(math.ceil(mid + margin), 0)
    pos_hi = first + size - 1 - desc_hi if desc_hi >= 0 else -1
    pos_lo = first + size - 1 - desc_lo if desc_lo <= size - 1 else -1
    span = min(desc_lo, size - 1) - max(desc_hi, 0) + 1
    return pos_lo, pos_hi, int(n * span / size)


def _capacity(n: int, expect: int, share: int, ntiles: int) -> tuple[int, int]:
    """(regions, entries per region) of one selection's candidate buffer.

    The band holds about ``expect`` keys, more when many keys tie inside it, so the buffer
    gets the larger of a multiple of the estimate (+ n / CAP_TIE_DIV) and its share of the
    memory budget, at most n. A region never needs more than its tiles' entries. The scan
    kernel stores candidate offsets (region * rcap + position) as int32, so regions * rcap
    stays below 2**31 (near MAX_NUMEL a smaller buffer only means the exact fallback runs).
    """
    regions = max(1, min(_config.SELECT_REGIONS_MAX, ntiles // _config.SELECT_TILES_PER_REGION))
    cap = int(_config.CAP_FACTOR * expect) + n // _config.CAP_TIE_DIV + _config.CAP_MIN
    cap = min(n, max(cap, share))
    block = _config.SELECT_BLOCK
    rcap = min(cdiv(ntiles, regions) * block, cdiv(cap, regions) + block, MAX_NUMEL // regions)
    return regions, rcap


class _Run:
    """Buffers and launches of one selection batch (one device and input dtype)."""

    def __init__(self, device: torch.device, segs: list[list[int]], from_cand: bool,
                 ref: torch.Tensor, aligned: bool) -> None:
        self.device = device
        self.nseg = len(segs)
        self.from_cand = from_cand
        self.ref = ref
        self.aligned = aligned
        ntiles = sum(s[9] for s in segs)
        slots = sum(s[10] for s in segs) * _SLOT
        hist_end = 2 * slots + _HIST * self.nseg
        zeros = torch.zeros(hist_end + max(ntiles, 1), dtype=torch.int32, device=device)
        self.cnt64 = zeros[: 2 * slots].view(torch.int64)
        self.hist = zeros[2 * slots : hist_end]
        self.tcnt = zeros[hist_end:]
        self.tiletab = torch.empty(max(2 * ntiles, 2), dtype=torch.int32, device=device)
        self.res = torch.empty(self.nseg * _RES, dtype=torch.int64, device=device)
        ncap = sum(s[7] * s[10] for s in segs) if from_cand else 0
        self.cand_key = torch.empty(max(ncap, 1), dtype=torch.int32, device=device)
        self.cand_idx = torch.empty(max(ncap, 1), dtype=torch.int32, device=device)
        if from_cand:
            most = max(s[7] * s[10] for s in segs)
            per = max(1, _config.DIGIT_PROGRAMS_MAX // self.nseg)
            self.nprog_digit = max(1, min(per, cdiv(most, _config.DIGIT_BLOCK)))
            self.nprog_count = self.nprog_digit
        else:
            per = max(1, _config.RADIX_PROGRAMS_MAX // self.nseg)
            self.nprog_digit = max(1, min(per, cdiv(max(s[0] for s in segs),
                                                    _config.DIGIT_BLOCK)))
            self.nprog_count = max(1, min(per, max(s[9] for s in segs)))

    def finish(self, segs_t: torch.Tensor) -> list[tuple[int, int, bool]]:
        """Digit passes, pick, tile counts, resolve; returns (T, J, ok) per selection."""
        fc = self.from_cand
        for p in range(4):
            _digit_kernel[(self.nseg * self.nprog_digit,)](
                self.ref, segs_t, self.cnt64, self.hist, self.cand_key, self.nprog_digit,
                P=p, FROM_CAND=fc, BLOCK=_config.DIGIT_BLOCK, **launch_options(_config.DIGIT_WARPS),
            )
        _pick_kernel[(self.nseg,)](segs_t, self.cnt64, self.hist, self.res, FROM_CAND=fc,
                                   **launch_options(1))
        _tcount_kernel[(self.nseg * self.nprog_count,)](
            self.ref, segs_t, self.res, self.cnt64, self.tcnt, self.cand_key, self.cand_idx,
            self.nprog_count, FROM_CAND=fc, BLOCK=_config.DIGIT_BLOCK,
            TILE=_config.SELECT_BLOCK, **launch_options(_config.DIGIT_WARPS),
        )
        _resolve_kernel[(self.nseg,)](
            self.ref, segs_t, self.res, self.tiletab, self.tcnt, self.cand_key, self.cand_idx,
            FROM_CAND=fc, BLOCK=_config.SELECT_BLOCK, RBLOCK=_config.RESOLVE_BLOCK,
            **launch_options(_config.SELECT_WARPS),
        )
        res = self.res.view(self.nseg, _RES).cpu().tolist()
        return [(int(r[0]), int(r[4]), bool(r[3])) for r in res]


def _run_radix(pairs, want) -> list[tuple[int, int, bool]]:
    """Full-data radix selection for ``want`` = [(pair index, k)] on one device and dtype."""
    ref = pairs[want[0][0]][0]
    block = _config.SELECT_BLOCK
    segs, offsets, first = [], [], 0
    for i, k in want:
        base, x = pairs[i]
        n = base.numel()
        ob = rel_offset(base, ref, f"select pair {i} (base)")
        ox = rel_offset(x, ref, f"select pair {i} (x)")
        nt = cdiv(n, block)
        segs.append([n, ob, ox, k, -1, -1, 0, n, first, nt, 1, 0])
        offsets += [ob, ox]
        first += nt
    tables = Tables()
    tables.add(segs)
    (segs_t,) = tables.upload(ref.device)
    run = _Run(ref.device, segs, False, ref, all_aligned([ref], offsets))
    return run.finish(segs_t)


def _run_sampled(pairs, want) -> list[tuple[int, int, bool]]:
    """Sampled bounds + candidate compaction for ``want`` = [(pair index, k)]."""
    ref = pairs[want[0][0]][0]
    device = ref.device
    block = _config.SELECT_BLOCK
    # rows: distinct pairs; groups: rows sharing one base tensor (read once per tile)
    row_pairs: list[int] = list(dict.fromkeys(i for i, _ in want))
    base_key: dict = {}
    for i in row_pairs:
        b = pairs[i][0]
        base_key.setdefault((b.data_ptr(), b.numel()), []).append(i)
    group_rows = list(base_key.values())
    order = [i for rows in group_rows for i in rows]  # rows renumbered group by group
    row_index = {i: r for r, i in enumerate(order)}

    # samples: one int32 sort per row when all rows take the same sample size (the models of
    # one tensor), else one flat sort of (row << 32 | key)
    sizes = {i: _sample_size(pairs[i][0].numel()) for i in order}
    composite = len(set(sizes.values())) > 1
    sample_rows, layout, sfirst, offsets = [], {}, 0, []
    for r, i in enumerate(order):
        base, x = pairs[i]
        ob = rel_offset(base, ref, f"select pair {i} (base)")
        ox = rel_offset(x, ref, f"select pair {i} (x)")
        size = sizes[i]
        sample_rows.append([base.numel(), ob, ox, size, sfirst, 0])
        layout[i] = (size, sfirst, ob, ox)
        offsets += [ob, ox]
        sfirst += size

    total_n = sum(pairs[i][0].numel() for i, _ in want)
    segs_by_row: dict[int, list[int]] = {i: [] for i in order}
    for w, (i, _) in enumerate(want):
        segs_by_row[i].append(w)
    seg_rows, seg_order, row_rows = [], [], []
    cand_first = tile_first = slot_first = 0
    for i in order:
        n = pairs[i][0].numel()
        size, sf, ob, ox = layout[i]
        row_rows.append([ox, len(seg_rows), len(segs_by_row[i])])
        for w in segs_by_row[i]:
            k = want[w][1]
            pos_lo, pos_hi, expect = _bounds(n, k, size, sf)
            nt = cdiv(n, block)
            share = _config.CAND_BUDGET * n // max(total_n, 1)
            regions, rcap = _capacity(n, expect, share, nt)
            seg_rows.append([n, ob, ox, k, pos_lo, pos_hi, cand_first, rcap, tile_first, nt,
                             regions, slot_first])
            seg_order.append(w)
            cand_first += rcap * regions
            tile_first += nt
            slot_first += regions * _SLOT
    group_table, ntiles = [], []
    for rows in group_rows:
        n = pairs[rows[0]][0].numel()
        group_table.append([n, layout[rows[0]][2], row_index[rows[0]], len(rows)])
        ntiles.append(cdiv(n, block))
    (sample_t, group_t, row_t, segs_t), pj_t, pt_t, multi = upload_launch(
        [sample_rows, group_table, row_rows, seg_rows], ntiles, device)

    most = max(s[3] for s in sample_rows)
    grid = (len(order), cdiv(most, _config.SAMPLE_BLOCK))
    if composite:
        samples = torch.empty(sfirst, dtype=torch.int64, device=device)
        _sample_kernel[grid](ref, sample_t, samples, COMPOSITE=True,
                             BLOCK=_config.SAMPLE_BLOCK, **launch_options(4))
        sorted_keys = torch.sort(samples).values  # the sample (<= n/16 keys), not the tensor
    else:
        samples = torch.empty((len(order), most), dtype=torch.int32, device=device)
        _sample_kernel[grid](ref, sample_t, samples, COMPOSITE=False,
                             BLOCK=_config.SAMPLE_BLOCK, **launch_options(4))
        sorted_keys = torch.sort(samples, dim=1).values.reshape(-1)
    aligned = all_aligned([ref], offsets)
    run = _Run(device, seg_rows, True, ref, aligned)
    _scan_kernel[(sum(ntiles),)](
        ref, group_t, row_t, segs_t, pj_t, pt_t, sorted_keys, run.cnt64, run.cand_key,
        run.cand_idx, run.tiletab,
        MULTI=multi, ALIGNED=aligned, BLOCK=block, **launch_options(_config.SELECT_WARPS),
    )
    found = run.finish(segs_t)
    if not all(f[2] for f in found):
        counts = run.cnt64.cpu().tolist()
        res = run.res.view(-1, _RES).cpu().tolist()
        for s, f in enumerate(found):
            if not f[2]:
                row = seg_rows[s]
                packed = counts[row[11] : row[11] + row[10] * _SLOT : _SLOT]
                miss = {"n": row[0], "k": row[3], "above": sum(v >> 32 for v in packed),
                        "band": [v & 0xFFFFFFFF for v in packed][:4], "regions": row[10],
                        "region_cap": row[7], "pos": row[4:6], "result": res[s][:7]}
                STATS["misses"] = STATS["misses"][-7:] + [miss]
    results: list[tuple[int, int, bool]] = [(0, 0, False)] * len(want)
    for w, r in zip(seg_order, found):
        results[w] = r
    return results


def select_top_many(
    jobs: Sequence[tuple[torch.Tensor, torch.Tensor, Sequence[int]]],
) -> list[list[tuple[int, int]]]:
    """For each job ``(base, x, ks)`` (flat tensors of one length n, one dtype), the canonical
    ``(T, J)`` of the top-k set of ``bits(|fl32(x) - fl32(base)|)`` for every k in ks."""
    out: list[list[tuple[int, int]]] = [[(KEY_NONE, 0)] * len(job[2]) for job in jobs]
    want: list[tuple[int, int, int]] = []  # (job, slot, k)
    for j, (base, _x, ks) in enumerate(jobs):
        n = base.numel()
        if n > MAX_NUMEL:
            raise ValueError(f"select job {j}: {n} elements; the Triton selection handles at "
                             f"most {MAX_NUMEL} per tensor")
        for q, k in enumerate(ks):
            if k >= n:
                out[j][q] = (0, n)
            elif k > 0:
                want.append((j, q, int(k)))
    pairs = [(job[0], job[1]) for job in jobs]
    for _key, idx in launch_groups(want, lambda w: (jobs[w[0]][0].device, jobs[w[0]][0].dtype)):
        batch = [(want[w][0], want[w][2]) for w in idx]
        if _config.SELECT_STRATEGY == "radix":
            found = _run_radix(pairs, batch)
            STATS["radix"] += len(batch)
        else:
            found = _run_sampled(pairs, batch)
            missed = [m for m, f in enumerate(found) if not f[2]]
            STATS["sampled"] += len(batch) - len(missed)
            STATS["fallback"] += len(missed)
            if missed:
                redo = _run_radix(pairs, [batch[m] for m in missed])
                for m, f in zip(missed, redo):
                    found[m] = f
        for w, (t, cut, ok) in zip(idx, found):
            if not ok:
                raise RuntimeError(f"select job {want[w][0]}: radix selection failed for "
                                   f"k={want[w][2]} (internal error)")
            out[want[w][0]][want[w][1]] = (t, cut)
    return out
