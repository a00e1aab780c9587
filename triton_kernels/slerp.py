"""SLERP's two passes: the whole-tensor reduction and the weighted sum (lerp2).

Reduction, per job: ``(sum a*a, sum b*b, sum a*b)`` over the flat tensors, each tile summed in
fp32, the tile partials combined in fp64 on the device. Lerp, per job:
``out = c0*a + c1*b`` in fp32 with c0, c1 rounded to fp32, one rounding to the output dtype.
Both run many jobs in one launch (one program per tile of any job).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from triton_kernels import _config
from triton_kernels._common import f32_from_bits, job_and_tile, load_f32, load_offset, store_rounded
from triton_kernels._host import (
    all_aligned,
    cdiv,
    f32_bits,
    launch_groups,
    launch_options,
    reduce_launch,
    rel_offset,
    upload_launch,
)

_RJ = 3  # reduce job row: n, a_off, b_off
_LJ = 6  # lerp job row: n, out_off, a_off, b_off, c0 bits, c1 bits


@triton.jit
def _reduce_tile(a_ptr, b_ptr, offs, n, MASKED: tl.constexpr):
    valid = offs < n
    a = load_f32(a_ptr, offs, valid, MASKED)
    b = load_f32(b_ptr, offs, valid, MASKED)
    return tl.sum(a * a, 0), tl.sum(b * b, 0), tl.sum(a * b, 0)


@triton.jit
def _reduce_kernel(in_ref, jobs, prog_job, prog_tile, partial,
                   MULTI: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    job, tile = job_and_tile(prog_job, prog_tile, MULTI)
    row = jobs + job * 3
    n = tl.load(row)
    a_ptr = in_ref + load_offset(row + 1, ALIGNED)
    b_ptr = in_ref + load_offset(row + 2, ALIGNED)
    start = tile * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        aa, bb, ab = _reduce_tile(a_ptr, b_ptr, offs, n, False)
    else:
        aa, bb, ab = _reduce_tile(a_ptr, b_ptr, offs, n, True)
    out = partial + tl.program_id(0).to(tl.int64) * 3
    tl.store(out, aa)
    tl.store(out + 1, bb)
    tl.store(out + 2, ab)


@triton.jit
def _lerp_tile(o_ptr, a_ptr, b_ptr, offs, n, c0, c1, MASKED: tl.constexpr):
    valid = offs < n
    a = load_f32(a_ptr, offs, valid, MASKED)
    b = load_f32(b_ptr, offs, valid, MASKED)
    store_rounded(o_ptr, offs, c0 * a + c1 * b, valid, MASKED)


@triton.jit
def _lerp_kernel(in_ref, out_ref, jobs, prog_job, prog_tile,
                 MULTI: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    job, tile = job_and_tile(prog_job, prog_tile, MULTI)
    if not MULTI:
        # one job: walk the tiles backwards, so the first tiles read are the last ones the
        # reduction pass read (still in L2).
        tile = tl.num_programs(0) - 1 - tile
    row = jobs + job * 6
    n = tl.load(row)
    o_ptr = out_ref + load_offset(row + 1, ALIGNED)
    a_ptr = in_ref + load_offset(row + 2, ALIGNED)
    b_ptr = in_ref + load_offset(row + 3, ALIGNED)
    c0 = f32_from_bits(tl.load(row + 4))
    c1 = f32_from_bits(tl.load(row + 5))
    start = tile * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _lerp_tile(o_ptr, a_ptr, b_ptr, offs, n, c0, c1, False)
    else:
        _lerp_tile(o_ptr, a_ptr, b_ptr, offs, n, c0, c1, True)


def reduce_many(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[float, float, float]]:
    """``(sum a*a, sum b*b, sum a*b)`` for each pair of flat, equal-length tensors."""
    results: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)] * len(pairs)
    block = _config.REDUCE_BLOCK
    for _group, idx in launch_groups(pairs, lambda p: (p[0].device, p[0].dtype),
                                     lambda p: p[0].numel()):
        ref = pairs[idx[0]][0]
        rows, offsets = [], []
        for i in idx:
            a, b = pairs[i]
            oa = rel_offset(a, ref, f"slerp_reduce pair {i} (a)")
            ob = rel_offset(b, ref, f"slerp_reduce pair {i} (b)")
            rows.append((a.numel(), oa, ob))
            offsets += [oa, ob]
        sums = reduce_launch(_reduce_kernel, ref, rows, offsets, width=3, block=block,
                             warps=_config.REDUCE_WARPS)
        for i, s in zip(idx, sums):
            results[i] = (s[0], s[1], s[2])
    return results


def lerp_many(jobs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]]) -> None:
    """``out = c0*a + c1*b`` for each job ``(out, a, b, c0, c1)`` of flat tensors."""
    block = _config.LERP_BLOCK
    for (device, _dt, _odt), idx in launch_groups(
            jobs, lambda j: (j[0].device, j[1].dtype, j[0].dtype), lambda j: j[0].numel()):
        in_ref, out_ref = jobs[idx[0]][1], jobs[idx[0]][0]
        rows, offsets = [], []
        for i in idx:
            out, a, b, c0, c1 = jobs[i]
            oo = rel_offset(out, out_ref, f"lerp2 job {i} (out)")
            oa = rel_offset(a, in_ref, f"lerp2 job {i} (a)")
            ob = rel_offset(b, in_ref, f"lerp2 job {i} (b)")
            rows.append((out.numel(), oo, oa, ob, f32_bits(c0), f32_bits(c1)))
            offsets += [oo, oa, ob]
        ntiles = [cdiv(r[0], block) for r in rows]
        (jobs_t,), pj_t, pt_t, multi = upload_launch([rows], ntiles, device)
        _lerp_kernel[(sum(ntiles),)](
            in_ref, out_ref, jobs_t, pj_t, pt_t,
            MULTI=multi, ALIGNED=all_aligned([in_ref, out_ref], offsets), BLOCK=block,
            **launch_options(_config.LERP_WARPS),
        )
