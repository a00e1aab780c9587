"""The fused combine: linear, task arithmetic, TIES, DARE and breadcrumbs in one pass.

Per element j and model i (fp32 throughout): ``d_i = fl32(x_i) - fl32(base)`` (or
``fl32(x_i)`` without a base), ``wd_i = coef_i * d_i`` where model i's mask keeps j, else 0.

- mode "sum": ``out = base + sum_i wd_i``.
- mode "elect" (TIES sign election): ``S = sum_i wd_i`` accumulated in fp64 (each fp32 term
  widened, model order), so the elected sign is bit-identical on every backend; model i agrees where
  ``wd_i > 0 and S >= 0`` or ``wd_i < 0 and S < 0``; ``num = sum_i agree_i wd_i``,
  ``den = sum_i agree_i weight_i``; ``merged = num / den`` (correctly rounded) where
  ``normalize`` and ``den != 0``, else ``num``; ``out = base + lam * merged``.

All sums run in model order. ``num`` and ``den`` come from one loop over the models: the
positive and the negative contributions are summed separately and the elected sign picks
one, which adds exactly the same terms in the same order as a second loop would.
One rounding to the output dtype on store. One launch per group of jobs sharing dtypes, base presence, mode, model count and
whether any mask is random (each such group is one compiled variant, models unrolled).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from triton_kernels import _config
from triton_kernels._common import (
    abs_key,
    f32_from_bits,
    job_and_tile,
    load_f32,
    load_offset,
    store_rounded,
)
from triton_kernels._host import (
    all_aligned,
    cdiv,
    f32_bits,
    launch_groups,
    launch_options,
    rel_offset,
    upload_launch,
)
from triton_kernels.dare import MASK_FIELDS, keep_block, launch_flags, mask_row

MODES = {"sum": 0, "elect": 1}
_JOB = 8  # n, out_off, base_off, first model, model count, mode, normalize, lam bits
_MODEL = 3 + MASK_FIELDS  # x_off, coef bits, weight bits, mask row


class Combine(NamedTuple):
    """One combine job on flat tensors; masks are ``dare.mask_row`` tuples."""

    out: torch.Tensor
    base: torch.Tensor | None
    xs: Sequence[torch.Tensor]
    masks: Sequence[tuple]
    coefs: Sequence[float]
    weights: Sequence[float]
    mode: str
    normalize: bool
    lam: float


@triton.jit
def _combine_tile(o_ptr, b_ptr, x_ref, models, m0, normalize, lam, offs, start, n,
                  HAS_BASE: tl.constexpr, ELECT: tl.constexpr, TOPS: tl.constexpr,
                  RANDOM: tl.constexpr, NM: tl.constexpr, MASKED: tl.constexpr,
                  ALIGNED: tl.constexpr, BLOCK: tl.constexpr, MROW: tl.constexpr):
    valid = offs < n
    if HAS_BASE:
        b = load_f32(b_ptr, offs, valid, MASKED)
    if not ELECT:
        total = tl.zeros([BLOCK], dtype=tl.float32)
    else:
        s64 = tl.zeros([BLOCK], dtype=tl.float64)
        pos_sum = tl.zeros([BLOCK], dtype=tl.float32)
        neg_sum = tl.zeros([BLOCK], dtype=tl.float32)
        pos_w = tl.zeros([BLOCK], dtype=tl.float32)
        neg_w = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(NM):
        mrow = models + (m0 + i) * MROW
        x = load_f32(x_ref + load_offset(mrow, ALIGNED), offs, valid, MASKED)
        coef = f32_from_bits(tl.load(mrow + 1))
        if HAS_BASE:
            d = x - b
        else:
            d = x
        keep = keep_block(mrow + 3, abs_key(d), offs, start, BLOCK, TOPS, RANDOM)
        wd = tl.where(keep, coef * d, 0.0)
        if ELECT:
            s64 += wd.to(tl.float64)
            weight = f32_from_bits(tl.load(mrow + 2))
            pos_sum += tl.where(wd > 0, wd, 0.0)
            neg_sum += tl.where(wd < 0, wd, 0.0)
            pos_w += tl.where(wd > 0, weight, 0.0)
            neg_w += tl.where(wd < 0, weight, 0.0)
        else:
            total += wd
    if ELECT:
        up = s64 >= 0
        num = tl.where(up, pos_sum, neg_sum)
        den = tl.where(up, pos_w, neg_w)
        use_den = (den != 0) & (normalize != 0)
        merged = tl.where(use_den, tl.math.div_rn(num, tl.where(use_den, den, 1.0)), num)
        res = lam * merged
    else:
        res = total
    if HAS_BASE:
        res = b + res
    store_rounded(o_ptr, offs, res, valid, MASKED)


@triton.jit
def _combine_kernel(in_ref, out_ref, jobs, models, prog_job, prog_tile,
                    HAS_BASE: tl.constexpr, ELECT: tl.constexpr, TOPS: tl.constexpr,
                    RANDOM: tl.constexpr, NM: tl.constexpr, MULTI: tl.constexpr,
                    ALIGNED: tl.constexpr, BLOCK: tl.constexpr, MROW: tl.constexpr):
    job, tile = job_and_tile(prog_job, prog_tile, MULTI)
    row = jobs + job * 8
    n = tl.load(row)
    o_ptr = out_ref + load_offset(row + 1, ALIGNED)
    b_ptr = in_ref + load_offset(row + 2, ALIGNED)
    m0 = tl.load(row + 3)
    normalize = tl.load(row + 6)
    lam = f32_from_bits(tl.load(row + 7))
    start = tile * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _combine_tile(o_ptr, b_ptr, in_ref, models, m0, normalize, lam, offs, start, n,
                      HAS_BASE, ELECT, TOPS, RANDOM, NM, False, ALIGNED, BLOCK, MROW)
    else:
        _combine_tile(o_ptr, b_ptr, in_ref, models, m0, normalize, lam, offs, start, n,
                      HAS_BASE, ELECT, TOPS, RANDOM, NM, True, ALIGNED, BLOCK, MROW)


def combine_many(jobs: Sequence[Combine]) -> None:
    """Run every combine job; one launch per group of jobs that share a compiled variant."""
    block = _config.COMBINE_BLOCK
    rows = [[mask_row(m, j.out.numel(), f"combine job {i} (model {q})")
             for q, m in enumerate(j.masks)] for i, j in enumerate(jobs)]

    def key(i: int):
        j = jobs[i]
        return (j.out.device, j.xs[0].dtype if j.xs else j.out.dtype, j.out.dtype,
                j.base is not None, j.mode, len(j.xs)) + launch_flags(rows[i])

    for (device, _dt, _odt, has_base, mode, nm, tops, random), idx in launch_groups(
            range(len(jobs)), key, lambda i: jobs[i].out.numel()):
        first = jobs[idx[0]]
        in_ref = first.base if has_base else (first.xs[0] if first.xs else first.out)
        out_ref = first.out
        job_rows, model_rows, offsets = [], [], []
        for i in idx:
            job = jobs[i]
            n = job.out.numel()
            oo = rel_offset(job.out, out_ref, f"combine job {i} (out)")
            ob = rel_offset(job.base, in_ref, f"combine job {i} (base)") if has_base else 0
            job_rows.append([n, oo, ob, len(model_rows), len(job.xs), MODES[job.mode],
                             int(bool(job.normalize)), f32_bits(job.lam)])
            offsets += [oo, ob]
            for m, (x, mrow, coef, weight) in enumerate(
                zip(job.xs, rows[i], job.coefs, job.weights)
            ):
                ox = rel_offset(x, in_ref, f"combine job {i} (model {m})")
                model_rows.append([ox, f32_bits(coef), f32_bits(weight)] + mrow)
                offsets.append(ox)
        ntiles = [cdiv(r[0], block) for r in job_rows]
        (jobs_t, models_t), pj_t, pt_t, multi = upload_launch(
            [job_rows, model_rows if model_rows else [[0] * _MODEL]], ntiles, device)
        _combine_kernel[(sum(ntiles),)](
            in_ref, out_ref, jobs_t, models_t, pj_t, pt_t,
            HAS_BASE=has_base, ELECT=mode == "elect", TOPS=tops, RANDOM=random, NM=nm,
            MULTI=multi, ALIGNED=all_aligned([in_ref, out_ref], offsets), BLOCK=block,
            MROW=_MODEL, **launch_options(_config.COMBINE_WARPS),
        )
