"""What each merge method is made of: one table, read by the reference and composed backends.

A *job* (``MergeJob``) is one output tensor's merge with every parameter resolved. The
sparsification kind says how each model's delta ``d_i = x_i - base`` is trimmed, the combine
kind how the trimmed deltas are summed (``docs/semantics.md`` has the formulas).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mergecore.errors import MergeError


@dataclass(frozen=True)
class MethodTraits:
    """Static description of one merge method."""

    name: str
    needs_base: bool
    sparsify: str | None  # None, "magnitude", "random", "band"
    combine: str  # "sum", "elect", "linear", "slerp", "passthrough"
    default_normalize: bool
    default_rescale: bool


METHODS: dict[str, MethodTraits] = {
    m.name: m
    for m in (
        MethodTraits("linear", False, None, "linear", True, False),
        MethodTraits("task_arithmetic", True, None, "sum", False, False),
        MethodTraits("ties", True, "magnitude", "elect", True, False),
        MethodTraits("dare_linear", True, "random", "sum", False, True),
        MethodTraits("dare_ties", True, "random", "elect", False, True),
        MethodTraits("breadcrumbs", True, "band", "sum", False, False),
        MethodTraits("breadcrumbs_ties", True, "band", "elect", False, False),
        MethodTraits("slerp", True, None, "slerp", False, False),
        MethodTraits("passthrough", False, None, "passthrough", False, False),
    )
}

SLERP_DOT_THRESHOLD = 0.9995
SLERP_NORM_EPS = 1e-8
RESCALE_L1_EPS = 1e-7
#: a weight sum within this of 0 counts as zero (0.1 + 0.2 - 0.3 is 5.6e-17, not 0): relative
#: to the weights' magnitudes for linear with normalize (an error, ``weights_cancel``), absolute
#: for the other methods (no division, ``sum_divisor``, as mergekit does)
NORMALIZE_EPS = 1e-8


@dataclass
class MergeJob:
    """One output tensor's merge, parameters resolved.

    ``xs`` are the non-base inputs; ``weights``, ``densities`` and ``gammas`` have one entry
    per element of ``xs``. ``rescale`` is None, ``"l1"`` (mergekit's DARE rescale) or
    ``"inverse_density"``. ``name`` keys the DARE random stream and names the tensor in errors.
    """

    method: str
    base: torch.Tensor | None
    xs: list[torch.Tensor]
    out_dtype: torch.dtype
    weights: list[float] = field(default_factory=list)
    densities: list[float] = field(default_factory=list)
    gammas: list[float] = field(default_factory=list)
    normalize: bool = False
    lam: float = 1.0
    rescale: str | None = None
    t: float = 0.0
    scale: float | None = None
    seed: int = 0
    name: str = "tensor"

    @property
    def traits(self) -> MethodTraits:
        return METHODS[self.method]

    @property
    def numel(self) -> int:
        ref = self.base if self.base is not None else self.xs[0]
        return ref.numel()


# ----- selection sizes (shared by every backend so kept sets agree) -----------------------


def magnitude_k(density: float, numel: int, name: str, model: int) -> int | None:
    """Entries kept by TIES trimming: ``int(p * numel)``; None means keep all (p >= 1)."""
    if density >= 1:
        return None
    k = int(density * numel)
    if k <= 0:
        raise MergeError(
            f"tensor {name!r}, model {model}: density {density} keeps k = int({density} * {numel})"
            " = 0 entries; raise the density or exclude this tensor with a filter"
        )
    return k


def band_sizes(density: float, gamma: float, numel: int, name: str, model: int) -> tuple[int, int] | None:
    """Breadcrumbs: (size of the upper top-set, size of the dropped top-set); None keeps all.

    ``target = int(p * n)`` entries are kept after dropping ``int(gamma * n)`` largest ones; when
    the two do not fit, fewer large entries are dropped (mergekit's rule). Kept = the entries
    ranked ``[upper - target, upper)`` by magnitude, largest first.
    """
    if density >= 1:
        return None
    target = int(density * numel)
    if target <= 0:
        raise MergeError(
            f"tensor {name!r}, model {model}: density {density} keeps int({density} * {numel})"
            " = 0 entries; raise the density or exclude this tensor with a filter"
        )
    n_top = max(0, int(gamma * numel))
    n_bottom = max(0, numel - target - n_top)
    upper = numel - n_bottom
    return upper, upper - target


# ----- scalar math shared by backends -------------------------------------------------------


def slerp_coefficients(aa: float, bb: float, ab: float, t: float) -> tuple[float, float]:
    """Coefficients (s0, s1) with ``out = s0 * a + s1 * b`` from the whole-tensor sums.

    ``n0 = sqrt(aa)``, ``n1 = sqrt(bb)`` (a norm <= 1e-8 counts as 1); ``dot = ab / (n0 n1)``;
    ``|dot| > 0.9995``: lerp ``(1 - t, t)``; else ``theta = acos(dot)``,
    ``s0 = sin((1-t) theta) / sin(theta)``, ``s1 = sin(t theta) / sin(theta)``. A sum that is
    not finite (a NaN/Inf input) gives NaN coefficients.
    """
    if not all(math.isfinite(v) for v in (aa, bb, ab)):
        return math.nan, math.nan  # a NaN/Inf input: the output says so (NonFiniteError)
    n0 = math.sqrt(max(aa, 0.0))
    n1 = math.sqrt(max(bb, 0.0))
    n0 = n0 if n0 > SLERP_NORM_EPS else 1.0
    n1 = n1 if n1 > SLERP_NORM_EPS else 1.0
    dot = ab / (n0 * n1)
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def l1_rescale_factor(l1_all: float, l1_kept: float) -> float:
    """mergekit's L1 rescale: ``L1(d) / L1(kept d)``, 1 when either is below 1e-7."""
    if l1_all < RESCALE_L1_EPS or l1_kept < RESCALE_L1_EPS:
        return 1.0
    return l1_all / l1_kept


def weights_cancel(weights: Sequence[float]) -> bool:
    """Whether the weights sum to zero up to their own rounding: ``|sum w| <= 1e-8 sum |w|``
    (so ``[0.1, 0.2, -0.3]`` cancels, ``[1e-9, 1e-9]`` does not). linear with normalize
    refuses such weights: it would divide by (nearly) nothing."""
    return abs(math.fsum(weights)) <= NORMALIZE_EPS * math.fsum(abs(w) for w in weights)


def linear_divisor(weights: Sequence[float], normalize: bool) -> float:
    """Divisor of linear: ``sum w`` with normalize (weights that cancel were refused), else 1."""
    return math.fsum(weights) if normalize else 1.0


def sum_divisor(weights: Sequence[float], normalize: bool) -> float:
    """Divisor of the other non-elect combines (task arithmetic, DARE, breadcrumbs): ``sum w``
    with normalize, 1 when ``|sum w| < 1e-8`` (mergekit's rule)."""
    if not normalize:
        return 1.0
    total = math.fsum(weights)
    return total if abs(total) >= NORMALIZE_EPS else 1.0
