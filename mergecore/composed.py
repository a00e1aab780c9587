"""The public merge methods composed from a backend's primitives, many jobs at a time.

Every stage runs as one batched primitive call over all jobs (one parallel region on the
CPU, one launch on the GPU), so many small tensors cost one call per stage, not one per
tensor. Stages: (1) top-k selection for TIES/breadcrumbs trimming, (2) L1 sums for the
rescale, (3) the fused combine (or, for slerp, the reduction then the lerp).

The kept sets depend only on exact integer selection results and on the counter-based DARE
stream, so they are identical on every backend (see ``mergecore.backends.spec``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import ModuleType

import torch

from mergecore import rng
from mergecore.backends.spec import (
    CombineJob,
    KeepAll,
    KeepBand,
    KeepRandom,
    KeepTop,
    L1Job,
    Lerp2Job,
    Mask,
    SelectJob,
)
from mergecore.methods import (
    MergeJob,
    band_sizes,
    l1_rescale_factor,
    linear_divisor,
    magnitude_k,
    slerp_coefficients,
    sum_divisor,
)


@dataclass
class NonFiniteCounts:
    """NaN/Inf values a backend counted while computing one job (None: not counted).

    ``output``: values of the stored output. ``deltas``: entries of the deltas
    ``fl32(x_i) - fl32(base)`` (or of ``x_i`` without a base) over all models; a NaN/Inf in
    any input gives a NaN/Inf delta, so 0 proves every input of the job finite."""

    output: int | None = None
    deltas: int | None = None


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _masks(prims: ModuleType, jobs: Sequence[MergeJob]) -> list[list[Mask]]:
    """Stage 1: each (job, model) keep mask; selections batched into one primitive call."""
    masks: list[list[Mask]] = [[KeepAll() for _ in job.xs] for job in jobs]
    selects: list[SelectJob] = []
    where: list[tuple[int, int, str]] = []
    for j, job in enumerate(jobs):
        kind = job.traits.sparsify
        n = job.numel
        for i, x in enumerate(job.xs):
            if kind == "magnitude":
                k = magnitude_k(job.densities[i], n, job.name, i)
                if k is not None:
                    selects.append(SelectJob(_flat(job.base), _flat(x), [k]))
                    where.append((j, i, kind))
            elif kind == "band":
                sizes = band_sizes(job.densities[i], job.gammas[i], n, job.name, i)
                if sizes is not None:
                    selects.append(SelectJob(_flat(job.base), _flat(x), list(sizes)))
                    where.append((j, i, kind))
            elif kind == "random" and job.densities[i] < 1:
                key0, key1 = rng.dare_key(job.seed, job.name, i)
                masks[j][i] = KeepRandom(rng.threshold24(job.densities[i]), key0, key1)
    if selects:
        results = prims.select_top_many(selects)
        for (j, i, kind), tops in zip(where, results):
            masks[j][i] = KeepTop(tops[0]) if kind == "magnitude" else KeepBand(tops[0], tops[1])
    return masks


def _rescales(prims: ModuleType, jobs: Sequence[MergeJob], masks) -> list[list[float]]:
    """Stage 2: per (job, model) rescale factor; L1 sums batched into one primitive call.
    On a backend that caches random masks, each KeepRandom mask summed here gets a keep-bit
    cache (``masks`` is updated), which the L1 pass fills and the combine reads."""
    factors = [[1.0 for _ in job.xs] for job in jobs]
    l1_jobs: list[L1Job] = []
    where: list[tuple[int, int]] = []
    for j, job in enumerate(jobs):
        for i, x in enumerate(job.xs):
            if isinstance(masks[j][i], KeepAll) or job.rescale is None:
                continue
            if job.rescale == "inverse_density":
                p = job.densities[i]
                factors[j][i] = 1.0 / p if p > 0 else 1.0
            else:
                mask = masks[j][i]
                if isinstance(mask, KeepRandom) and getattr(prims, "CACHES_RANDOM_MASKS", False):
                    # the L1 pass stores the keep bits; the combine reads them back
                    bits = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8, device=x.device)
                    mask = masks[j][i] = replace(mask, bits=bits)
                l1_jobs.append(L1Job(_flat(job.base), _flat(x), mask))
                where.append((j, i))
    if l1_jobs:
        for (j, i), (l1_all, l1_kept) in zip(where, prims.masked_l1_many(l1_jobs)):
            factors[j][i] = l1_rescale_factor(l1_all, l1_kept)
    return factors


def _combine_job(job: MergeJob, out: torch.Tensor, masks, factors) -> CombineJob:
    traits = job.traits
    xs = [_flat(x) for x in job.xs]
    if traits.combine == "linear":
        div = linear_divisor(job.weights, job.normalize)
        coefs = [w / div for w in job.weights]
        return CombineJob(out, None, xs, [KeepAll()] * len(xs), coefs, job.weights, "sum",
                          False, 1.0)
    base = _flat(job.base)
    if traits.combine == "sum":
        div = sum_divisor(job.weights, job.normalize)
        coefs = [job.lam * w * r / div for w, r in zip(job.weights, factors)]
        return CombineJob(out, base, xs, masks, coefs, job.weights, "sum", False, 1.0)
    coefs = [w * r for w, r in zip(job.weights, factors)]
    return CombineJob(out, base, xs, masks, coefs, job.weights, "elect", job.normalize, job.lam)


def _float64_sums(a: torch.Tensor, b: torch.Tensor,
                  chunk: int = 1 << 22) -> tuple[float, float, float]:
    """``(a.a, b.b, a.b)`` accumulated in float64, a chunk at a time: the slerp reduction
    again when the kernels' fp32 partial sums overflowed (elements near 1e19 and above) or
    an input holds NaN/Inf (then the sums are not finite either, and the coefficients NaN)."""
    a, b = _flat(a), _flat(b)
    aa = bb = ab = 0.0
    for start in range(0, a.numel(), chunk):
        x = a[start:start + chunk].double()
        y = b[start:start + chunk].double()
        aa += float(x @ x)
        bb += float(y @ y)
        ab += float(x @ y)
    return aa, bb, ab


def allocate_outputs(jobs: Sequence[MergeJob]) -> list[torch.Tensor]:
    """Uninitialized output tensors (shape of the inputs, ``job.out_dtype``) for the jobs."""
    outs = []
    for job in jobs:
        ref = job.base if job.base is not None else job.xs[0]
        outs.append(torch.empty(ref.shape, dtype=job.out_dtype, device=ref.device))
    return outs


def merge_jobs(
    prims: ModuleType, jobs: Sequence[MergeJob], outs: Sequence[torch.Tensor] | None = None,
    counts: list[NonFiniteCounts] | None = None,
) -> list[torch.Tensor]:
    """Compute every job's output with the primitives of backend module ``prims``.

    ``outs`` (optional) are preallocated contiguous outputs to write into, e.g. a writer's
    buffer; every element is written. ``counts`` (optional, one per job) receives the NaN/Inf
    counts of the backends whose kernels count them in the same pass (the C++ backend's
    ``lerp2_many`` and ``combine_many`` return them; others return None).
    """
    outs = list(outs) if outs is not None else allocate_outputs(jobs)

    slerps = [(k, job) for k, job in enumerate(jobs) if job.traits.combine == "slerp"]
    passes = [(k, job) for k, job in enumerate(jobs) if job.traits.combine == "passthrough"]
    merges = [(k, job) for k, job in enumerate(jobs)
              if job.traits.combine not in ("slerp", "passthrough")]

    for k, job in passes:
        src = job.xs[0] if job.scale is None else job.xs[0].float() * job.scale
        outs[k].copy_(src)

    if slerps:
        sums = prims.slerp_reduce_many([(_flat(j.base), _flat(j.xs[0])) for _, j in slerps])
        lerps = []
        for (k, job), (aa, bb, ab) in zip(slerps, sums):
            if not all(math.isfinite(v) for v in (aa, bb, ab)):
                aa, bb, ab = _float64_sums(job.base, job.xs[0])
            c0, c1 = slerp_coefficients(aa, bb, ab, job.t)
            lerps.append(Lerp2Job(_flat(outs[k]), _flat(job.base), _flat(job.xs[0]), c0, c1))
        bad = prims.lerp2_many(lerps)
        if counts is not None and bad is not None:
            for (k, _), out_bad in zip(slerps, bad):
                counts[k].output = out_bad

    if merges:
        merge_list = [job for _, job in merges]
        masks = _masks(prims, merge_list)
        factors = _rescales(prims, merge_list, masks)
        combines = [
            _combine_job(job, _flat(outs[k]), masks[m], factors[m])
            for m, (k, job) in enumerate(merges)
        ]
        bad = prims.combine_many(combines)
        if counts is not None and bad is not None:
            for (k, _), (out_bad, delta_bad) in zip(merges, bad):
                counts[k].output, counts[k].deltas = out_bad, delta_bad
    return outs
