"""GPU throughput of the Triton backend's primitives and composed merges (needs CUDA).

Bytes counted per case = every input tensor read once + the output written once (the floor
for that operation); GB/s = bytes / median time; "% copy" compares with a device-to-device
copy of the same dtype and size (bytes read + written). Times are medians of
``triton.testing.do_bench`` (CUDA events) after a warm-up that also compiles the kernels.
Composed merges (``slerp``, ``ties``, ``dare_ties`` ...) run ``mergecore.composed`` on the
Triton primitives, host synchronisations included.

Usage: ``python bench/gpu_primitives.py [--n 67108864] [--variants] [--out FILE]``.
The git revision is read from ``MERGECORE_GIT_REV`` or ``git rev-parse HEAD``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton
from triton.testing import do_bench

from mergecore import composed, rng
from mergecore.backends import triton as tb
from mergecore.backends.spec import (
    KeepAll,
    KeepRandom,
    KeepTop,
    SelectJob,
)
from mergecore.ops import make_job
from triton_kernels import _config
from triton_kernels import select as tsel


def git_rev() -> str:
    rev = os.environ.get("MERGECORE_GIT_REV")
    if rev:
        return rev
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timed(fn) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=25, rep=120, return_mode="median")


def check_select_64m(base, x, k) -> str:
    """The 64M-element selection equals a stable-sort oracle (computed on the GPU)."""
    key = (x.float() - base.float()).abs().view(torch.int32)
    order = torch.sort(key, descending=True, stable=True).indices
    last = int(order[k - 1])
    t = int(key[last])
    kept_t = int((key[order[:k]] == t).sum())
    all_t = int((key == t).sum())
    want = (t, key.numel() if kept_t == all_t else last + 1)
    got = tuple(tb.select_top(base, x, [k])[0])
    return "exact" if got == want else f"MISMATCH got {got} want {want}"


def run(n: int, rows: list, tag: str = "") -> dict[str, float]:
    dev = "cuda"
    dt = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    base = (torch.randn(n, device=dev, generator=g) * 0.02).to(dt)
    x1 = (base.float() + torch.randn(n, device=dev, generator=g) * 1e-3).to(dt)
    x2 = (base.float() + torch.randn(n, device=dev, generator=g) * 1e-3).to(dt)
    out = torch.empty(n, device=dev, dtype=dt)
    tensor_bytes = n * 2
    k = n // 2

    copy_ms = timed(lambda: out.copy_(x1))
    copy_gbs = 2 * tensor_bytes / copy_ms / 1e6
    results = {"copy": copy_gbs}
    rows.append((f"{tag}d2d copy (roof)", copy_ms, 2, copy_gbs))

    def case(name, fn, ntensors):
        ms = timed(fn)
        gbs = ntensors * tensor_bytes / ms / 1e6
        results[name] = gbs
        rows.append((f"{tag}{name}", ms, ntensors, gbs))

    tops = tb.select_top_many([SelectJob(base, x1, [k]), SelectJob(base, x2, [k])])
    masks_top = [KeepTop(t[0]) for t in tops]
    rnd = [KeepRandom(rng.threshold24(0.5), *rng.dare_key(1, "w", i)) for i in range(2)]

    case("slerp_reduce", lambda: tb.slerp_reduce(base, x1), 2)
    case("lerp2", lambda: tb.lerp2(out, base, x1, 0.7, 0.3), 3)
    case("select_top (1 model)", lambda: tb.select_top(base, x1, [k]), 2)
    case("select_top_many (2 models, shared base)",
         lambda: tb.select_top_many([SelectJob(base, x1, [k]), SelectJob(base, x2, [k])]), 3)
    case("masked_l1 (random mask)", lambda: tb.masked_l1(base, x1, rnd[0]), 2)
    case("combine linear (2 models)",
         lambda: tb.combine(out, None, [x1, x2], [KeepAll(), KeepAll()], [0.5, 0.5], [1, 1],
                            "sum", False, 1.0), 3)
    case("combine task_arith (2 models)",
         lambda: tb.combine(out, base, [x1, x2], [KeepAll(), KeepAll()], [0.5, 0.5], [1, 1],
                            "sum", False, 1.0), 4)
    case("combine ties elect (2 models)",
         lambda: tb.combine(out, base, [x1, x2], masks_top, [1.0, 1.0], [1.0, 1.0], "elect",
                            True, 1.0), 4)
    case("combine dare elect (2 models)",
         lambda: tb.combine(out, base, [x1, x2], rnd, [2.0, 2.0], [1.0, 1.0], "elect",
                            False, 1.0), 4)

    jobs = {
        "slerp": make_job("slerp", base, [x1], t=0.3, out_dtype=dt),
        "linear": make_job("linear", None, [x1, x2], weights=[0.5, 0.5], out_dtype=dt),
        "task_arithmetic": make_job("task_arithmetic", base, [x1, x2], weights=[0.5, 0.5],
                                    out_dtype=dt),
        "ties": make_job("ties", base, [x1, x2], weights=[1.0, 1.0], densities=[0.5, 0.5],
                         out_dtype=dt),
        "dare_ties": make_job("dare_ties", base, [x1, x2], weights=[1.0, 1.0],
                              densities=[0.5, 0.5], seed=1, name="w", out_dtype=dt),
        "breadcrumbs": make_job("breadcrumbs", base, [x1, x2], weights=[1.0, 1.0],
                                densities=[0.5, 0.5], gammas=0.01, out_dtype=dt),
    }
    width = {"slerp": 3, "linear": 3, "task_arithmetic": 4, "ties": 4, "dare_ties": 4,
             "breadcrumbs": 4}
    for name, job in jobs.items():
        case(f"composed {name}", lambda job=job: composed.merge_jobs(tb, [job], [out]),
             width[name])
    return results


VARIANTS = (
    {"COMBINE_BLOCK": 2048, "COMBINE_WARPS": 8, "SELECT_BLOCK": 1024, "SELECT_WARPS": 4,
     "REDUCE_BLOCK": 2048, "REDUCE_WARPS": 4, "SAMPLE_MAX": 16384},
)


def profile(n: int, path: str | None) -> list[str]:
    """GPU time per kernel (torch.profiler) for one call of the composed merges."""
    dev, dt = "cuda", torch.bfloat16
    base = (torch.randn(n, device=dev) * 0.02).to(dt)
    x1 = (base.float() + torch.randn(n, device=dev) * 1e-3).to(dt)
    x2 = (base.float() + torch.randn(n, device=dev) * 1e-3).to(dt)
    out = torch.empty(n, device=dev, dtype=dt)
    lines = []
    for name, job in (
        ("ties", make_job("ties", base, [x1, x2], weights=[1.0, 1.0], densities=[0.5, 0.5],
                          out_dtype=dt)),
        ("slerp", make_job("slerp", base, [x1], t=0.3, out_dtype=dt)),
    ):
        for _ in range(3):
            composed.merge_jobs(tb, [job], [out])
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            composed.merge_jobs(tb, [job], [out])
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18,
                                          max_name_column_width=40)
        lines += [f"--- profile: composed {name}", table]
    if path:
        with open(path, "w") as f:
            f.write("\n".join(lines))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=64 * 2**20, help="elements per tensor (bf16)")
    parser.add_argument("--variants", action="store_true", help="also time config variants")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    parser.add_argument("--profile", default=None, help="write a per-kernel profile here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_primitives.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    lines = [
        f"mergecore Triton primitives, {datetime.date.today().isoformat()}",
        (f"device: {props.name} ({props.multi_processor_count} SMs), "
         f"torch {torch.__version__}, triton {triton.__version__}"),
        f"git: {git_rev()}",
        f"n = {args.n} bf16 elements per tensor ({args.n * 2 / 2**20:.0f} MiB)",
    ]
    n = args.n
    g = torch.Generator(device="cuda").manual_seed(5)
    b = (torch.randn(n, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    x = torch.round((b.float() + torch.randn(n, device="cuda", generator=g) * 1e-3) * 4096)
    x = (x / 4096).to(torch.bfloat16)
    lines.append(f"64M select check vs stable-sort oracle (bf16, many ties): "
                 f"{check_select_64m(b, x, n // 3)}")
    del b, x
    rows: list = []
    before = {key: tsel.STATS[key] for key in ("sampled", "fallback", "radix")}
    res = run(n, rows)
    stats = {key: tsel.STATS[key] - before[key] for key in ("sampled", "fallback", "radix")}
    lines.append(f"select paths taken during the run: {stats}")
    if stats["fallback"]:
        lines.append(f"last misses: {tsel.STATS['misses'][-3:]}")
    if args.variants:
        for knobs in VARIANTS:
            saved = {key: getattr(_config, key) for key in knobs}
            for key, value in knobs.items():
                setattr(_config, key, value)
            tag = ",".join(f"{key}={value}" for key, value in knobs.items())
            rows.append((f"--- variant {tag}", 0.0, 0, 0.0))
            run(n, rows, tag="  ")
            for key, value in saved.items():
                setattr(_config, key, value)
    copy = res["copy"]
    lines.append("")
    lines.append(f"{'case':58s} {'ms':>8s} {'tensors':>7s} {'GB/s':>8s} {'% copy':>7s}")
    for name, ms, ntens, gbs in rows:
        if ntens == 0:
            lines.append(name)
            continue
        lines.append(f"{name:58s} {ms:8.3f} {ntens:7d} {gbs:8.0f} {100 * gbs / copy:6.1f}%")
    if args.profile:
        profile(n, args.profile)
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
