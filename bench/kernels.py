"""Kernel throughput: every method x backend, next to torch eager, mergekit and a copy roof.

    python -m bench.kernels --elements 64M --dtype bfloat16 [--device cuda] [--backends cpu]

A thin script over :mod:`mergecore.benchmark.kernels` on one flat tensor of ``--elements``
(``mergecore bench`` measures the LLaMA tensor shapes instead). GB/s counts the bytes of the
inputs read once plus the output written once; the copy roof (memcpy on the CPU, a
device-to-device copy on CUDA) is measured in the same run. Results are appended to
bench/results/kernels.jsonl and printed as a table.
"""

from __future__ import annotations

import argparse

from bench.common import append_results, device_name, git_commit, print_table
from mergecore.benchmark import kernels, roofs
from mergecore.dtypes import parse_dtype
from mergecore.units import parse_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--elements", default="64M", type=lambda s: parse_size(
        s.replace("M", "MiB") if s.endswith("M") else s))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backends", default=None, help="comma list (default: cpu on cpu, triton on cuda)")
    p.add_argument("--methods", default=",".join(kernels.METHODS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-mergekit", action="store_true")
    p.add_argument("--results", default="kernels.jsonl", help="file under bench/results/ ('' = none)")
    args = p.parse_args(argv)
    backends = args.backends.split(",") if args.backends else kernels.default_backends(args.device)
    dtype = parse_dtype(args.dtype)
    nbytes = 4 * args.elements * dtype.itemsize
    roof = (roofs.cuda_roofs(nbytes // 2, args.device)["d2d_copy_gbps"]
            if args.device.startswith("cuda") else roofs.memcpy_gbps(nbytes))
    rows = kernels.run_kernels({"flat": (args.elements,)}, dtype, args.device, backends=backends,
                               methods=args.methods.split(","), roof_gbps=roof,
                               repeats=args.repeats, with_mergekit=not args.no_mergekit)
    common = {"elements": args.elements, "device_name": device_name(args.device),
              "commit": git_commit(), "roof_gbps": roof}
    rows = [dict(r, **common) for r in rows]
    print(f"\n{common['device_name']}  commit {common['commit']}  {args.elements} x "
          f"{args.dtype}  copy roof {roof:.1f} GB/s")
    print_table(rows, ["op", "impl", "seconds", "gbps", "roof_share", "speedup_vs_torch_eager",
                       "speedup_vs_mergekit"])
    if args.results:
        print(f"results appended to {append_results(args.results, rows)}")
    return 0 if kernels.all_finite(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
