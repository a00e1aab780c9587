"""Public merge functions on torch tensors (the backend other merge tools can call).

Each function builds one ``MergeJob``, validates it, and sends it through the dispatch
table; the ``*_batched`` forms take one entry per output tensor and run every stage of all of
them in one backend call. Arithmetic is fp32 with fp32 accumulation on the CPU/GPU kernels
(float64 on the reference backend); the output dtype defaults to the base's (or the first
input's). Formulas: ``docs/semantics.md`` and ``mergecore.methods``.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from mergecore import dispatch
from mergecore.composed import NonFiniteCounts
from mergecore.dtypes import KERNEL_DTYPES, parse_dtype
from mergecore.errors import MergeError, MergeTypeError, NonFiniteError
from mergecore.methods import METHODS, MergeJob, weights_cancel

Floats = float | Sequence[float]

#: The dtypes of inputs and outputs: the kernels' three, and float64 (the reference backend
#: computes merges that read or write it).
OUT_DTYPES = (*KERNEL_DTYPES, torch.float64)


def _is_scalar(value: Any) -> bool:
    """A Python or NumPy number, or a tensor / array of one element with no dimensions."""
    if isinstance(value, (numbers.Real, np.generic)):
        return True
    return isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0


def _finite(value: Any, what: str, name: str) -> float:
    """``value`` as a finite float, or a MergeError naming the parameter."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MergeTypeError(f"tensor {name!r}: {what} must be a number, not "
                             f"{type(value).__name__}") from None
    if not math.isfinite(number):
        raise MergeError(f"tensor {name!r}: {what} is {number}, not a finite number")
    return number


def _per_model(value: Floats | None, n: int, what: str, name: str) -> list[float]:
    """One finite value per model: a number (given to every model) or a sequence / 1-D
    tensor / array of ``n`` numbers."""
    if value is None:
        raise MergeError(f"tensor {name!r}: parameter {what!r} is required")
    if _is_scalar(value):
        return [_finite(value, what, name)] * n
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.reshape(-1).tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise MergeTypeError(f"tensor {name!r}: {what} must be a number or one number per "
                             f"model, not {type(value).__name__}")
    values = list(value)
    if len(values) != n:
        raise MergeError(f"tensor {name!r}: {len(values)} values of {what!r} for {n} models")
    return [_finite(v, f"{what}[{i}]", name) for i, v in enumerate(values)]


def _input_label(k: int, has_base: bool) -> str:
    """How an error names input ``k`` of ``[base, *tensors]`` (or of ``tensors``)."""
    if has_base:
        return "base" if k == 0 else f"tensors[{k - 1}]"
    return f"tensors[{k}]"


def _out_dtype(out_dtype: torch.dtype | str | None, default: torch.dtype,
               name: str) -> torch.dtype:
    """The output dtype asked for (a dtype or a name), checked: bfloat16, float16, float32 or
    float64 (computed by the float64 reference backend)."""
    if isinstance(out_dtype, str) and out_dtype.lower().removeprefix("torch.") in (
            "float64", "double", "fp64"):
        dtype = torch.float64
    else:
        try:
            dtype = parse_dtype(out_dtype) or default
        except ValueError as exc:
            raise MergeTypeError(f"tensor {name!r}: out_dtype: {exc}") from None
    if not isinstance(dtype, torch.dtype) or dtype not in OUT_DTYPES:
        raise MergeTypeError(f"tensor {name!r}: out_dtype {dtype} is not supported (bfloat16, "
                             "float16, float32 or float64)")
    return dtype


def _rescale_mode(rescale: bool | str | None) -> str | None:
    if rescale in (None, False):
        return None
    if rescale is True or rescale == "l1":
        return "l1"
    if rescale == "inverse_density":
        return "inverse_density"
    raise MergeError(f"rescale must be true, false, 'l1' or 'inverse_density', not {rescale!r}")


