"""mergekit merge methods that run mergecore's kernels.

``method(name)`` returns a mergekit ``MergeMethod`` whose ``spec`` is the very
``MergeMethodSpec`` mergekit registers under ``name`` (parameters, defaults, scopes, input
contract, optional-tensor policy), read from mergekit's registry at run time. mergekit's own
``MergeMethod.__call__`` validates the inputs and binds the parameters; only the execution is
mergecore's: every tensor group becomes one ``mergecore.ops.make_job`` and a chunk of groups
runs in one ``mergecore.ops.merge_many`` call (C++ kernels for CPU tensors, Triton for CUDA
tensors, the float64 reference for float64 tensors)::

    from mergekit.merge_methods import merge_state_dicts
    import mergecore.integrations.mergekit as mc

    merged = merge_state_dicts(models, mc.method("ties"), base=0,
                               parameters={"weight": [1.0, 0.5], "density": 0.5})

What is the same as mergekit's method: the parameters and their defaults, the input checks, the
dtype rules (inputs promoted per group, or converted to ``dtype``; the result has the working
dtype, then ``out_dtype``), and mergekit's edge rules for sparsification: a density >= 1
keeps everything; TIES keeps at least one entry of a tensor when ``0 < density`` (mergecore's
own API calls ``int(density * n) == 0`` an error); a density <= 0 (TIES), a DARE density of 0
or a breadcrumbs density that keeps no entry drops that model's delta (a negative DARE density
is an error, as torch.bernoulli makes it in mergekit; a NaN density is an error everywhere);
the breadcrumbs outlier count shrinks when density and gamma do not fit.

Where results legitimately differ (``docs/integrations.md``): mergecore computes in fp32 and
rounds once, while mergekit's task-arithmetic family computes bf16/fp16 inputs in bf16/fp16
(deltas and weights rounded); TIES / breadcrumbs break ties in magnitude by the lowest index
(mergekit's argsort is unstable); DARE draws its mask from mergecore's counter-based stream,
seeded from torch's default generator (so ``torch.manual_seed`` / ``--random-seed`` make a
merge reproducible), not from ``torch.bernoulli``; NaN/Inf inputs, and ``linear`` with a zero
weight sum, raise an error instead of producing NaN; outputs carry no autograd graph.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergecore import ops
from mergecore.errors import MergeError
from mergecore.integrations._deps import require
from mergecore.methods import METHODS, MergeJob

MERGEKIT_MINIMUM = "0.1.5"
MERGEKIT_BELOW = "0.2"

_mergekit = require("mergekit", "mergekit.merge_methods", MERGEKIT_MINIMUM, MERGEKIT_BELOW,
                    "mergecore.integrations.mergekit")
from mergekit.merge_methods import registry as _registry
from mergekit.merge_methods.base import (
    BatchOptions,
    MergeMethod,
    MergeMethodSpec,
    TensorGroup,
)

#: The mergekit methods mergecore runs (every other method stays mergekit's).
SUPPORTED_METHODS = ("linear", "task_arithmetic", "slerp", "ties", "dare_linear", "dare_ties",
                     "breadcrumbs", "breadcrumbs_ties")

_SEED_BOUND = 1 << 62


def original_method(name: str) -> MergeMethod:
    """mergekit's own method registered as ``name`` (even while :func:`replaced_methods`
    has put a mergecore method in its place)."""
    registered = _registry.get(name)
    return registered.mergekit_method if isinstance(registered, MergecoreMethod) else registered


class MergecoreMethod(MergeMethod):
    """A mergekit method computed by mergecore: mergekit's spec, binding and checks; mergecore's
    kernels. ``mergekit_method`` is the mergekit method it stands in for."""

    supports_batching = True

    def __init__(self, name: str):
        if name not in SUPPORTED_METHODS:
            raise ValueError(
                f"mergecore implements the mergekit methods {', '.join(SUPPORTED_METHODS)}; "
                f"not {name!r} (use mergekit's own: mergekit.merge_methods.get({name!r}))"
            )
        self.name = name
        self.mergekit_method = original_method(name)
        self.spec: MergeMethodSpec = self.mergekit_method.spec

    def __repr__(self) -> str:
        return f"mergecore.integrations.mergekit.method({self.name!r})"

    def _execute(
        self,
        groups: Sequence[TensorGroup],
        parameters: list[dict[str, Any]],
        options: BatchOptions,
        *,
        input_dtypes: Sequence[torch.dtype | None],
        out_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Merge validated groups with bound parameters; chunks of groups (within mergekit's
        packing limits ``options``) run as one batched mergecore call each."""
        seed = int(torch.randint(0, _SEED_BOUND, (1,)).item()) if "dare" in self.name else 0
        results: list[torch.Tensor | None] = [None] * len(groups)
        chunk: list[tuple[int, MergeJob, torch.dtype]] = []
        chunk_bytes = 0
        with torch.no_grad():
            for index, (group, bound) in enumerate(zip(groups, parameters)):
                work = input_dtypes[index] or group.entries[0].tensor.dtype
                prepared = _prepare(self.name, group, bound, work, out_dtype, seed, index)
                if isinstance(prepared, torch.Tensor):
                    results[index] = prepared
                    continue
                size = sum(x.numel() for x in prepared.xs) * work.itemsize
                if chunk and (chunk_bytes + size > options.max_bytes
                              or len(chunk) >= options.max_groups):
                    _run(chunk, results, out_dtype)
                    chunk, chunk_bytes = [], 0
                chunk.append((index, prepared, work))
                chunk_bytes += size
            if chunk:
                _run(chunk, results, out_dtype)
        return tuple(results)  # type: ignore[arg-type]


