"""``mergecore bench [DIR]``: roofs, kernels, an end-to-end merge and the depth projection.

Order of work: check the arguments, the device and the disk space every step needs; then
measure the roofs, the kernels at the preset's tensor shapes, and the end-to-end merge (with
mergekit next to it on ``--vs mergekit``); with ``--project`` a second merge at twice the
depth checks the projection to the full model. Prints a table, writes the JSON (and a PNG
chart when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mergecore.benchmark import e2e, kernels, projection, report, roofs, shapes
from mergecore.benchmark.timing import device_name, git_commit, require_device
from mergecore.dtypes import parse_dtype
from mergecore.interrupt import handle_termination
from mergecore.units import positive_int, positive_size

QUICK = {"memcpy": 16 << 20, "file": 16 << 20, "cuda": 64 << 20, "repeats": 2}
FULL = {"memcpy": 256 << 20, "file": 1 << 30, "cuda": 1 << 30, "repeats": 3}
PARTS = ("roofs", "kernels", "e2e")


def parse_skip(text: str) -> frozenset[str]:
    """``--skip``: a comma list of :data:`PARTS`; an unknown part is a usage error."""
    skip = frozenset(s.strip() for s in text.split(",") if s.strip())
    unknown = sorted(skip - set(PARTS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown part {', '.join(map(repr, unknown))}; choose from {', '.join(PARTS)}")
    return skip


def parse_shape(text: str) -> str:
    """``--shape``: a preset name of :data:`shapes.PRESETS` (checked even with --quick)."""
    try:
        shapes.preset_key(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown shape {text!r}; choose one of {', '.join(shapes.PRESETS)}") from None
    return text


def parse_kernel_dtype(text: str) -> str:
    """``--dtype``: a dtype name the kernels take (bfloat16, float16, float32 and aliases)."""
    try:
        parse_dtype(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``mergecore`` command line."""
    from mergecore.cli import BENCH_HELP

    p = sub.add_parser("bench", help=BENCH_HELP,
                       description=__doc__.splitlines()[0])
    p.add_argument("dir", nargs="?", default=None,
                   help="work directory on the disk to measure (default: $TMPDIR/mergecore-bench)")
    p.add_argument("--shape", default="llama-7b", type=parse_shape,
                   help=f"model shape preset: {', '.join(shapes.PRESETS)} (default llama-7b)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the generated "
                   "family (embeddings and head are always there; default 2)")
    p.add_argument("--method", default="ties", choices=e2e.METHODS,
                   help="end-to-end merge method (default ties)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--vs", choices=["mergekit"], default=None,
                   help="also run the same merge with mergekit-yaml and print the ratio")
    p.add_argument("--project", action="store_true",
                   help="also merge at 2x --layers, check the projection method, and project "
                        "the full-depth merge")
    p.add_argument("--project-layers", type=positive_int, default=None,
                   help="depth to project to (default: the preset's real depth, 80 for 70B)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run (the tiny shape whatever --shape says, small buffers) that "
                        "checks that everything works")
    p.add_argument("--skip", default="", type=parse_skip, help=f"comma list of parts to skip: {', '.join(PARTS)}")
    p.add_argument("--kernel-methods", default=",".join(kernels.METHODS),
                   help="kernels to measure (default: all)")
    p.add_argument("--backends", default=None,
                   help="comma list of mergecore backends (default: cpu on cpu, triton on cuda)")
    p.add_argument("--dtype", default="bfloat16", type=parse_kernel_dtype,
                   help="kernel benchmark dtype (default bfloat16)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed runs per kernel (default 3, 2 with --quick)")
    p.add_argument("--io-size", type=positive_size, default=None,
                   help="size of the file-read roof's file (default 1GiB, 16MiB with --quick)")
    p.add_argument("--max-memory", type=positive_size, default=None,
                   help="the merge's budget for tensors in flight (default: the merge's "
                        "automatic one, as `mergecore merge` without --max-memory)")
    p.add_argument("--json", default=None, help="JSON output (default: DIR/bench-*.json)")
    p.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    p.add_argument("--keep", action="store_true", help="keep the generated families")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