def make_job(
    method: str,
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    weights: Floats | None = None,
    densities: Floats | None = 1.0,
    gammas: Floats | None = 0.01,
    normalize: bool | None = None,
    lambda_: float = 1.0,
    rescale: bool | str | None = None,
    t: float = 0.0,
    scale: float | None = None,
    seed: int = 0,
    name: str = "tensor",
    out_dtype: torch.dtype | str | None = None,
) -> MergeJob:
    """Validate the arguments of one merge and resolve the method's defaults into a job."""
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; known: {', '.join(METHODS)}")
    traits = METHODS[method]
    tensors = list(tensors)
    if traits.needs_base and base is None:
        raise MergeError(f"tensor {name!r}: {method} needs a base tensor")
    if not tensors:
        raise MergeError(f"tensor {name!r}: {method} needs at least one input tensor")
    everything = ([base] if base is not None else []) + tensors
    first = everything[0]
    first_label = _input_label(0, base is not None)
    for k, tensor in enumerate(everything):
        label = _input_label(k, base is not None)
        if not isinstance(tensor, torch.Tensor):
            raise MergeTypeError(f"tensor {name!r}: {label} is a {type(tensor).__name__}, "
                                 "not a tensor")
        if tensor.dtype not in OUT_DTYPES:
            raise MergeTypeError(f"tensor {name!r}: {label} has dtype {tensor.dtype}; merges "
                                 "take bfloat16, float16, float32 or float64 tensors")
        if tensor.device.type == "meta":
            raise MergeError(f"tensor {name!r}: {label} is on the meta device (it has no data)")
        if tensor.shape != first.shape:
            raise MergeError(
                f"tensor {name!r}: {label} has shape {tuple(tensor.shape)}, "
                f"{first_label} has {tuple(first.shape)}"
            )
        if tensor.device != first.device:
            raise MergeError(f"tensor {name!r}: {first_label} is on {first.device}, {label} on "
                             f"{tensor.device}")
    work_dtype = first.dtype
    for tensor in everything[1:]:
        work_dtype = torch.promote_types(work_dtype, tensor.dtype)
    everything = [t_.detach().to(work_dtype).contiguous() for t_ in everything]
    if base is not None:
        base, tensors = everything[0], everything[1:]
    else:
        tensors = everything
    n = len(tensors)
    job = MergeJob(
        method=method,
        base=base,
        xs=tensors,
        out_dtype=_out_dtype(out_dtype, first.dtype, name),
        normalize=traits.default_normalize if normalize is None else bool(normalize),
        lam=_finite(lambda_, "lambda", name),
        rescale=_rescale_mode(traits.default_rescale if rescale is None else rescale),
        t=_finite(t, "t", name),
        scale=None if scale is None else _finite(scale, "scale", name),
        seed=int(seed),
        name=name,
    )
    if method == "slerp" and n != 1:
        raise MergeError(f"tensor {name!r}: slerp merges exactly two tensors")
    if method == "passthrough" and n != 1:
        raise MergeError(f"tensor {name!r}: passthrough takes exactly one tensor")
    if traits.combine in ("linear", "sum", "elect"):
        job.weights = _per_model(weights, n, "weight", name)
        job.densities = _per_model(densities, n, "density", name)
        job.gammas = _per_model(gammas, n, "gamma", name)
    if traits.sparsify is not None:
        for i, density in enumerate(job.densities):
            if density < 0:
                raise MergeError(f"tensor {name!r}: density[{i}] is {density}, a density is "
                                 "at least 0")
    if traits.combine == "linear" and job.normalize and weights_cancel(job.weights):
        raise MergeError(f"tensor {name!r}: linear with normalize needs a non-zero weight sum "
                         f"(the weights {job.weights} sum to 0; set normalize=False)")
    return job


