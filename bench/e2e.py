"""End-to-end merge benchmark: mergecore vs mergekit-yaml on a generated LLaMA-shaped family.

    python -m bench.e2e --params 1b --methods ties,linear,slerp [--device cuda] [--layers N]

For each method, in one run: an IO floor (read every input file once, write an output of the
merged size with plain file IO), ``mergecore merge`` and ``mergekit-yaml`` (same YAML, same
device), each in its own process with its peak resident memory. Input pages are dropped from
the page cache (POSIX_FADV_DONTNEED) before each run. A thin script over
:mod:`mergecore.benchmark.e2e` (``mergecore bench`` adds per-stage times and the roofs).
Results: a table, and JSON lines appended to bench/results/e2e.jsonl.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import append_results, bench_family, device_name, git_commit, print_table
from mergecore.benchmark import e2e
from mergecore.benchmark.roofs import drop_page_cache
from mergecore.units import parse_size


def quiet_start(files: list[Path], out_root: Path) -> None:
    """Before each timed run: no earlier output left to delete, no dirty page of an earlier
    run still being written back (mergekit does not fsync its output), inputs not cached."""
    for name in ("mc", "mk"):
        shutil.rmtree(out_root / name, ignore_errors=True)
    os.sync()
    drop_page_cache(files)


def io_floor(files: list[Path], out_bytes: int, out_dir: Path) -> float:
    """Seconds to read every input once and write ``out_bytes`` with plain file IO."""
    quiet_start(files, out_dir)
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

    work = Path(args.dir or tempfile.mkdtemp(prefix="mergecore-bench-"))
    fam = bench_family(work, args.params, args.layers)
    dirs = [fam / n for n in e2e.MODEL_NAMES]
    out_root = work / "out"
    out_root.mkdir(exist_ok=True)
    rows = []
    common = {"params": args.params, "layers": args.layers, "device": args.device,
              "device_name": device_name(args.device), "commit": git_commit()}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    max_memory = parse_size(args.max_memory)
    for method in args.methods.split(","):
        cfg_path = e2e.write_config(work, method, dirs)
        cfg = e2e.merge_config(method, *map(str, dirs))
        used = {cfg.get("base_model")} | {m["model"] for m in cfg["models"]}
        inputs = e2e.weight_files([Path(d) for d in used if d])
        in_bytes = sum(f.stat().st_size for f in inputs)
        out_bytes = sum(f.stat().st_size for f in e2e.weight_files(dirs[:1]))
        floor = io_floor(inputs, out_bytes, out_root)
        runs = {"io-floor": {"seconds": floor, "peak_rss_bytes": 0}}
        commands = {"mergecore": e2e.mergecore_command(cfg_path, out_root / "mc", args.device,
                                                       max_memory)}
        if not args.no_mergekit:
            commands["mergekit"] = e2e.mergekit_command(cfg_path, out_root / "mk", args.device)
        for impl, cmd in commands.items():
            quiet_start(inputs, out_root)
            runs[impl] = e2e.run_command(cmd, env)
        quiet_start(inputs, out_root)
        for impl, run in runs.items():
            seconds = run["seconds"]
            rows.append(dict(common, method=method, impl=impl, seconds=seconds,
                             input_gbps=in_bytes / seconds / 1e9,
                             peak_rss_gb=run["peak_rss_bytes"] / 1e9, vs_io_floor=seconds / floor,
                             speedup_vs_mergekit=(runs["mergekit"]["seconds"] / seconds
                                                  if "mergekit" in runs else None)))
    print(f"\n{common['device_name']}  commit {common['commit']}  family {args.params}"
          f" layers={args.layers or 'all'}")
    print_table(rows, ["method", "impl", "seconds", "input_gbps", "vs_io_floor",
                       "speedup_vs_mergekit", "peak_rss_gb"])
    if args.results:
        print(f"results appended to {append_results(args.results, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
