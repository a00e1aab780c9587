"""The contract between the shared merge orchestration and the compute backends.

Every accelerated backend (C++ on the CPU, Triton on CUDA) implements the same small set of
*primitives* on flat, contiguous 1-D torch tensors of equal length ``n``. The public
operations (``mergecore.ties`` ...) are composed from these primitives once, in
``mergecore.composed``, so TIES, DARE and breadcrumbs keep exactly the same entries on every
backend: selection is exact integer work on the bit patterns of ``|fl32(x - base)|``.

Input dtypes: torch.float32, torch.float16, torch.bfloat16 (base and all models of one call
share one dtype). Output dtype: any of the three. Arithmetic: widen to fp32, compute in fp32,
round once to the output dtype (round-to-nearest-even). Whole-tensor reductions accumulate
blocks in fp32 and combine block partials in fp64.

Selection key
-------------
``key(j) = bits(|fl32(x[j]) - fl32(base[j])|)`` as an unsigned 32-bit integer (the sign bit
cleared; for non-negative finite floats the integer order is the float order). Without a
base (not used by any selection) the key is ``bits(|fl32(x[j])|)``.

Masks (which entries of model i's delta are kept)
-------------------------------------------------
``TopSet(T, J)`` is the set ``{j : key(j) > T or (key(j) == T and j < J)}``. The exact top-k
set ranked by key descending, lowest flat index first among equal keys, is always
representable this way; ``EMPTY_TOP = TopSet(0xFFFFFFFF, 0)`` is the empty set and
``TopSet(0, n)`` the full set.

- ``KeepAll()``: keep every entry.
- ``KeepTop(top)``: keep ``top``.
- ``KeepBand(upper, drop)``: keep ``upper`` minus ``drop`` (breadcrumbs: drop the largest,
  keep the next ones); ``drop`` is a subset of ``upper``.
- ``KeepRandom(threshold24, key0, key1)``: keep entry j iff ``philox_word(j) >> 8 <
  threshold24`` where ``philox_word(j)`` is word ``j & 3`` of Philox4x32-10 with counter
  ``(lo32(j >> 2), hi32(j >> 2), 0, 0)`` and key ``(key0, key1)``. ``threshold24`` is
  ``round(p * 2**24)`` clamped to [0, 2**24]. See ``mergecore.rng`` for the reference.
  Optional ``bits``: a uint8 tensor of ``ceil(n / 8)`` bytes on the inputs' device, a cache
  of the keep decisions (entry j: bit ``j & 7`` of byte ``j >> 3``). A backend that sets
  ``CACHES_RANDOM_MASKS = True`` writes them in ``masked_l1`` and reads them in a later
  ``combine`` given the same mask, instead of evaluating the Philox stream twice (the
  caller passes a mask with ``bits`` to ``combine`` only after ``masked_l1`` filled them);
  other backends ignore ``bits``.

Primitives (what a backend module exports)
------------------------------------------
``slerp_reduce(a, b) -> (sum a*a, sum b*b, sum a*b)`` as Python floats.

``lerp2(out, a, b, c0, c1)``: ``out = c0*a + c1*b`` (fp32 arithmetic, c0/c1 given as float).

``select_top(base, x, ks) -> list[TopSet]``: for each k in ks (0 <= k <= n) the exact top-k
set of the keys of ``x - base``. Must not sort the tensor: histogram / radix selection.

``masked_l1(base, x, mask) -> (L1(d), L1(d * keep))`` in float64 Python floats, where
``d = fl32(x) - fl32(base)`` (each |d| summed in fp32 per block, blocks combined in fp64).

``combine(out, base, xs, masks, coefs, weights, mode, normalize, lam)``:
  For each element j and model i: ``d_i = fl32(x_i) - fl32(base)`` (``base`` may be None:
  then ``d_i = fl32(x_i)`` and the result has no base term), ``wd_i = coefs[i] * d_i`` if
  entry j is kept by ``masks[i]`` else 0.
  - ``mode == "sum"``: ``out = base + sum_i wd_i`` (weights, normalize and lam unused: the
    caller folds weight, rescale, lambda and normalization into coefs).
  - ``mode == "elect"`` (TIES sign election; coefs = weight * rescale):
    ``S = sum_i wd_i`` **accumulated in fp64** (each fp32 term ``wd_i = fl32(fl32(coefs[i]) *
    d_i)`` widened, added in model order): the elected sign is a discrete decision and must be
    bit-identical on every backend, also where S cancels exactly (bf16 deltas with decimal
    weights do that often); fp64 sums of fp32 terms leave no room for FMA contraction or
    summation-order differences. ``agree_i = (wd_i > 0 and S >= 0) or (wd_i < 0 and S < 0)``;
    ``num = sum_i agree_i * wd_i``; ``den = sum_i agree_i * weights[i]``;
    ``merged = num / den if normalize and den != 0 else num``; ``out = base + lam * merged``.
  The value sums (``sum`` mode, ``num``, ``den``) run in model order in fp32.

Batched forms take lists of independent jobs and must run them in one launch / one parallel
region (not a Python loop of launches): ``slerp_reduce_many(pairs)``, ``lerp2_many(jobs)``,
``combine_many(jobs)``, ``select_top_many(jobs)``, ``masked_l1_many(jobs)``, each job being the
argument tuple of the single form (see ``CombineJob`` etc. below). A backend may implement the
single form by calling the batched one with one job.

NaN/Inf counts (optional): ``lerp2_many`` may return, per job, the number of NaN/Inf values it
stored in ``out``; ``combine_many`` may return per job ``(NaN/Inf values stored in out, NaN/Inf
deltas d_i over all models)``, both counted in the same pass. A backend that returns None
leaves the check to the caller (``mergecore.ops`` then counts with one extra pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

KEY_NONE = 0xFFFFFFFF


class TopSet(NamedTuple):
    """``{j : key(j) > threshold or (key(j) == threshold and j < cutoff)}``."""

    threshold: int
    cutoff: int


EMPTY_TOP = TopSet(KEY_NONE, 0)


def full_top(n: int) -> TopSet:
    """The set of all n entries."""
    return TopSet(0, n)


@dataclass(frozen=True)
class KeepAll:
    """Keep every entry."""


@dataclass(frozen=True)
class KeepTop:
    """Keep the entries of ``top``."""

    top: TopSet


@dataclass(frozen=True)
class KeepBand:
    """Keep ``upper`` minus ``drop`` (``drop`` is a subset of ``upper``)."""

    upper: TopSet
    drop: TopSet


@dataclass(frozen=True)
class KeepRandom:
    """Keep j iff ``philox_word(j) >> 8 < threshold24`` (see module docstring)."""

    threshold24: int
    key0: int
    key1: int
    #: the keep-bit cache (see module docstring): not part of the mask's identity
    bits: torch.Tensor | None = field(default=None, compare=False, repr=False)


Mask = KeepAll | KeepTop | KeepBand | KeepRandom


@dataclass
class CombineJob:
    """Arguments of one ``combine`` call."""

    out: torch.Tensor
    base: torch.Tensor | None
    xs: Sequence[torch.Tensor]
    masks: Sequence[Mask]
    coefs: Sequence[float]
    weights: Sequence[float]
    mode: str  # "sum" or "elect"
    normalize: bool
    lam: float


@dataclass
class SelectJob:
    """Arguments of one ``select_top`` call."""

    base: torch.Tensor
    x: torch.Tensor
    ks: Sequence[int]


@dataclass
class L1Job:
    """Arguments of one ``masked_l1`` call."""

    base: torch.Tensor
    x: torch.Tensor
    mask: Mask


@dataclass
class Lerp2Job:
    """Arguments of one ``lerp2`` call."""

    out: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    c0: float
    c1: float


PRIMITIVES = (
    "slerp_reduce_many",
    "lerp2_many",
    "select_top_many",
    "masked_l1_many",
    "combine_many",
)
