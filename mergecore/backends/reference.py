"""The float64 reference backend: docs/semantics.md implemented literally, one job at a time.

It is the oracle the accelerated backends are tested against and the fallback when neither
is available. Values are computed in float64 and rounded once to the output dtype. Two
discrete decisions are taken from the fp32 quantities every backend computes, so that all
backends make them identically: the TIES/breadcrumbs ranking key ``|fl32(x) - fl32(base)|``
(see ``mergecore.backends.spec``) and the TIES elected sign (the sign of the fp64 sum, in
model order, of the fp32 weighted deltas ``fl32(fl32(w r) * d32)``). Top-k sets come
from a stable sort here (the oracle may sort; the kernels select by histogram).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mergecore import rng
from mergecore.composed import NonFiniteCounts
from mergecore.methods import (
    RESCALE_L1_EPS,
    MergeJob,
    band_sizes,
    linear_divisor,
    magnitude_k,
    slerp_coefficients,
    sum_divisor,
)

NAME = "reference"


def selection_rank(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rank of each entry (0 = largest ``|fl32(x) - fl32(base)|``, ties: lowest index first)."""
    key = (x.reshape(-1).float() - base.reshape(-1).float()).abs().view(torch.int32).long()
    order = torch.sort(key, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank


def keep_mask(job: MergeJob, i: int) -> torch.Tensor | None:
    """Boolean keep mask of model i's delta (flat), or None for keep-all."""
    traits = job.traits
    n = job.numel
    x = job.xs[i]
    if traits.sparsify == "magnitude":
        k = magnitude_k(job.densities[i], n, job.name, i)
        if k is None:
            return None
        return selection_rank(job.base, x) < k
    if traits.sparsify == "band":
        sizes = band_sizes(job.densities[i], job.gammas[i], n, job.name, i)
        if sizes is None:
            return None
        upper, drop = sizes
        rank = selection_rank(job.base, x)
        return (rank < upper) & (rank >= drop)
    if traits.sparsify == "random":
        if job.densities[i] >= 1:
            return None
        key0, key1 = rng.dare_key(job.seed, job.name, i)
        keep = rng.keep_mask(n, rng.threshold24(job.densities[i]), key0, key1)
        return torch.from_numpy(keep).to(x.device)
    return None


def _rescale(job: MergeJob, i: int, d: torch.Tensor, keep: torch.Tensor | None) -> float:
    if keep is None or job.rescale is None:
        return 1.0
    if job.rescale == "inverse_density":
        return 1.0 / job.densities[i] if job.densities[i] > 0 else 1.0
    l1_all = float(d.abs().sum())
    l1_kept = float((d * keep).abs().sum())
    if l1_all < RESCALE_L1_EPS or l1_kept < RESCALE_L1_EPS:
        return 1.0
    return l1_all / l1_kept


def _merge_one(job: MergeJob) -> torch.Tensor:
    shape = (job.base if job.base is not None else job.xs[0]).shape
    traits = job.traits
    f64 = torch.float64
    if traits.combine == "passthrough":
        out = job.xs[0].to(f64, copy=True)  # never the input itself
        if job.scale is not None:
            out = out * job.scale
        return out.to(job.out_dtype)
    if traits.combine == "slerp":
        a = job.base.reshape(-1).to(f64)
        b = job.xs[0].reshape(-1).to(f64)
        s0, s1 = slerp_coefficients(float(a @ a), float(b @ b), float(a @ b), job.t)
        return (s0 * a + s1 * b).reshape(shape).to(job.out_dtype)
    if traits.combine == "linear":
        total = sum(w * x.reshape(-1).to(f64) for w, x in zip(job.weights, job.xs))
        div = linear_divisor(job.weights, job.normalize)
        return (total / div).reshape(shape).to(job.out_dtype)

    base = job.base.reshape(-1).to(f64)
    base32 = job.base.reshape(-1).float()
    weighted, weighted32 = [], []
    for i, x in enumerate(job.xs):
        d = x.reshape(-1).to(f64) - base
        keep = keep_mask(job, i)
        r = _rescale(job, i, d, keep)
        trimmed = d if keep is None else d * keep
        weighted.append(job.weights[i] * r * trimmed)
        # The fp32 term the kernels compute: fl32(fl32(w r) * (fl32(x) - fl32(base))).
        d32 = x.reshape(-1).float() - base32
        term32 = torch.tensor(job.weights[i] * r, dtype=torch.float32) * d32
        weighted32.append(term32 if keep is None else torch.where(keep, term32, 0.0))
    if traits.combine == "sum":
        merged = sum(weighted) / sum_divisor(job.weights, job.normalize)
    else:  # elect
        # The elected sign is a discrete decision: take it as every kernel does, from the fp32
        # terms summed in fp64 in model order (no rounding of the products can be fused away,
        # so it is bit-identical everywhere), so that exact cancellations (S == 0 in exact
        # arithmetic, common with bf16 inputs and decimal weights) resolve identically.
        total = torch.zeros_like(base)
        for term32 in weighted32:
            total += term32.to(f64)
        positive = total >= 0
        num = torch.zeros_like(base)
        den = torch.zeros_like(base)
        for w, wd, wd32 in zip(job.weights, weighted, weighted32):
            agree = torch.where(positive, wd32 > 0, wd32 < 0)
            num += torch.where(agree, wd, 0.0)
            den += torch.where(agree, w, 0.0)
        if job.normalize:
            merged = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), num)
        else:
            merged = num
    return (base + job.lam * merged).reshape(shape).to(job.out_dtype)


def merge_jobs(
    jobs: Sequence[MergeJob], outs: Sequence[torch.Tensor] | None = None,
    counts: list[NonFiniteCounts] | None = None
) -> list[torch.Tensor]:
    """Compute every job's output (float64 math, one rounding to ``job.out_dtype``).

    With ``outs``, results are copied into those preallocated tensors and returned.
    ``counts`` is accepted for the dispatcher's signature and left as given: this backend
    counts no NaN/Inf values (the caller counts them).
    """
    results = [_merge_one(job) for job in jobs]
    if outs is None:
        return results
    for out, result in zip(outs, results):
        out.copy_(result)
    return list(outs)


def dare_keep_mask(n: int, density: float, seed: int, name: str, model: int) -> np.ndarray:
    """The DARE keep mask of one model of one tensor (for tests and tools)."""
    return rng.keep_mask(n, rng.threshold24(density), *rng.dare_key(seed, name, model))
