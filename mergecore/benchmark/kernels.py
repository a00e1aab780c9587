"""Kernel throughput: every merge method x backend, next to torch eager (and mergekit).

GB/s counts the bytes of the inputs read once plus the output written once (the least any
implementation must move); ``roof_share`` divides it by the copy roof of the device (host
memcpy on the CPU, device-to-device copy on CUDA), both counting bytes read + written.
"torch eager" is a plain fp32 torch implementation written the obvious way; "mergekit" is
mergekit's own ``merge_tensors`` on the same tensors (when installed and asked for).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

import mergecore
from mergecore.benchmark.timing import time_median

METHODS = ("linear", "task_arithmetic", "slerp", "ties", "dare_linear", "dare_ties", "breadcrumbs",
           "breadcrumbs_ties")
WEIGHTS = (0.6, 0.4)
DENSITY = 0.4
GAMMA = 0.01  # breadcrumbs' top fraction dropped (mergecore's default)


def make_inputs(shape: Sequence[int], dtype: torch.dtype, device: str,
                n_models: int = 2) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base tensor ``0.02 N(0,1)`` and ``n_models`` fine-tunes ``base + 1e-3 N(0,1)``."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    base = (0.02 * torch.randn(*shape, generator=gen)).to(dtype)
    xs = [(base.float() + 1e-3 * torch.randn(*shape, generator=gen)).to(dtype)
          for _ in range(n_models)]
    return base.to(device), [x.to(device) for x in xs]


def mergecore_fn(method: str, base: torch.Tensor, xs: list[torch.Tensor],
                 backend: str) -> Callable[[], object]:
    """One merge of ``method`` on ``backend`` into a preallocated output (``.output``)."""
    w = list(WEIGHTS)
    if method == "linear":
        job = mergecore.make_job("linear", None, xs, weights=w)
    elif method == "slerp":
        job = mergecore.make_job("slerp", base, xs[:1], t=0.3)
    elif method == "task_arithmetic":
        job = mergecore.make_job(method, base, xs, weights=w)
    else:
        job = mergecore.make_job(method, base, xs, weights=w, densities=DENSITY, seed=1,
                                 name="bench")
    out = [torch.empty_like(base)]

    def run():
        return mergecore.merge_many([job], outs=out, backend=backend, check_finite=False)

    run.output = out[0]  # what each call writes (the tests compare it)
    return run


def eager_fn(method: str, base: torch.Tensor, xs: list[torch.Tensor]) -> Callable[[], object] | None:
    """Plain torch, fp32 math, written the obvious way (full-tensor kthvalue for the trims,
    torch.rand for DARE's mask: the same work, not the same random stream)."""
    w = WEIGHTS

    def linear():
        return ((w[0] * xs[0].float() + w[1] * xs[1].float()) / sum(w)).to(base.dtype)

    def task_arithmetic():
        b = base.float()
        return (b + w[0] * (xs[0].float() - b) + w[1] * (xs[1].float() - b)).to(base.dtype)

    def slerp():
        a, b = base.float().reshape(-1), xs[0].float().reshape(-1)
        dot = (a @ b) / (a.norm() * b.norm())
        theta = torch.acos(dot.clamp(-1, 1))
        s = torch.sin(theta)
        return (torch.sin(0.7 * theta) / s * a + torch.sin(0.3 * theta) / s * b).to(base.dtype)

    b = base.float().reshape(-1)
    n = b.numel()

    def deltas():
        return [x.float().reshape(-1) - b for x in xs]

    def elect(kept, normalize=False):  # sign election; sum (or mean) of the agreeing deltas
        wd = torch.stack([wi * d for wi, d in zip(w, kept)])
        sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
        agree = wd.sign() == sign
        num = (wd * agree).sum(0)
        if not normalize:
            return (b + num).to(base.dtype)
        den = (torch.tensor(w, device=b.device).view(-1, 1) * agree).sum(0)
        return (b + torch.where(den != 0, num / den, num)).to(base.dtype)

    def weighted_sum(kept):
        return (b + sum(wi * d for wi, d in zip(w, kept))).to(base.dtype)

    def top(d):
        k = int(DENSITY * n)
        thr = d.abs().kthvalue(n - k + 1).values
        return torch.where(d.abs() >= thr, d, 0.0)

    def dare(d):
        kept = torch.where(torch.rand_like(d) < DENSITY, d, 0.0)
        return kept * (d.abs().sum() / kept.abs().sum())

    def crumbs(d):  # drop the top GAMMA fraction, keep the next DENSITY fraction
        mag = d.abs()
        drop, k = int(GAMMA * n), int(DENSITY * n)
        hi = mag.kthvalue(n - drop).values
        lo = mag.kthvalue(n - drop - k + 1).values
        return torch.where((mag >= lo) & (mag <= hi), d, 0.0)

    def ties():
        return elect([top(d) for d in deltas()], normalize=True)

    def dare_linear():
        return weighted_sum([dare(d) for d in deltas()])

    def dare_ties():
        return elect([dare(d) for d in deltas()])

    def breadcrumbs():
        return weighted_sum([crumbs(d) for d in deltas()])

    def breadcrumbs_ties():
        return elect([crumbs(d) for d in deltas()])

    return {"linear": linear, "task_arithmetic": task_arithmetic, "slerp": slerp,
            "ties": ties, "dare_linear": dare_linear, "dare_ties": dare_ties,
            "breadcrumbs": breadcrumbs, "breadcrumbs_ties": breadcrumbs_ties}.get(method)


def mergekit_fn(method: str, base: torch.Tensor, xs: list[torch.Tensor]) -> Callable[[], object] | None:
    """mergekit's ``merge_tensors`` for ``method`` (None when mergekit lacks that API)."""
    try:
        from mergekit.merge_methods.api import merge_tensors
    except ImportError:
        return None
    w = list(WEIGHTS)
    if method == "linear":
        return lambda: merge_tensors(xs, "linear", parameters={"weight": w})
    if method == "slerp":
        return lambda: merge_tensors([base, xs[0]], "slerp", parameters={"t": 0.3}, base_index=0)
    params: dict[str, Any] = {"weight": w}
    if method != "task_arithmetic":
        params["density"] = [DENSITY] * len(xs)
    return lambda: merge_tensors([base, *xs], method, parameters=params, base_index=0)


def bytes_moved(method: str, numel: int, itemsize: int) -> int:
    """Inputs read once + output written once."""
    tensors_read = {"linear": 2, "slerp": 2}.get(method, 3)
    return (tensors_read + 1) * numel * itemsize


def default_backends(device: str) -> list[str]:
    """The backend the dispatcher picks for ``device``."""
    return ["triton"] if device.startswith("cuda") else ["cpu"]


def run_kernels(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: str, *,
                backends: Sequence[str], methods: Sequence[str], roof_gbps: float,
                repeats: int = 5, with_mergekit: bool = False,
                step: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One row per (tensor shape, method, implementation) with seconds, GB/s, roof share and
    the speed-up over torch eager (and mergekit, when measured)."""
    rows: list[dict[str, Any]] = []
    for label, shape in shapes.items():
        base, xs = make_inputs(shape, dtype, device)
        numel = base.numel()
        for method in methods:
            if step is not None:
                step(f"kernel {method} {label}")
            nbytes = bytes_moved(method, numel, base.element_size())
            impls: list[tuple[str, Callable | None]] = [
                (f"mergecore-{b}", mergecore_fn(method, base, xs, b)) for b in backends]
            impls.append(("torch-eager", eager_fn(method, base, xs)))
            if with_mergekit:
                impls.append(("mergekit", mergekit_fn(method, base, xs)))
            seconds: dict[str, float] = {}
            for impl, fn in impls:
                if fn is None:
                    continue
                reps = repeats if impl != "mergekit" else max(1, repeats // 2)
                seconds[impl] = time_median(fn, device, repeats=reps, warmup=1)
            for impl, s in seconds.items():
                gbps = nbytes / s / 1e9
                row = {"op": method, "tensor": label, "shape": list(shape), "impl": impl,
                       "dtype": str(dtype).removeprefix("torch."), "device": device,
                       "seconds": s, "gbps": gbps, "roof_share": gbps / roof_gbps}
                for ref in ("torch-eager", "mergekit"):
                    if ref in seconds and impl != ref:
                        row[f"speedup_vs_{ref.replace('-', '_')}"] = seconds[ref] / s
                rows.append(row)
        del base, xs
    return rows


def all_finite(rows: list[dict[str, Any]]) -> bool:
    """Every measured rate is a finite positive number."""
    return all(math.isfinite(r["gbps"]) and r["gbps"] > 0 for r in rows)
