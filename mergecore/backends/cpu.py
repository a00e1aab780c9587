"""The C++ CPU backend: the primitives of ``mergecore.backends.spec`` on ``mergecore._C``.

This module only checks arguments and translates them for the compiled kernels: each tensor
becomes ``(data_ptr, dtype code)`` (codes 0 = float32, 1 = float16, 2 = bfloat16; bf16 is
handled as its 16-bit pattern), each mask a 5-tuple. The kernels widen every input to fp32
exactly, compute in fp32 and round once to the output dtype (round-to-nearest-even), run
multi-threaded (OpenMP) with the GIL released, and process a whole batch of jobs in one
parallel region over (job, chunk) work items.

Reductions (``slerp_reduce``, ``masked_l1``) sum fp32 over fixed 4096-element blocks and add
the block partials in fp64 in block order; elementwise kernels and ``select_top`` are exact
per element. Every result is therefore independent of the thread count.

Threads: ``set_num_threads(n)`` / ``get_num_threads()``; the default is the environment
variable ``MERGECORE_NUM_THREADS`` if it is a positive integer, else the number of CPUs this
process may use.

Importing this module raises ImportError when the extension is not built, so that the
dispatcher falls back to the reference backend.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

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
    TopSet,
)

try:
    from mergecore import _C  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - exercised only without a build
    raise ImportError(
        "mergecore.backends.cpu needs the compiled extension mergecore._C, which is not built "
        "or cannot be loaded; build it with `pip install -e .` or "
        f"`python setup.py build_ext --inplace` ({exc})"
    ) from exc

_REQUIRED = (
    "lerp2_many",
    "slerp_reduce_many",
    "masked_l1_many",
    "select_top_many",
    "combine_many",
    "count_nonfinite_many",
    "set_num_threads",
    "get_num_threads",
    "pread_into",
    "pwrite_from",
)
_INTERFACE_VERSION = 3  # csrc/module.cpp's INTERFACE_VERSION this module speaks
_missing = [name for name in _REQUIRED if not hasattr(_C, name)]
if getattr(_C, "INTERFACE_VERSION", 1) != _INTERFACE_VERSION:
    _missing.append(f"INTERFACE_VERSION {_INTERFACE_VERSION}")
if _missing:  # pragma: no cover - a stale build
    raise ImportError(
        f"mergecore._C at {getattr(_C, '__file__', '?')} is out of date (missing "
        f"{', '.join(_missing)}); rebuild it with `python setup.py build_ext --inplace`"
    )

NAME = "cpu"

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
}

_MASK_ALL = (0, 0, 0, 0, 0, 0)
#: masked_l1_many stores KeepRandom keep bits in ``mask.bits`` and combine_many reuses them
CACHES_RANDOM_MASKS = True
_U32 = 0xFFFFFFFF


# ----- threads ----------------------------------------------------------------------------


def default_num_threads() -> int:
    """``MERGECORE_NUM_THREADS`` if it is a positive integer, else the usable CPU count."""
    env = os.environ.get("MERGECORE_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n >= 1:
            return n
        warnings.warn(
            f"MERGECORE_NUM_THREADS={env!r} is not a positive integer; using the CPU count",
            RuntimeWarning,
            stacklevel=2,
        )
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (>= 1) in every kernel of this backend."""
    n = int(n)
    if n < 1:
        raise ValueError(f"set_num_threads: the thread count must be >= 1, got {n}")
    _C.set_num_threads(n)


def get_num_threads() -> int:
    """The number of threads the kernels use."""
    return int(_C.get_num_threads())


set_num_threads(default_num_threads())


# ----- argument checks ---------------------------------------------------------------------