def _run(chunk: list[tuple[int, MergeJob, torch.dtype]], results: list,
         out_dtype: torch.dtype | None) -> None:
    """Compute one chunk of jobs in one call; cast to ``out_dtype`` where the kernel did not."""
    outs = ops.merge_many([job for _, job, _ in chunk])
    for (index, job, _), out in zip(chunk, outs):
        results[index] = out if out_dtype is None or out.dtype == out_dtype else out.to(out_dtype)


# Output dtypes a kernel may round to directly: narrowing an fp32 (fp64) result once gives the
# same value as mergekit's "result in the working dtype, then cast".
_DIRECT = {(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
           (torch.float64, torch.float32), (torch.float64, torch.bfloat16),
           (torch.float64, torch.float16)}


def _kernel_dtype(work: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is None or out_dtype == work or (work, out_dtype) not in _DIRECT:
        return work
    return out_dtype


def _prepare(name: str, group: TensorGroup, bound: Mapping[str, Any], work: torch.dtype,
             out_dtype: torch.dtype | None, seed: int, index: int) -> MergeJob | torch.Tensor:
    """One group's mergecore job, or its result when there is nothing to compute."""
    label = group.metadata.name or f"group{index}"
    tensors = [entry.tensor.to(work) for entry in group.entries]
    kernel_dtype = _kernel_dtype(work, out_dtype)
    final = out_dtype or work
    if tensors[0].numel() == 0:
        return torch.empty(tensors[0].shape, dtype=final, device=tensors[0].device)
    if name == "linear":
        weights = [bound["weight"][entry.id] for entry in group.entries]
        return ops.make_job("linear", None, tensors, weights=weights,
                            normalize=bound["normalize"], out_dtype=kernel_dtype, name=label)
    base_at = next(k for k, entry in enumerate(group.entries) if entry.is_base)
    base = tensors[base_at]
    others = [(entry, tensor) for entry, tensor in zip(group.entries, tensors) if not entry.is_base]
    if name == "slerp":
        return ops.make_job("slerp", base, [others[0][1]], t=bound["t"], out_dtype=kernel_dtype,
                            name=label)
    if not others:  # mergekit returns the base unchanged
        return base.to(final)
    xs, weights, densities, gammas = [], [], [], []
    kind = METHODS[name].sparsify
    for entry, tensor in others:
        density = bound["density"][entry.id]
        gamma = bound["gamma"][entry.id] if "gamma" in bound else 0.0
        effective = mergekit_density(kind, density, gamma, base.numel(),
                                     where=f"tensor {label!r}: model {entry.id}")
        xs.append(base if effective is None else tensor)  # None: the delta is dropped
        weights.append(bound["weight"][entry.id])
        densities.append(1.0 if effective is None else effective)
        gammas.append(gamma)
    return ops.make_job(name, base, xs, weights=weights, densities=densities, gammas=gammas,
                        normalize=bound["normalize"], lambda_=bound["lambda"],
                        rescale=bool(bound["rescale"]), seed=seed, name=label,
                        out_dtype=kernel_dtype)


def mergekit_density(kind: str | None, density: float, gamma: float, numel: int, *,
                     where: str = "density") -> float | None:
    """The mergecore density that keeps what mergekit 0.1.5's sparsifier keeps for ``kind``
    (``"magnitude"``, ``"band"`` = magnitude_outliers, ``"random"``, None); None when mergekit
    keeps no entry (the model's delta is dropped). A density mergekit cannot use (NaN; a
    negative one for DARE's bernoulli draw) is a MergeError starting with ``where``."""
    if math.isnan(density):
        raise MergeError(f"{where}: density is NaN")
    if kind is None or density >= 1:
        return density
    if kind == "random":
        if density < 0:
            raise MergeError(f"{where}: DARE density {density} is negative (a keep "
                             "probability is in [0, 1])")
        return density
    if density <= 0 or int(density * numel) > 0:
        return density if density > 0 else None
    if kind == "band":  # magnitude_outliers keeps int(density * n) entries, here none
        return None
    # magnitude: mergekit keeps max(1, int(density * n)) entries
    return 1.0 if numel == 1 else 1.5 / numel


def method(name: str) -> MergecoreMethod:
    """The mergecore-backed stand-in for mergekit's method ``name`` (one of
    :data:`SUPPORTED_METHODS`); use it wherever mergekit takes a ``MergeMethod``."""
    return MergecoreMethod(name)


def methods() -> dict[str, MergecoreMethod]:
    """Every mergecore-backed method, by mergekit name."""
    return {name: MergecoreMethod(name) for name in SUPPORTED_METHODS}