def nonfinite_counts(tensors: Sequence[torch.Tensor]) -> list[int]:
    """How many NaN/Inf values each tensor holds: one C++ pass over the contiguous CPU tensors
    of the kernel dtypes (when the extension is built), torch for the rest."""
    counts: list[int | None] = [None] * len(tensors)
    native = [k for k, t in enumerate(tensors)
              if t.device.type == "cpu" and t.dtype in KERNEL_DTYPES and t.is_contiguous()]
    prims = dispatch.load_backend("cpu") if native else None
    if prims is not None:
        for k, c in zip(native, prims.count_nonfinite_many([tensors[k] for k in native])):
            counts[k] = c
    rest: dict[torch.device, list[int]] = {}
    for k, c in enumerate(counts):
        if c is None and tensors[k].is_floating_point():
            rest.setdefault(tensors[k].device, []).append(k)
    for ks in rest.values():
        # one read-back per device (on a GPU, each int() would wait for the stream)
        found = torch.stack([(~torch.isfinite(tensors[k])).sum() for k in ks]).tolist()
        for k, v in zip(ks, found):
            counts[k] = int(v)
    return [c if c is not None else 0 for c in counts]


def _check_finite(jobs: Sequence[MergeJob], outs: Sequence[torch.Tensor],
                  known: Sequence[NonFiniteCounts]) -> None:
    """Raise NonFiniteError when an output or an input holds NaN/Inf, naming the input.

    Outputs are always checked. Inputs are checked where the output is not finite, and
    always for the sparsifying methods (TIES, DARE, breadcrumbs): they can drop a NaN/Inf
    delta entry (trimmed, randomly dropped, or outvoted in the sign election) and still give
    a finite output, which would hide a corrupt input. ``known`` holds what the kernels
    already counted in their own pass (the C++ backend counts outputs and deltas); only the
    rest is counted here, with one extra pass."""
    unknown = [k for k, c in enumerate(known) if c.output is None]
    counted = dict(zip(unknown, nonfinite_counts([outs[k] for k in unknown])))
    for k, (job, facts) in enumerate(zip(jobs, known)):
        bad_out = facts.output if facts.output is not None else counted[k]
        if bad_out == 0 and (job.traits.sparsify is None or facts.deltas == 0):
            continue
        inputs = ([("base", job.base)] if job.base is not None else []) + [
            (f"tensors[{i}]", x) for i, x in enumerate(job.xs)
        ]
        for k, ((label, tensor), bad) in enumerate(
                zip(inputs, nonfinite_counts([t for _, t in inputs]))):
            if bad:
                raise NonFiniteError(
                    f"tensor {job.name!r}: {label} has {bad} NaN/Inf value(s) out of {tensor.numel()}",
                    tensor=job.name, input_index=k, count=bad, numel=tensor.numel())
        if bad_out == 0:
            continue
        raise NonFiniteError(
            f"tensor {job.name!r}: the {job.method} merge produced NaN/Inf from finite inputs "
            f"({bad_out} value(s)); check its parameters", tensor=job.name)


