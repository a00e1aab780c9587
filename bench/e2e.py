"""End-to-end merge benchmark: mergecore vs mergekit-yaml on a generated LLaMA-shaped family.

    python -m bench.e2e --params 1b --methods ties,linear,slerp [--device cuda] [--layers N]

For each method, in one run: an IO floor (read every input file once, write an output of the
merged size with plain file IO), `mergecore merge`, and `mergekit-yaml` (same YAML, same
device), each in its own process with its peak resident memory taken from wait4(). Input
pages are dropped from the page cache (POSIX_FADV_DONTNEED) before each run, so each reads
from the disk where the kernel honours that. Results: a table, and JSON lines appended to
bench/results/e2e.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import append_results, device_name, git_commit, print_table

CONFIGS = {
    "ties": lambda b, f1, f2: {
        "merge_method": "ties", "base_model": b, "dtype": "bfloat16",
        "models": [{"model": f1, "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": f2, "parameters": {"weight": 0.5, "density": 0.3}}]},
    "linear": lambda b, f1, f2: {
        "merge_method": "linear", "dtype": "bfloat16",
        "models": [{"model": f1, "parameters": {"weight": 0.6}},
                   {"model": f2, "parameters": {"weight": 0.4}}]},
    "slerp": lambda b, f1, f2: {
        "merge_method": "slerp", "base_model": b, "dtype": "bfloat16",
        "models": [{"model": b}, {"model": f1}],
        "parameters": {"t": [0.2, 0.5, 0.8]}},
    "task_arithmetic": lambda b, f1, f2: {
        "merge_method": "task_arithmetic", "base_model": b, "dtype": "bfloat16",
        "models": [{"model": f1, "parameters": {"weight": 0.7}},
                   {"model": f2, "parameters": {"weight": 0.3}}]},
    "dare_ties": lambda b, f1, f2: {
        "merge_method": "dare_ties", "base_model": b, "dtype": "bfloat16", "random_seed": 1,
        "models": [{"model": f1, "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": f2, "parameters": {"weight": 0.5, "density": 0.5}}]},
}


def drop_cache(paths) -> None:
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd) if os.access(path, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def model_files(dirs) -> list[Path]:
    return sorted(p for d in dirs for p in Path(d).glob("*.safetensors"))


def _vm_hwm(pid: int) -> int:
    """The process's resident-memory high-water mark (VmHWM) in bytes; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], env=None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes of the child, stderr tail).

    The peak is the child's own VmHWM, polled every 20 ms (it only grows, so the last reading
    is the peak up to the last 20 ms). Not ``wait4``'s ``ru_maxrss``: Linux folds the pre-exec
    high-water mark into it, i.e. this benchmark process's own size, copied by the fork."""
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _vm_hwm(proc.pid))
            time.sleep(0.02)
        wall = time.perf_counter() - start
        err.seek(0)
        tail = err.read()[-4000:]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return wall, peak, tail


def io_floor(files: list[Path], out_bytes: int, out_dir: Path) -> float:
    """Seconds to read every input once and write out_bytes with plain file IO."""
    drop_cache(files)
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    out = out_dir / "io-floor.bin"
    with open(out, "wb", buffering=0) as fh:
        left = out_bytes
        while left > 0:
            left -= fh.write(view[: min(left, len(view))])
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - start
    out.unlink()
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="1b", help="shape preset of mergecore.synthetic.SHAPES")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--methods", default="ties,linear,slerp")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dir", default=None, help="where the family lives (generated once)")
    p.add_argument("--no-mergekit", action="store_true")
    p.add_argument("--max-memory", default="1GiB")
    p.add_argument("--results", default="e2e.jsonl")
    args = p.parse_args(argv)

    from mergecore.synthetic import make_bench_family

    work = Path(args.dir or tempfile.mkdtemp(prefix="mergecore-bench-"))
    fam = work / f"family-{args.params}-{args.layers or 'all'}"
    if not (fam / "ft2" / "config.json").exists():
        t0 = time.perf_counter()
        make_bench_family(fam, params=args.params, layers=args.layers)
        print(f"generated the family in {time.perf_counter() - t0:.1f} s under {fam}")
    base, ft1, ft2 = (str(fam / n) for n in ("base", "ft1", "ft2"))
    out_root = work / "out"
    out_root.mkdir(exist_ok=True)
    rows = []
    common = {"params": args.params, "layers": args.layers, "device": args.device,
              "device_name": device_name(args.device), "commit": git_commit()}
    dev_flags = ["--cuda"] if args.device.startswith("cuda") else []
    for method in args.methods.split(","):
        cfg = CONFIGS[method](base, ft1, ft2)
        cfg_path = work / f"{method}.yml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        inputs = model_files([base, ft1, ft2] if method != "linear" else [ft1, ft2])
        in_bytes = sum(f.stat().st_size for f in inputs)
        out_bytes = sum(f.stat().st_size for f in model_files([base]))
        floor = io_floor(inputs, out_bytes, out_root)
        runs = {"io-floor": (floor, 0)}
        drop_cache(inputs)
        wall, rss, _ = run_measured(
            [sys.executable, "-m", "mergecore", "merge", str(cfg_path), str(out_root / "mc"),
             "--overwrite", "--quiet", "--max-memory", args.max_memory, *dev_flags])
        runs["mergecore"] = (wall, rss)
        if not args.no_mergekit:
            drop_cache(inputs)
            import shutil

            shutil.rmtree(out_root / "mk", ignore_errors=True)
            wall, rss, _ = run_measured(
                [sys.executable, "-m", "mergekit.scripts.run_yaml", str(cfg_path),
                 str(out_root / "mk"), *dev_flags],
                env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
            runs["mergekit"] = (wall, rss)
        for impl, (seconds, rss) in runs.items():
            rows.append(dict(common, method=method, impl=impl, seconds=seconds,
                             input_gbps=in_bytes / seconds / 1e9, peak_rss_gb=rss / 1e9,
                             vs_io_floor=seconds / floor,
                             speedup_vs_mergekit=(runs["mergekit"][0] / seconds
                                                  if "mergekit" in runs else None)))
    print(f"\n{common['device_name']}  commit {common['commit']}  family {args.params}"
          f" layers={args.layers or 'all'}")
    print_table(rows, ["method", "impl", "seconds", "input_gbps", "vs_io_floor",
                       "speedup_vs_mergekit", "peak_rss_gb"])
    if args.results:
        print(f"results appended to {append_results(args.results, rows)}")
    print(json.dumps({"rows": len(rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