def _operand(t: Any, what: str, n: int | None = None) -> tuple[int, int]:
    """``(data_ptr, dtype code)`` of a contiguous CPU tensor with a kernel dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{what}: the cpu backend needs CPU tensors, got device {t.device}")
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(
            f"{what}: dtype {t.dtype} is not supported (use float32, float16 or bfloat16)"
        )
    if not t.is_contiguous():
        raise ValueError(f"{what}: tensor must be contiguous (call .contiguous() first)")
    if n is not None and t.numel() != n:
        raise ValueError(f"{what}: has {t.numel()} elements, expected {n}")
    return t.data_ptr(), code


def _optional_operand(t: Any, what: str, n: int) -> tuple[int, int]:
    return (0, 0) if t is None else _operand(t, what, n)


def _topset(top: Any, what: str) -> tuple[int, int]:
    threshold, cutoff = int(top[0]), int(top[1])
    if not 0 <= threshold <= _U32 or cutoff < 0:
        raise ValueError(f"{what}: invalid TopSet({threshold}, {cutoff})")
    return threshold, cutoff


def _bits_pointer(bits: torch.Tensor | None, n: int, what: str) -> int:
    """Data pointer of a KeepRandom keep-bit cache (0 for none): a contiguous CPU uint8
    tensor of at least ``ceil(n / 8)`` bytes."""
    if bits is None:
        return 0
    if not (isinstance(bits, torch.Tensor) and bits.dtype == torch.uint8
            and bits.device.type == "cpu" and bits.is_contiguous()
            and bits.numel() >= (n + 7) // 8):
        raise ValueError(f"{what}: KeepRandom.bits must be a contiguous CPU uint8 tensor of "
                         f"at least {(n + 7) // 8} bytes")
    return bits.data_ptr()


def _mask_tuple(mask: Mask, what: str, n: int) -> tuple[int, int, int, int, int, int]:
    """The 6-tuple encoding of a mask for ``mergecore._C`` (the last item: KeepRandom's
    keep-bit cache pointer, or 0)."""
    if isinstance(mask, KeepAll):
        return _MASK_ALL
    if isinstance(mask, KeepTop):
        return (1, *_topset(mask.top, what), 0, 0, 0)
    if isinstance(mask, KeepBand):
        return (2, *_topset(mask.upper, what), *_topset(mask.drop, what), 0)
    if isinstance(mask, KeepRandom):
        thr, k0, k1 = int(mask.threshold24), int(mask.key0), int(mask.key1)
        if not 0 <= thr <= 1 << 24:
            raise ValueError(f"{what}: threshold24 = {thr} is outside [0, 2**24]")
        if not (0 <= k0 <= _U32 and 0 <= k1 <= _U32):
            raise ValueError(f"{what}: Philox key words must be 32-bit unsigned integers")
        return (3, thr, k0, k1, 0, _bits_pointer(mask.bits, n, what))
    raise TypeError(f"{what}: unknown mask {mask!r}")


def _as(cls: type, job: Any) -> Any:
    """Accept a job dataclass or the argument tuple of the single form."""
    return job if isinstance(job, cls) else cls(*job)


# ----- batched primitives -----------------------------------------------------------------


def slerp_reduce_many(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> list[tuple[float, float, float]]:
    """For each pair (a, b): ``(sum a*a, sum b*b, sum a*b)`` (fp32 blocks, fp64 total)."""
    encoded = []
    for j, (a, b) in enumerate(pairs):
        ap, ac = _operand(a, f"slerp_reduce_many pair {j}: a")
        bp, bc = _operand(b, f"slerp_reduce_many pair {j}: b", a.numel())
        encoded.append((ap, ac, bp, bc, a.numel()))
    return [tuple(s) for s in _C.slerp_reduce_many(encoded)]


def count_nonfinite_many(tensors: Sequence[torch.Tensor]) -> list[int]:
    """For each tensor: how many of its values are NaN or Inf (exponent field all ones).

    Not a spec primitive: ``mergecore.ops`` uses it to check merge outputs at memory speed."""
    encoded = []
    for j, t in enumerate(tensors):
        ptr, code = _operand(t, f"count_nonfinite_many tensor {j}")
        encoded.append((ptr, code, t.numel()))
    return list(_C.count_nonfinite_many(encoded))


def lerp2_many(jobs: Sequence[Lerp2Job]) -> list[int]:
    """For each job: ``out = c0*a + c1*b`` (fp32 arithmetic, coefficients rounded to fp32).

    Returns each output's number of NaN/Inf values, counted as its tiles are stored."""
    encoded = []
    for j, job in enumerate(jobs):
        job = _as(Lerp2Job, job)
        n = job.out.numel()
        op, oc = _operand(job.out, f"lerp2_many job {j}: out")
        ap, ac = _operand(job.a, f"lerp2_many job {j}: a", n)
        bp, bc = _operand(job.b, f"lerp2_many job {j}: b", n)
        encoded.append((op, oc, ap, ac, bp, bc, n, float(job.c0), float(job.c1)))
    return list(_C.lerp2_many(encoded))


def select_top_many(jobs: Sequence[SelectJob]) -> list[list[TopSet]]:
    """For each job and each k in ``job.ks``: the exact top-k ``TopSet`` of the keys
    ``bits(|fl32(x) - fl32(base)|)``, ties broken by lowest flat index.

    k == 0 gives ``EMPTY_TOP``, k == n gives ``TopSet(0, n)``; otherwise the threshold is the
    k-th largest key and the cutoff is 1 + the index of the last kept entry equal to it (n when
    all entries equal to it are kept). Computed by radix selection over the key bits.
    """
    encoded = []
    for j, job in enumerate(jobs):
        job = _as(SelectJob, job)
        n = job.x.numel()
        xp, xc = _operand(job.x, f"select_top_many job {j}: x")
        bp, bc = _optional_operand(job.base, f"select_top_many job {j}: base", n)
        ks = [int(k) for k in job.ks]
        for k in ks:
            if not 0 <= k <= n:
                raise ValueError(f"select_top_many job {j}: k = {k} is outside [0, {n}]")
        encoded.append((bp, bc, xp, xc, n, ks))
    return [[TopSet(int(t), int(c)) for t, c in sets] for sets in _C.select_top_many(encoded)]