def merge_many(
    jobs: Sequence[MergeJob],
    *,
    outs: Sequence[torch.Tensor] | None = None,
    check_finite: bool = True,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """Compute many jobs, grouped by backend, each group in one batched backend call.

    ``outs``: optional preallocated outputs (one per job, of the job's shape, ``out_dtype``
    and device) to write into; a non-contiguous one is filled from a contiguous result.
    ``backend``: run every job on this backend instead of the dispatch table's choice.
    No autograd: outputs never carry a graph (the kernels have no backward).
    """
    with torch.no_grad():
        if outs is None:
            return _merge_many(jobs, None, check_finite, backend)
        outs = _checked_outs(jobs, outs)
        staged = [o if o.is_contiguous() else torch.empty(o.shape, dtype=o.dtype,
                                                         device=o.device) for o in outs]
        results = _merge_many(jobs, staged, check_finite, backend)
        for given, result in zip(outs, results):
            if given is not result:
                given.copy_(result)
        return outs


def _checked_outs(jobs: Sequence[MergeJob], outs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``outs`` as a list, each checked against its job (shape, dtype, device)."""
    outs = list(outs)
    if len(outs) != len(jobs):
        raise MergeError(f"outs has {len(outs)} tensors for {len(jobs)} jobs")
    for k, (job, out) in enumerate(zip(jobs, outs)):
        ref = job.base if job.base is not None else job.xs[0]
        if not isinstance(out, torch.Tensor):
            raise MergeTypeError(f"tensor {job.name!r}: outs[{k}] is a {type(out).__name__}, "
                                 "not a tensor")
        if out.shape != ref.shape or out.dtype != job.out_dtype or out.device != ref.device:
            raise MergeError(
                f"tensor {job.name!r}: outs[{k}] is {tuple(out.shape)} {out.dtype} on "
                f"{out.device}; the merge gives {tuple(ref.shape)} {job.out_dtype} on "
                f"{ref.device}")
    return outs


def _merge_many(jobs: Sequence[MergeJob], outs: list[torch.Tensor] | None, check_finite: bool,
                backend: str | None) -> list[torch.Tensor]:
    groups: dict[str, list[int]] = defaultdict(list)
    for k, job in enumerate(jobs):
        ref = job.base if job.base is not None else job.xs[0]
        name = backend or dispatch.backend_name(job.method, ref.device, ref.dtype,
                                                job.out_dtype)
        if name != "reference" and torch.float64 in (ref.dtype, job.out_dtype):
            raise MergeTypeError(f"tensor {job.name!r}: backend {name!r} reads and writes "
                                 "bfloat16, float16 and float32; float64 tensors are the "
                                 "reference backend's")
        groups[name].append(k)
    results: list[torch.Tensor | None] = [None] * len(jobs)
    known = [NonFiniteCounts() for _ in jobs]
    for name, indices in groups.items():
        given = [outs[k] for k in indices] if outs is not None else None
        counts = [known[k] for k in indices]
        computed = dispatch.implementation(name)([jobs[k] for k in indices], given, counts)
        for k, out in zip(indices, computed):
            results[k] = out
    if check_finite:
        _check_finite(jobs, results, known)
    return results  # type: ignore[return-value]


# ----- one output tensor ----------------------------------------------------------------------


def linear(tensors: Sequence[torch.Tensor], weights: Floats, *, normalize: bool = True,
           out_dtype: torch.dtype | str | None = None, name: str = "tensor") -> torch.Tensor:
    """``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize``."""
    return merge_many([make_job("linear", None, tensors, weights=weights, normalize=normalize,
                                out_dtype=out_dtype, name=name)])[0]


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Floats, *,
                    normalize: bool = False, lambda_: float = 1.0,
                    out_dtype: torch.dtype | str | None = None, name: str = "tensor") -> torch.Tensor:
    """``base + lambda * sum_i w_i (x_i - base)`` (divided by ``sum w`` with ``normalize``)."""
    return merge_many([make_job("task_arithmetic", base, tensors, weights=weights,
                                normalize=normalize, lambda_=lambda_, out_dtype=out_dtype,
                                name=name)])[0]


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *,
          out_dtype: torch.dtype | str | None = None, name: str = "tensor") -> torch.Tensor:
    """Spherical interpolation over the flattened tensors; ``t = 0`` gives ``a``."""
    return merge_many([make_job("slerp", a, [b], t=t, out_dtype=out_dtype, name=name)])[0]


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Floats,
         densities: Floats = 1.0, *, normalize: bool = True, lambda_: float = 1.0,
         rescale: bool | str = False, out_dtype: torch.dtype | str | None = None,
         name: str = "tensor") -> torch.Tensor:
    """TIES: trim each delta to its top ``int(p_i n)`` magnitudes, elect signs, disjoint mean."""
    return merge_many([make_job("ties", base, tensors, weights=weights, densities=densities,
                                normalize=normalize, lambda_=lambda_, rescale=rescale,
                                out_dtype=out_dtype, name=name)])[0]


def dare_linear(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Floats,
                densities: Floats, *, seed: int = 0, name: str = "tensor",
                normalize: bool = False, lambda_: float = 1.0, rescale: bool | str = True,
                out_dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """DARE drop (keep with probability p, keyed by seed/name/model) + rescale + weighted sum."""
    return merge_many([make_job("dare_linear", base, tensors, weights=weights,
                                densities=densities, normalize=normalize, lambda_=lambda_,
                                rescale=rescale, seed=seed, name=name, out_dtype=out_dtype)])[0]


def dare_ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Floats,
              densities: Floats, *, seed: int = 0, name: str = "tensor",
              normalize: bool = False, lambda_: float = 1.0, rescale: bool | str = True,
              out_dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """DARE drop + rescale, combined with TIES sign election and disjoint merge."""
    return merge_many([make_job("dare_ties", base, tensors, weights=weights,
                                densities=densities, normalize=normalize, lambda_=lambda_,
                                rescale=rescale, seed=seed, name=name, out_dtype=out_dtype)])[0]


def breadcrumbs(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Floats,
                densities: Floats, gammas: Floats = 0.01, *, normalize: bool = False,
                lambda_: float = 1.0, rescale: bool | str = False,
                out_dtype: torch.dtype | str | None = None, name: str = "tensor") -> torch.Tensor:
    """Drop the top ``gamma`` and keep the next ``density`` of each delta; weighted sum."""
    return merge_many([make_job("breadcrumbs", base, tensors, weights=weights,
                                densities=densities, gammas=gammas, normalize=normalize,
                                lambda_=lambda_, rescale=rescale, out_dtype=out_dtype,
                                name=name)])[0]


def breadcrumbs_ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Floats,
                     densities: Floats, gammas: Floats = 0.01, *, normalize: bool = False,
                     lambda_: float = 1.0, rescale: bool | str = False,
                     out_dtype: torch.dtype | str | None = None,
                     name: str = "tensor") -> torch.Tensor:
    """Breadcrumbs trimming combined with TIES sign election and disjoint merge."""
    return merge_many([make_job("breadcrumbs_ties", base, tensors, weights=weights,
                                densities=densities, gammas=gammas, normalize=normalize,
                                lambda_=lambda_, rescale=rescale, out_dtype=out_dtype,
                                name=name)])[0]


def passthrough(tensor: torch.Tensor, scale: float | None = None, *,
                out_dtype: torch.dtype | str | None = None, name: str = "tensor") -> torch.Tensor:
    """The tensor itself, optionally multiplied by ``scale``."""
    return merge_many([make_job("passthrough", None, [tensor], scale=scale, out_dtype=out_dtype,
                                name=name)])[0]


# ----- many output tensors in one call --------------------------------------------------------


def batched(method: str, bases: Sequence[torch.Tensor | None] | None,
            tensor_lists: Sequence[Sequence[torch.Tensor]], **params: Any) -> list[torch.Tensor]:
    """One merge per entry of ``tensor_lists`` (with ``bases[j]``), all run in one batched call.

    Each keyword parameter is either one value for every entry or a list with one value per
    entry (a per-model parameter given per entry is then a list of lists). ``names`` gives
    each entry's tensor name (it keys the DARE stream and names tensors in errors).
    """
    count = len(tensor_lists)
    names = params.pop("names", None) or [f"tensor{j}" for j in range(count)]
    for what, given in (("names", names), ("bases", bases)):
        if given is not None and len(given) != count:
            raise MergeError(f"{what!r} has {len(given)} entries for {count} merges")
    per_model = {"weights", "densities", "gammas"}
    jobs = []
    for j in range(count):
        kwargs = {}
        for key, value in params.items():
            if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 1:
                value = value.tolist()  # one value per merge (or per model)
            is_list = isinstance(value, (list, tuple))
            if is_list and (key not in per_model or (value and isinstance(value[0], (list, tuple)))):
                if len(value) != count:
                    raise MergeError(f"{key!r} has {len(value)} entries for {count} merges")
                value = value[j]
            kwargs[key] = value
        base = bases[j] if bases is not None else None
        jobs.append(make_job(method, base, tensor_lists[j], name=names[j], **kwargs))
    return merge_many(jobs)


def slerp_batched(a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor],
                  t: float | Sequence[float], **params: Any) -> list[torch.Tensor]:
    """``slerp(a_list[j], b_list[j], t[j])`` for every j, in one batched call."""
    if len(a_list) != len(b_list):
        raise MergeError(f"slerp_batched: {len(a_list)} tensors a and {len(b_list)} tensors b")
    return batched("slerp", a_list, [[b] for b in b_list], t=t, **params)