class _Steps:
    """A tqdm bar over the benchmark's steps (on stderr; off with --quiet)."""

    def __init__(self, total: int, quiet: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="bench", unit="step", disable=True if quiet else None,
                        dynamic_ncols=True, leave=False, file=sys.stderr)
        self.started = False

    def __call__(self, what: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_description(what)

    def close(self) -> None:
        self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


def _plan_layers(args: argparse.Namespace) -> list[int]:
    if args.layers < 1:
        raise ValueError(f"--layers must be >= 1, got {args.layers}")
    return [args.layers, 2 * args.layers] if args.project else [args.layers]


def _check_disk(work: Path, shape: str, layer_runs: list[int], keep: bool, io_size: int,
                parts: set[str], outputs: int) -> None:
    needs = []
    for layers in layer_runs if "e2e" in parts else []:
        exists = e2e.family_ready(e2e.family_dir(work, shape, layers))
        needs.append(e2e.disk_need(shape, layers, family_exists=exists, outputs=outputs))
    need = (sum(needs) if keep else max(needs, default=0)) + (io_size if "roofs" in parts else 0)
    what = (f"{' and '.join(f'{n}-layer' for n in layer_runs)} {shape} families"
            if "e2e" in parts else "the file roof")
    e2e.check_disk(work, need, what)


def _backends(args: argparse.Namespace, device: str) -> list[str]:
    """``--backends`` checked: known backends that run on ``device`` (default: the
    dispatcher's)."""
    from mergecore.dispatch import BACKEND_MODULES, load_backend

    if not args.backends:
        return kernels.default_backends(device)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    for name in names:
        if name not in BACKEND_MODULES:
            raise ValueError(f"--backends: unknown backend {name!r}; choose from "
                             f"{', '.join(sorted(BACKEND_MODULES))}")
        if name == "triton" and not device.startswith("cuda"):
            raise ValueError("--backends triton runs on a GPU: add --device cuda")
        if name != "reference" and load_backend(name) is None:
            raise RuntimeError(f"--backends {name}: that backend is not available here")
    return names


def _check_flags(args: argparse.Namespace, parts: set[str], shape: str,
                 layer_runs: list[int]) -> int | None:
    """Flags that would be ignored, or that make no sense together, are errors before any
    work; returns the projection's target depth (None without ``--project``)."""
    if args.project_layers is not None and not args.project:
        raise ValueError("--project-layers needs --project")
    if not args.project:
        return None
    if "e2e" not in parts:
        raise ValueError("--project needs the end-to-end merges: drop e2e from --skip")
    target = (args.project_layers if args.project_layers is not None
              else shapes.full_depth(shape))
    if target <= layer_runs[-1]:
        given = ("--project-layers" if args.project_layers is not None
                 else f"the {shape} preset's depth")
        raise ValueError(f"--project: {given} ({target}) is not deeper than the "
                         f"{layer_runs[-1]}-layer run it projects from; pass --project-layers "
                         f"above {layer_runs[-1]} (or fewer --layers)")
    return target


def _check_json(path: str | None) -> None:
    """``--json``: a file that can be written (not a directory; its folder creatable)."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"--json {path!r} is a directory; name a file")
    folder = target.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--json {path!r}: {str(folder)!r} is not a writable directory")


def _work_dir(args: argparse.Namespace) -> Path:
    """DIR: the work directory (created), or a clear error naming it."""
    work = Path(args.dir) if args.dir else Path(tempfile.gettempdir()) / "mergecore-bench"
    if work.exists() and not work.is_dir():
        raise ValueError(f"DIR {str(work)!r} is not a directory")
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create the work directory DIR {str(work)!r}: "
                      f"{exc.strerror or exc}") from None
    if not os.access(work, os.W_OK | os.X_OK):
        raise OSError(f"the work directory DIR {str(work)!r} is not writable")
    return work


def run_bench(args: argparse.Namespace, step: Callable[[str], None]) -> dict[str, Any]:
    """Everything ``mergecore bench`` measures, as the JSON-ready result."""
    size = QUICK if args.quick else FULL
    shape = "tiny" if args.quick else args.shape
    shapes.preset_key(shape)
    device = require_device(args.device)
    parts = set(PARTS) - set(args.skip)
    layer_runs = _plan_layers(args)
    target = _check_flags(args, parts, shape, layer_runs)
    unknown = set(filter(None, args.kernel_methods.split(","))) - set(kernels.METHODS)
    if unknown and "kernels" in parts:
        raise ValueError(f"--kernel-methods: unknown {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(kernels.METHODS)}")
    backends = _backends(args, device) if "kernels" in parts else []
    if args.vs == "mergekit" and not e2e.mergekit_available():
        raise RuntimeError("--vs mergekit: mergekit is not installed (pip install mergekit)")
    existed = args.dir is not None and Path(args.dir).is_dir()
    work = _work_dir(args)
    io_size = args.io_size if args.io_size is not None else size["file"]
    try:
        _check_json(args.json)
        _check_disk(work, shape, layer_runs, args.keep, io_size, parts, outputs=1)
    except BaseException:
        if not existed and not any(work.iterdir()):
            work.rmdir()  # made for this run, and nothing in it
        raise
    repeats = args.repeats if args.repeats is not None else size["repeats"]
    result: dict[str, Any] = {"meta": {
        "device": device, "device_name": device_name(device), "commit": git_commit(),
        "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc)
        .strftime("%Y-%m-%dT%H:%M:%SZ"), "shape": shape, "layers": args.layers,
        "method": args.method, "dtype": args.dtype, "dir": str(work), "quick": args.quick,
        "argv": sys.argv[1:], "loadavg_start": os.getloadavg()[0]}}
    found: dict[str, Any] = {}
    if "roofs" in parts:
        step("roofs")
        found = roofs.measure_roofs(work, device, memcpy_bytes=size["memcpy"],
                                    file_bytes=io_size, cuda_bytes=size["cuda"])
        result["roofs"] = found
    if "kernels" in parts:
        cuda = device.startswith("cuda")
        roof = found.get("d2d_copy_gbps" if cuda else "memcpy_gbps")
        if roof is None:
            roof = (roofs.cuda_roofs(size["cuda"], device)["d2d_copy_gbps"] if cuda
                    else roofs.memcpy_gbps(size["memcpy"]))
        result["kernel_roof"] = f"{'d2d copy' if cuda else 'memcpy'} {roof:.1f} GB/s"
        result["kernels"] = kernels.run_kernels(
            shapes.kernel_shapes(shape), parse_dtype(args.dtype), device, backends=backends,
            methods=[m for m in args.kernel_methods.split(",") if m], roof_gbps=roof,
            repeats=repeats, with_mergekit=args.vs == "mergekit", step=step)
    if "e2e" in parts:
        result["e2e"] = [_e2e_run(work, shape, layers, args, device, found, step)
                         for layers in layer_runs]
    if target is not None:
        small, large = result["e2e"]
        result["projection"] = {
            "model": "wall(L') = max_s T_s(L') + F + (R - F) * B(L') / B(L) "
                     "(mergecore.benchmark.projection, docs/benchmarking.md)",
            "check": projection.check(small, large, shape, small["layers"], large["layers"]),
            "full": projection.project(large, shape, large["layers"], target),
        }
    result["meta"]["loadavg_end"] = os.getloadavg()[0]
    return result


def _e2e_run(work: Path, shape: str, layers: int, args: argparse.Namespace, device: str,
             found: dict[str, Any], step: Callable[[str], None]) -> dict[str, Any]:
    step(f"generate {shape} x{layers} layers")
    existed = e2e.family_ready(e2e.family_dir(work, shape, layers))
    config = None
    try:
        dirs, gen_seconds = e2e.ensure_family(work, shape, layers)
        config = e2e.write_config(work, args.method, dirs)
        inputs = e2e.weight_files(dirs)
        step(f"merge {args.method} x{layers} layers")
        out = work / "out-pipeline"
        try:
            stats = e2e.run_pipeline(config, out, device, args.max_memory, inputs)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        run = {"method": args.method, "layers": layers,
               "models": e2e.models_read(args.method, dirs),
               "generate_seconds": gen_seconds, **e2e.stage_table(stats, found, device),
               "inputs_cached_share": stats["inputs_cached_share"],
               "plan_and_files_seconds": stats["command_seconds"] - stats["wall"],
               "peak_budget_bytes": stats["peak_budget_bytes"], "max_memory": args.max_memory,
               "budget_bytes": stats["budget_bytes"], "pipeline_stats": stats}
        run["budget_note"] = e2e.budget_note(run, shape, layers, stats["budget_bytes"])
        if args.vs == "mergekit":
            run["vs_mergekit"] = e2e.compare_commands(config, work, device, args.max_memory,
                                                      inputs, step)
        return run
    finally:
        if not args.keep:
            if config is not None:
                config.unlink(missing_ok=True)  # it names the family, which goes too
            if not existed:
                e2e.remove_family(e2e.family_dir(work, shape, layers))


def _step_count(args: argparse.Namespace) -> int:
    """The progress bar's steps: one per ``step()`` call ``run_bench`` will make."""
    parts = set(PARTS) - set(args.skip)
    count = 1 if "roofs" in parts else 0
    if "kernels" in parts:
        methods = [m for m in args.kernel_methods.split(",") if m]
        count += len(shapes.kernel_shapes("tiny")) * len(methods)
    if "e2e" in parts:
        count += (2 if args.project else 1) * (2 + (2 if args.vs else 0))
    return max(count, 1)


def cmd_bench(args: argparse.Namespace) -> int:
    """The ``bench`` subcommand: run, print, write the JSON, then the chart (SIGTERM stops it
    like Ctrl-C: the generated families and the roof's file are removed)."""
    steps = _Steps(_step_count(args), args.quiet)
    try:
        with handle_termination():
            result = run_bench(args, steps)
    finally:
        steps.close()
    meta = result["meta"]
    stamp = meta["date"].replace(":", "").replace("-", "")
    json_path = Path(args.json) if args.json else (
        Path(meta["dir"]) / f"bench-{meta['shape']}-{meta['device'].replace(':', '')}-{stamp}.json")
    result["meta"]["chart"] = None
    print(report.render(result))
    report.write_json(result, json_path)
    chart, chart_line = _chart(result, json_path.with_suffix(".png"), args.no_chart)
    if chart is not None:
        result["meta"]["chart"] = str(chart)
        report.write_json(result, json_path)
    print(f"\nJSON: {json_path}" + chart_line)
    return 0


def _chart(result: dict[str, Any], path: Path, no_chart: bool) -> tuple[Path | None, str]:
    """Draw the chart unless ``--no-chart``: its path (or None) and the line that says where it
    is or why there is none (empty with ``--no-chart``)."""
    if no_chart:
        return None, ""
    try:
        chart = report.draw_chart(result, path)
    except report.NoChart as exc:
        return None, f"\n(no chart: {exc})"
    return chart, f"\nchart: {chart}"