def masked_l1_many(jobs: Sequence[L1Job]) -> list[tuple[float, float]]:
    """For each job: ``(L1(d), L1(d * keep))`` with ``d = fl32(x) - fl32(base)``."""
    encoded = []
    for j, job in enumerate(jobs):
        job = _as(L1Job, job)
        n = job.x.numel()
        xp, xc = _operand(job.x, f"masked_l1_many job {j}: x")
        bp, bc = _optional_operand(job.base, f"masked_l1_many job {j}: base", n)
        encoded.append((bp, bc, xp, xc, n, _mask_tuple(job.mask, f"masked_l1_many job {j}", n)))
    return [tuple(s) for s in _C.masked_l1_many(encoded)]


_MODES = {"sum": 0, "elect": 1}


def combine_many(jobs: Sequence[CombineJob]) -> list[tuple[int, int]]:
    """For each job, the fused ``sum`` / ``elect`` combine of ``mergecore.backends.spec``.

    ``d_i = fl32(x_i) - fl32(base)``, ``wd_i = coefs[i] * d_i`` where ``masks[i]`` keeps the
    entry, else 0; ``sum``: ``out = base + sum_i wd_i``; ``elect``: sign election on
    ``S = sum_i wd_i``, ``num``/``den`` over the agreeing models, ``out = base + lam * merged``.
    Sums run over the models in order, in fp32. ``out`` may be the same tensor as an input.
    Returns per job ``(NaN/Inf values of out, NaN/Inf deltas d_i over all models)``, counted
    during the same pass. A NaN/Inf in an input always gives a NaN/Inf delta, so a zero second
    count proves every input of the job finite.
    """
    encoded = []
    for j, job in enumerate(jobs):
        job = _as(CombineJob, job)
        what = f"combine_many job {j}"
        n = job.out.numel()
        op, oc = _operand(job.out, f"{what}: out")
        bp, bc = _optional_operand(job.base, f"{what}: base", n)
        m = len(job.xs)
        if not (len(job.masks) == len(job.coefs) == len(job.weights) == m):
            raise ValueError(
                f"{what}: {m} models but {len(job.masks)} masks, {len(job.coefs)} coefs and "
                f"{len(job.weights)} weights"
            )
        if job.mode not in _MODES:
            raise ValueError(f"{what}: mode must be 'sum' or 'elect', got {job.mode!r}")
        xs = [_operand(x, f"{what}: xs[{i}]", n) for i, x in enumerate(job.xs)]
        masks = [_mask_tuple(mk, f"{what}: masks[{i}]", n) for i, mk in enumerate(job.masks)]
        encoded.append((
            op, oc, bp, bc, n, xs, masks,
            [float(c) for c in job.coefs], [float(w) for w in job.weights],
            _MODES[job.mode], bool(job.normalize), float(job.lam),
        ))
    return [(int(o), int(d)) for o, d in _C.combine_many(encoded)]


# ----- single forms -----------------------------------------------------------------------


def slerp_reduce(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """``(sum a*a, sum b*b, sum a*b)`` of one pair."""
    return slerp_reduce_many([(a, b)])[0]


def lerp2(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c0: float, c1: float) -> None:
    """``out = c0*a + c1*b``."""
    lerp2_many([Lerp2Job(out, a, b, c0, c1)])


def select_top(base: torch.Tensor | None, x: torch.Tensor, ks: Sequence[int]) -> list[TopSet]:
    """The exact top-k sets of ``|fl32(x) - fl32(base)|`` for each k in ks."""
    return select_top_many([SelectJob(base, x, ks)])[0]


def masked_l1(base: torch.Tensor | None, x: torch.Tensor, mask: Mask) -> tuple[float, float]:
    """``(L1(d), L1(d * keep))`` of one tensor."""
    return masked_l1_many([L1Job(base, x, mask)])[0]


def combine(
    out: torch.Tensor,
    base: torch.Tensor | None,
    xs: Sequence[torch.Tensor],
    masks: Sequence[Mask],
    coefs: Sequence[float],
    weights: Sequence[float],
    mode: str,
    normalize: bool,
    lam: float,
) -> None:
    """One fused combine (see ``combine_many``)."""
    combine_many([CombineJob(out, base, xs, masks, coefs, weights, mode, normalize, lam)])
