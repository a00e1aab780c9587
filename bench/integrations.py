"""mergecore inside mergekit: the same mergekit API and CLI, mergekit's methods vs mergecore's.

    python -m bench.integrations [--params 1b] [--layers 8] [--device cpu|cuda] [--skip-cli]

Part 1 (end to end): a LLaMA-shaped family (base + 2 fine-tunes, bf16, ``--params``/``--layers``
as in ``mergecore.synthetic.llama_tensor_specs``) is written to disk (``make_bench_family``);
one TIES YAML runs through ``mergekit-yaml``, ``mergecore mergekit-yaml`` (mergekit's CLI with
mergecore's methods) and ``mergecore merge`` (mergecore's own pipeline), each in its own
process, timed with peak RSS (``mergecore.benchmark.e2e.run_command``), with the input pages dropped from
the page cache before each run.

Part 2 (in memory): a family of the same shape is built in memory on ``--device``; then
``mergekit.merge_methods.merge_state_dicts(models, method, base=0, parameters=TIES)`` runs once
with ``mergekit.merge_methods.get("ties")`` and once with
``mergecore.integrations.mergekit.method("ties")``, in the same process, and the outputs are
compared by docs/semantics.md's rule (share of elements within 1 ulp, >= 95% for TIES).

Results: a table and JSON lines appended to bench/results/integrations.jsonl.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.common import append_results, device_name, git_commit, print_table, sync
from mergecore.benchmark.e2e import run_command
from mergecore.benchmark.e2e import weight_files as model_files
from mergecore.benchmark.roofs import drop_page_cache as drop_cache

TIES = {"weight": [1.0, 0.5], "density": [0.5, 0.3]}


def _draw(pool: torch.Tensor, offset: int, shape: tuple[int, ...], device: str) -> torch.Tensor:
    """N(0, 1) values of ``shape``: the pool rotated by ``offset``, tiled (drawing 1e9 fresh
    variates takes minutes on two cores)."""
    n = math.prod(shape)
    return pool.roll(offset).repeat(-(-n // pool.numel()))[:n].view(shape).to(device)


def build_family(params: str, layers: int | None, device: str, seed: int = 0):
    """Three state dicts (base, ft1, ft2) in bf16 on ``device``: base 0.02 N(0, 1) (norms
    1 + 0.1 N(0, 1)), fine-tunes base + deltas of mixed size with 20% exact zeros."""
    from mergecore.synthetic import llama_tensor_specs

    gen = torch.Generator(device="cpu").manual_seed(seed)
    pool = torch.randn(1 << 22, generator=gen)
    models: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    for name, shape in llama_tensor_specs(params, layers):
        base = (1 + 0.1 * _draw(pool, 1, shape, device)) if len(shape) == 1 else (
            0.02 * _draw(pool, 7, shape, device))
        models[0][name] = base.to(torch.bfloat16)
        for m, offset in ((1, 1234567), (2, 7654321)):
            delta = 0.0005 * _draw(pool, offset, shape, device) * (
                1 + 3 * _draw(pool, offset * 3, shape, device).abs())
            zero = _draw(pool, offset * 5, shape, device) > 0.84
            delta = torch.where(zero, torch.zeros_like(delta), delta)
            models[m][name] = (base + delta).to(torch.bfloat16)
            del delta
        del base
    return models


def in_memory(args, common: dict) -> list[dict]:
    from mergekit.merge_methods import get, merge_state_dicts

    import mergecore.integrations.mergekit as mc
    from mergecore.testing.mergekit_harness import compare_outputs

    t0 = time.perf_counter()
    models = build_family(args.params, args.layers, args.device)
    n_params = sum(t.numel() for t in models[0].values())
    in_bytes = sum(t.numel() * t.element_size() for m in models for t in m.values())
    print(f"built {n_params / 1e9:.2f}e9-parameter family x3 on {args.device} "
          f"in {time.perf_counter() - t0:.1f} s")
    rows, outputs = [], {}
    for impl, method, repeats in (("mergecore", mc.method("ties"), args.repeats),
                                  ("mergekit", get("ties"), args.mergekit_repeats)):
        times = []
        for _ in range(repeats):
            outputs.pop(impl, None)
            sync(args.device)
            start = time.perf_counter()
            outputs[impl] = merge_state_dicts(models, method, base=0, parameters=TIES)
            sync(args.device)
            times.append(time.perf_counter() - start)
            print(f"  merge_state_dicts({impl} ties): {times[-1]:.2f} s")
        seconds = sorted(times)[len(times) // 2]
        rows.append(dict(common, part="merge_state_dicts", method="ties", impl=impl,
                         seconds=seconds, params=n_params, input_gbps=in_bytes / seconds / 1e9,
                         repeats=repeats))
    report = compare_outputs({k: v.cpu() for k, v in outputs["mergecore"].items()},
                             {k: v.cpu() for k, v in outputs["mergekit"].items()},
                             min_within_1ulp=0.95, check=False)
    speedup = rows[1]["seconds"] / rows[0]["seconds"]
    for row in rows:
        row.update(speedup_vs_mergekit=rows[1]["seconds"] / row["seconds"],
                   within_1ulp=report.overall_within_1ulp, parity_ok=report.ok)
    print(f"  speedup {speedup:.1f}x; {report.overall_within_1ulp:.4%} of elements within 1 ulp"
          f" ({'ok' if report.ok else 'PROBLEMS: ' + '; '.join(report.problems[:3])})")
    return rows


def end_to_end(args, common: dict, work: Path) -> list[dict]:
    from mergecore.synthetic import make_bench_family
    from mergecore.testing.mergekit_harness import compare_outputs, mergekit_env

    fam = work / f"family-{args.params}-{args.layers or 'all'}"
    if not (fam / "ft2" / "config.json").exists():
        make_bench_family(fam, params=args.params, layers=args.layers)
    base, ft1, ft2 = (str(fam / n) for n in ("base", "ft1", "ft2"))
    cfg = {"merge_method": "ties", "base_model": base, "dtype": "bfloat16",
           "models": [{"model": ft1, "parameters": {"weight": 1.0, "density": 0.5}},
                      {"model": ft2, "parameters": {"weight": 0.5, "density": 0.3}}]}
    cfg_path = work / "ties.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    inputs = model_files([base, ft1, ft2])
    in_bytes = sum(f.stat().st_size for f in inputs)
    env = mergekit_env()
    if args.device.startswith("cuda"):
        env.pop("CUDA_VISIBLE_DEVICES", None)
    dev = ["--cuda"] if args.device.startswith("cuda") else []
    commands = {
        "mergekit-yaml": [sys.executable, "-m", "mergekit.scripts.run_yaml", *dev],
        "mergecore mergekit-yaml": [sys.executable, "-m", "mergecore", "mergekit-yaml", *dev],
        "mergecore merge": [sys.executable, "-m", "mergecore", "merge", "--quiet", *dev],
    }
    runs = {}
    for impl, cmd in commands.items():
        out = work / "out" / impl.replace(" ", "_")
        shutil.rmtree(out, ignore_errors=True)
        drop_cache(inputs)
        run = run_command([*cmd, str(cfg_path), str(out)], env=env)
        wall, rss = run["seconds"], run["peak_rss_bytes"]
        runs[impl] = (wall, rss, out)
        print(f"  {impl}: {wall:.1f} s, peak RSS {rss / 1e9:.2f} GB")
    rows = []
    for impl, (wall, rss, out) in runs.items():
        report = compare_outputs(out, runs["mergekit-yaml"][2], min_within_1ulp=0.95,
                                 check=False)
        if not report.ok:
            print(f"  {impl} vs mergekit-yaml: " + "; ".join(report.problems[:3]))
        rows.append(dict(common, part="cli", method="ties", impl=impl, seconds=wall,
                         input_gbps=in_bytes / wall / 1e9, peak_rss_gb=rss / 1e9,
                         speedup_vs_mergekit=runs["mergekit-yaml"][0] / wall,
                         within_1ulp=report.overall_within_1ulp, parity_ok=report.ok))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="1b", help="shape preset of mergecore.synthetic.SHAPES")
    p.add_argument("--layers", type=int, default=8,
                   help="decoder layers (default 8: 0.49e9 parameters per model, ~1 GB bf16;"
                        " 22 = the full 1.1e9-parameter preset)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of mergecore (median)")
    p.add_argument("--mergekit-repeats", type=int, default=1)
    p.add_argument("--skip-memory", action="store_true", help="skip the in-memory part")
    p.add_argument("--skip-cli", action="store_true", help="skip the end-to-end CLI part")
    p.add_argument("--dir", default=None, help="work directory for the on-disk family")
    p.add_argument("--results", default="integrations.jsonl")
    args = p.parse_args(argv)
    common = {"params_preset": args.params, "layers": args.layers, "device": args.device,
              "device_name": device_name(args.device), "commit": git_commit(),
              "threads": torch.get_num_threads()}
    rows = []
    # The CLI part runs first: a child's peak RSS (from wait4) includes the RSS of this process
    # at fork time, which the in-memory family would inflate.
    if not args.skip_cli:
        work = Path(args.dir or tempfile.mkdtemp(prefix="mergecore-bench-int-"))
        try:
            rows += end_to_end(args, common, work)
        finally:
            if not args.dir:
                shutil.rmtree(work, ignore_errors=True)
    if not args.skip_memory:
        rows += in_memory(args, common)
    print(f"\n{common['device_name']}  commit {common['commit']}  {args.params} "
          f"layers={args.layers}")
    print_table(rows, ["part", "impl", "seconds", "input_gbps", "speedup_vs_mergekit",
                       "within_1ulp", "parity_ok", "peak_rss_gb"])
    if args.results:
        print(f"results appended to {append_results(args.results, rows)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
