"""Multi-stage recipe benchmark: the lzlv-shaped three-stage recipe, fused vs stage by stage.

    python -m bench.recipes [--params 1b] [--layers N] [--device cuda] [--dir DIR]

The recipe (lzlv_70B's shape): comp1 = SLERP of A x B with t gradient [0.25, 0.3, 0.5];
comp2 = SLERP of B x C with t gradient [0.4, 0.3, 0.25]; final = SLERP of comp1 x comp2,
t = 0.5. A, B, C are three fine-tunes of a generated LLaMA-shaped family
(``mergecore.synthetic.make_bench_family``, bf16).

In one run, side by side, each in its own process (wall time and peak RSS from wait4):

- ``mergecore``: ``mergecore merge recipe.yml OUT``: one fused pass, no intermediate on disk;
  bytes read and written are the pipeline's own counters;
- ``mergekit``: three ``mergekit-yaml`` runs, one per stage, the intermediates written to
  disk and read back (what ``mergekit-multi`` does); bytes read = the safetensors files of
  each stage's inputs (mergekit loads every tensor of them), written = each stage's output
  files.

With three inputs of equal size S, the stage-by-stage runs move 9 S (read 6 S, write 3 S) and
the fused run 4 S (read 3 S, write S): 2.25x is the most any single pass can save here.

Input pages are dropped from the page cache before each process starts (where the kernel
honours POSIX_FADV_DONTNEED). Results: a table with the ratios, and JSON lines appended to
bench/results/recipes.jsonl (machine, commit, date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from bench.common import append_results, bench_family, device_name, git_commit, print_table
from mergecore.benchmark.e2e import run_command
from mergecore.benchmark.e2e import weight_files as model_files
from mergecore.benchmark.roofs import drop_page_cache as drop_cache

T_COMP1 = [0.25, 0.3, 0.5]
T_COMP2 = [0.4, 0.3, 0.25]
T_FINAL = 0.5


def stage_configs(a: str, b: str, c: str, comp1: str = "comp1",
                  comp2: str = "comp2") -> list[dict]:
    """The three documents; ``comp1``/``comp2`` are stage names (fused recipe) or the
    directories the intermediates were written to (stage-by-stage runs)."""
    def slerp(name, x, y, t):
        doc = {"merge_method": "slerp", "base_model": x, "dtype": "bfloat16",
               "models": [{"model": x}, {"model": y}], "parameters": {"t": t}}
        return ({"name": name} if name else {}) | doc
    return [slerp("comp1", a, b, T_COMP1), slerp("comp2", b, c, T_COMP2),
            slerp(None, comp1, comp2, T_FINAL)]


def _files_bytes(dirs) -> int:
    return sum(f.stat().st_size for f in model_files(dirs))


_CHILD = """
import json, sys
from mergecore.merge import MergeOptions, run_merge
opts = MergeOptions(quiet=True, overwrite=True, device=sys.argv[4], max_memory=int(sys.argv[3]))
stats = run_merge(sys.argv[1], sys.argv[2], opts).stats
json.dump(stats.as_dict(), open(sys.argv[5], "w"))
"""


def run_mergecore(recipe: Path, out: Path, inputs: list[Path], device: str,
                  max_memory: int, work: Path) -> dict:
    """The fused run in a child process: wall and peak RSS (VmHWM), bytes from its stats."""
    stats_file = work / "mergecore-stats.json"
    drop_cache(inputs)
    run = run_command([sys.executable, "-c", _CHILD, str(recipe), str(out),
                       str(max_memory), device, str(stats_file)])
    wall, rss = run["seconds"], run["peak_rss_bytes"]
    stats = json.loads(stats_file.read_text())
    return {"seconds": wall, "peak_rss_gb": rss / 1e9, "bytes_read": stats["bytes_read"],
            "bytes_written": stats["bytes_written"], "processes": 1}


def run_mergekit_stages(a: str, b: str, c: str, out_root: Path, device: str) -> dict:
    """Three mergekit-yaml runs with the intermediates on disk; wall is their sum."""
    comp1, comp2, final = out_root / "mk-comp1", out_root / "mk-comp2", out_root / "mk-final"
    docs = stage_configs(a, b, c, str(comp1), str(comp2))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    dev_flags = ["--cuda"] if device.startswith("cuda") else []
    wall, rss, read, written = 0.0, 0, 0, 0
    for doc, out, inputs in zip(docs, (comp1, comp2, final),
                                ([a, b], [b, c], [comp1, comp2])):
        doc = {k: v for k, v in doc.items() if k != "name"}
        cfg = out_root / f"{out.name}.yml"
        cfg.write_text(yaml.safe_dump(doc))
        shutil.rmtree(out, ignore_errors=True)
        drop_cache(model_files(inputs))
        run = run_command([sys.executable, "-m", "mergekit.scripts.run_yaml",
                           str(cfg), str(out), *dev_flags], env=env)
        seconds, peak = run["seconds"], run["peak_rss_bytes"]
        wall += seconds
        rss = max(rss, peak)
        read += _files_bytes(inputs)
        written += _files_bytes([out])
    return {"seconds": wall, "peak_rss_gb": rss / 1e9, "bytes_read": read,
            "bytes_written": written, "processes": 3}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="1b", help="shape preset of mergecore.synthetic.SHAPES")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dir", default=None, help="where the family lives (generated once)")
    p.add_argument("--max-memory", default="1GiB")
    p.add_argument("--no-mergekit", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the merged outputs")
    p.add_argument("--results", default="recipes.jsonl")
    args = p.parse_args(argv)

    from mergecore.units import parse_size

    work = Path(args.dir or tempfile.mkdtemp(prefix="mergecore-bench-"))
    fam = bench_family(work, args.params, args.layers, n_models=4)
    a, b, c = (str(fam / n) for n in ("ft1", "ft2", "ft3"))
    out_root = work / "recipes-out"
    out_root.mkdir(exist_ok=True)
    recipe = work / "lzlv-recipe.yml"
    recipe.write_text(yaml.safe_dump_all(stage_configs(a, b, c), sort_keys=False))

    runs = {"mergecore": run_mergecore(recipe, out_root / "mc-final", model_files([a, b, c]),
                                       args.device, parse_size(args.max_memory), work)}
    if not args.no_mergekit:
        runs["mergekit"] = run_mergekit_stages(a, b, c, out_root, args.device)

    common = {"bench": "recipes", "recipe": "lzlv-3-stage-slerp", "params": args.params,
              "layers": args.layers, "device": args.device,
              "machine": device_name(args.device), "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "input_bytes": _files_bytes([a, b, c])}
    rows = []
    mk = runs.get("mergekit")
    for impl, r in runs.items():
        io = r["bytes_read"] + r["bytes_written"]
        row = dict(common, impl=impl, **r, io_gb=io / 1e9)
        if mk is not None and impl == "mergecore":
            row["bytes_ratio_vs_mergekit"] = (mk["bytes_read"] + mk["bytes_written"]) / io
            row["speedup_vs_mergekit"] = mk["seconds"] / r["seconds"]
        rows.append(row)
    print(f"\n{common['machine']}  commit {common['commit']}  family {args.params}"
          f" layers={args.layers or 'all'}  {common['date']}")
    print_table(rows, ["impl", "processes", "seconds", "bytes_read", "bytes_written", "io_gb",
                       "bytes_ratio_vs_mergekit", "speedup_vs_mergekit", "peak_rss_gb"])
    if not args.keep:
        shutil.rmtree(out_root, ignore_errors=True)
    if args.results:
        print(f"results appended to {append_results(args.results, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
