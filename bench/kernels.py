"""Kernel throughput: every method x backend, next to torch eager, mergekit and a copy roof.

    python -m bench.kernels --elements 64M --dtype bfloat16 [--device cuda] [--backends cpu]

GB/s counts the bytes of the inputs read once plus the output written once. The copy roof
(memcpy on the CPU, device-to-device copy on CUDA) is measured in the same run, and so are
torch eager (a plain fp32 torch implementation) and mergekit 0.1.5's own function on the same
tensors. Results are appended to bench/results/kernels.jsonl and printed as a table.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

import mergecore
from bench.common import (
    append_results,
    copy_roof,
    device_name,
    git_commit,
    print_table,
    time_median,
)
from mergecore.dtypes import parse_dtype
from mergecore.units import parse_size

METHODS = ["linear", "task_arithmetic", "slerp", "ties", "dare_ties", "breadcrumbs"]
WEIGHTS = [0.6, 0.4]
DENSITY = 0.4


def make_inputs(n: int, dtype: torch.dtype, device: str, n_models: int = 2):
    gen = torch.Generator(device="cpu").manual_seed(0)
    base = torch.randn(n, generator=gen).to(dtype)
    xs = [(base.float() + 0.01 * torch.randn(n, generator=gen)).to(dtype) for _ in range(n_models)]
    return base.to(device), [x.to(device) for x in xs]


def mergecore_fn(method: str, base, xs, backend: str) -> Callable[[], object]:
    if method == "linear":
        job = mergecore.make_job("linear", None, xs, weights=WEIGHTS)
    elif method == "slerp":
        job = mergecore.make_job("slerp", base, xs[:1], t=0.3)
    elif method == "task_arithmetic":
        job = mergecore.make_job(method, base, xs, weights=WEIGHTS)
    else:
        job = mergecore.make_job(method, base, xs, weights=WEIGHTS, densities=DENSITY, seed=1,
                                 name="bench")
    out = [torch.empty_like(base)]
    return lambda: mergecore.merge_many([job], outs=out, backend=backend, check_finite=False)


def eager_fn(method: str, base, xs) -> Callable[[], object] | None:
    """Plain torch, fp32 math, written the obvious way (what a user would write)."""
    w = WEIGHTS

    def linear():
        return ((w[0] * xs[0].float() + w[1] * xs[1].float()) / sum(w)).to(base.dtype)

    def task_arithmetic():
        b = base.float()
        return (b + w[0] * (xs[0].float() - b) + w[1] * (xs[1].float() - b)).to(base.dtype)

    def slerp():
        a, b = base.float(), xs[0].float()
        na, nb = a.norm(), b.norm()
        dot = (a @ b) / (na * nb)
        theta = torch.acos(dot.clamp(-1, 1))
        s = torch.sin(theta)
        return (torch.sin(0.7 * theta) / s * a + torch.sin(0.3 * theta) / s * b).to(base.dtype)

    def ties():
        b = base.float()
        deltas = []
        for x in xs:
            d = x.float() - b
            k = int(DENSITY * d.numel())
            thr = d.abs().kthvalue(d.numel() - k + 1).values
            deltas.append(torch.where(d.abs() >= thr, d, 0.0))
        wd = torch.stack([wi * d for wi, d in zip(w, deltas)])
        sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
        agree = (wd.sign() == sign)
        num = (wd * agree).sum(0)
        den = (torch.tensor(w, device=b.device).view(-1, 1) * agree).sum(0)
        return (b + torch.where(den != 0, num / den, num)).to(base.dtype)

    return {"linear": linear, "task_arithmetic": task_arithmetic, "slerp": slerp,
            "ties": ties}.get(method)


def mergekit_fn(method: str, base, xs) -> Callable[[], object] | None:
    try:
        from mergekit.merge_methods.api import merge_tensors
    except ImportError:
        return None
    if method == "linear":
        return lambda: merge_tensors(xs, "linear", parameters={"weight": WEIGHTS})
    if method == "slerp":
        return lambda: merge_tensors([base, xs[0]], "slerp", parameters={"t": 0.3}, base_index=0)
    params = {"weight": WEIGHTS}
    if method != "task_arithmetic":
        params["density"] = [DENSITY, DENSITY]
    return lambda: merge_tensors([base] + xs, method, parameters=params, base_index=0)


def bytes_moved(method: str, n: int, itemsize: int) -> int:
    tensors_read = {"linear": 2, "slerp": 2}.get(method, 3)
    return (tensors_read + 1) * n * itemsize


def run(elements: int, dtype: torch.dtype, device: str, backends: list[str], methods: list[str],
        repeats: int, with_mergekit: bool) -> list[dict]:
    base, xs = make_inputs(elements, dtype, device)
    itemsize = base.element_size()
    roof = copy_roof(4 * elements * itemsize, device)
    rows = []
    common = {"elements": elements, "dtype": str(dtype).removeprefix("torch."), "device": device,
                  "device_name": device_name(device), "commit": git_commit(), "roof_gbps": roof}
    for method in methods:
        nbytes = bytes_moved(method, elements, itemsize)
        impls: list[tuple[str, Callable | None]] = [
            (f"mergecore-{b}", mergecore_fn(method, base, xs, b)) for b in backends]
        impls.append(("torch-eager", eager_fn(method, base, xs)))
        if with_mergekit:
            impls.append(("mergekit", mergekit_fn(method, base, xs)))
        results = {}
        for impl, fn in impls:
            if fn is None:
                continue
            reps = repeats if not impl.startswith("mergekit") else max(1, repeats // 3)
            seconds = time_median(fn, device, repeats=reps, warmup=1)
            results[impl] = seconds
            rows.append(dict(common, method=method, impl=impl, seconds=seconds,
                             gbps=nbytes / seconds / 1e9, roof_share=nbytes / seconds / 1e9 / roof))
        mk = results.get("mergekit")
        for row in rows:
            if row["method"] == method and mk:
                row["speedup_vs_mergekit"] = mk / row["seconds"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--elements", default="64M", type=lambda s: parse_size(s.replace("M", "MiB")
                                                                           if s.endswith("M") else s))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backends", default=None, help="comma list (default: cpu on cpu, triton on cuda)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-mergekit", action="store_true")
    p.add_argument("--results", default="kernels.jsonl", help="file under bench/results/ ('' = none)")
    args = p.parse_args(argv)
    backends = (args.backends.split(",") if args.backends else
                ["triton"] if args.device.startswith("cuda") else ["cpu"])
    rows = run(args.elements, parse_dtype(args.dtype), args.device, backends,
               args.methods.split(","), args.repeats, not args.no_mergekit)
    print(f"\n{rows[0]['device_name']}  commit {rows[0]['commit']}  {args.elements} x "
          f"{args.dtype}  copy roof {rows[0]['roof_gbps']:.1f} GB/s")
    print_table(rows, ["method", "impl", "seconds", "gbps", "roof_share", "speedup_vs_mergekit"])
    if args.results:
        print(f"results appended to {append_results(args.results, rows)}")
    return 0 if all(math.isfinite(r["gbps"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
