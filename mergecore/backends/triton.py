"""The Triton backend: the primitives of ``mergecore.backends.spec`` on CUDA tensors.

Each ``*_many`` primitive runs all its jobs in one launch per kernel (jobs are grouped only by
device and dtypes): tensors are addressed through offset tables, never packed or copied.
Kernels live in the top-level package ``triton_kernels`` (one module per operation family);
this module validates arguments, converts the spec's mask and job types, and calls them.
Importing it compiles nothing and does not initialize CUDA. CPU tensors are accepted only
under ``TRITON_INTERPRET=1`` (Triton's interpreter, used by the tests).

Selection results use one canonical ``TopSet`` per k (see ``triton_kernels.select``):
k == 0 -> ``EMPTY_TOP``; k == n -> ``TopSet(0, n)``; otherwise ``T`` = key of the k-th ranked
entry and ``J`` = n if every entry with key T is kept, else 1 + index of the last kept one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only where triton is missing
    raise ImportError(
        "mergecore.backends.triton needs the 'triton' package (pip install triton; it ships "
        "with CUDA builds of torch); without it mergecore uses the C++ or reference backend"
    ) from exc

from mergecore.backends.spec import (
    EMPTY_TOP,
    CombineJob,
    KeepAll,
    KeepBand,
    KeepRandom,
    KeepTop,
    L1Job,
    Lerp2Job,
    Mask,
    SelectJob,
    TopSet,
)
from triton_kernels import combine as _combine
from triton_kernels import dare as _dare
from triton_kernels import select as _select
from triton_kernels import slerp as _slerp

NAME = "triton"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = [
    "NAME",
    "combine",
    "combine_many",
    "lerp2",
    "lerp2_many",
    "masked_l1",
    "masked_l1_many",
    "select_top",
    "select_top_many",
    "slerp_reduce",
    "slerp_reduce_many",
]


# ----------------------------------------------------------------------------- validation


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _flat(t: torch.Tensor, what: str, *, device: torch.device | None = None,
          n: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` as a flat view, after checking dtype, layout, device and length."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: dtype {t.dtype} is not float32, float16 or bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{what}: dtype {t.dtype} differs from the job's input dtype {dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{what}: tensor must be contiguous (shape {tuple(t.shape)}, "
                         f"strides {t.stride()})")
    if t.device.type == "cpu" and not _interpreting():
        raise RuntimeError(f"{what}: the Triton backend needs CUDA tensors (CPU tensors run "
                           "only under TRITON_INTERPRET=1)")
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{what}: device {t.device} is not supported by the Triton backend")
    if device is not None and t.device != device:
        raise ValueError(f"{what}: on {t.device}, other tensors of the job are on {device}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{what}: {t.numel()} elements, expected {n}")
    return t.reshape(-1)


def _mask_tuple(mask: Mask, what: str) -> tuple:
    if isinstance(mask, KeepAll):
        return ("all",)
    if isinstance(mask, KeepTop):
        return ("top", int(mask.top.threshold), int(mask.top.cutoff))
    if isinstance(mask, KeepBand):
        return ("band", int(mask.upper.threshold), int(mask.upper.cutoff),
                int(mask.drop.threshold), int(mask.drop.cutoff))
    if isinstance(mask, KeepRandom):
        if not 0 <= int(mask.threshold24) <= 1 << 24:
            raise ValueError(f"{what}: threshold24 {mask.threshold24} outside [0, 2**24]")
        return ("random", int(mask.threshold24), int(mask.key0), int(mask.key1))
    raise TypeError(f"{what}: unknown mask {mask!r}")


# ----------------------------------------------------------------------------- primitives


def slerp_reduce_many(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> list[tuple[float, float, float]]:
    """``(sum a*a, sum b*b, sum a*b)`` per pair (fp32 per tile, fp64 across tiles)."""
    checked = []
    for i, (a, b) in enumerate(pairs):
        fa = _flat(a, f"slerp_reduce pair {i} (a)")
        fb = _flat(b, f"slerp_reduce pair {i} (b)", device=fa.device, n=fa.numel(),
                   dtype=fa.dtype)
        checked.append((fa, fb))
    return _slerp.reduce_many(checked)


def slerp_reduce(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """``(sum a*a, sum b*b, sum a*b)`` as Python floats."""
    return slerp_reduce_many([(a, b)])[0]


def lerp2_many(jobs: Sequence[Lerp2Job]) -> None:
    """``out = c0*a + c1*b`` for every job, one launch per dtype group."""
    checked = []
    for i, job in enumerate(jobs):
        out = _flat(job.out, f"lerp2 job {i} (out)")
        a = _flat(job.a, f"lerp2 job {i} (a)", device=out.device, n=out.numel())
        b = _flat(job.b, f"lerp2 job {i} (b)", device=out.device, n=out.numel(), dtype=a.dtype)
        checked.append((out, a, b, float(job.c0), float(job.c1)))
    _slerp.lerp_many(checked)


def lerp2(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c0: float, c1: float) -> None:
    """``out = c0*a + c1*b`` (fp32 arithmetic, one rounding to ``out.dtype``)."""
    lerp2_many([Lerp2Job(out, a, b, c0, c1)])


def select_top_many(jobs: Sequence[SelectJob]) -> list[list[TopSet]]:
    """For each job and each k in its ks, the exact top-k ``TopSet`` (canonical form)."""
    checked = []
    for i, job in enumerate(jobs):
        base = _flat(job.base, f"select job {i} (base)")
        x = _flat(job.x, f"select job {i} (x)", device=base.device, n=base.numel(),
                  dtype=base.dtype)
        ks = []
        for k in job.ks:
            k = int(k)
            if not 0 <= k <= base.numel():
                raise ValueError(f"select job {i}: k = {k} outside [0, {base.numel()}]")
            ks.append(k)
        checked.append((base, x, ks))
    found = _select.select_top_many(checked)
    return [[EMPTY_TOP if t == tuple(EMPTY_TOP) else TopSet(*t) for t in tops] for tops in found]


def select_top(base: torch.Tensor, x: torch.Tensor, ks: Sequence[int]) -> list[TopSet]:
    """The exact top-k sets of ``bits(|fl32(x) - fl32(base)|)`` for each k."""
    return select_top_many([SelectJob(base, x, ks)])[0]


def masked_l1_many(jobs: Sequence[L1Job]) -> list[tuple[float, float]]:
    """``(L1(d), L1(d * keep))`` per job, ``d = fl32(x) - fl32(base)``."""
    checked = []
    for i, job in enumerate(jobs):
        base = _flat(job.base, f"masked_l1 job {i} (base)")
        x = _flat(job.x, f"masked_l1 job {i} (x)", device=base.device, n=base.numel(),
                  dtype=base.dtype)
        checked.append((base, x, _mask_tuple(job.mask, f"masked_l1 job {i}")))
    return _dare.masked_l1_many(checked)


def masked_l1(base: torch.Tensor, x: torch.Tensor, mask: Mask) -> tuple[float, float]:
    """``(L1(d), L1(d * keep))`` as Python floats."""
    return masked_l1_many([L1Job(base, x, mask)])[0]


def combine_many(jobs: Sequence[CombineJob]) -> None:
    """The fused combine of every job (see ``triton_kernels.combine``)."""
    checked = []
    for i, job in enumerate(jobs):
        what = f"combine job {i}"
        out = _flat(job.out, f"{what} (out)")
        n, dev = out.numel(), out.device
        base = None
        in_dtype = None
        if job.base is not None:
            base = _flat(job.base, f"{what} (base)", device=dev, n=n)
            in_dtype = base.dtype
        xs = []
        for m, x in enumerate(job.xs):
            fx = _flat(x, f"{what} (model {m})", device=dev, n=n, dtype=in_dtype)
            in_dtype = fx.dtype
            xs.append(fx)
        counts = {len(job.xs), len(job.masks), len(job.coefs), len(job.weights)}
        if len(counts) != 1:
            raise ValueError(f"{what}: {len(job.xs)} models but {len(job.masks)} masks, "
                             f"{len(job.coefs)} coefs, {len(job.weights)} weights")
        if job.mode not in _combine.MODES:
            raise ValueError(f"{what}: mode {job.mode!r} is not 'sum' or 'elect'")
        masks = [_mask_tuple(mk, f"{what} (model {m})") for m, mk in enumerate(job.masks)]
        checked.append(_combine.Combine(out, base, xs, masks, [float(c) for c in job.coefs],
                                        [float(w) for w in job.weights], job.mode,
                                        bool(job.normalize), float(job.lam)))
    _combine.combine_many(checked)


def combine(out: torch.Tensor, base: torch.Tensor | None, xs: Sequence[torch.Tensor],
            masks: Sequence[Mask], coefs: Sequence[float], weights: Sequence[float],
            mode: str, normalize: bool, lam: float) -> None:
    """One fused combine (see ``mergecore.backends.spec``)."""
    combine_many([CombineJob(out, base, xs, masks, coefs, weights, mode, normalize, lam)])
