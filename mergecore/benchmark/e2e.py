"""End-to-end merges of a generated LLaMA-shaped family: per-stage times, and mergekit.

The family (a base and two fine-tunes, bf16, written by
:func:`mergecore.synthetic.make_bench_family`) lives under the benchmark directory. Before
every merge the inputs' pages are dropped from the page cache (``POSIX_FADV_DONTNEED``), so
each run reads from the disk where the kernel honours that.

:func:`run_pipeline` runs mergecore's merge in this process and reports, from
``PipelineStats``, how long each stage was busy:

- read: positional reads into host buffers (pinned on CUDA), bytes = input bytes;
- transfer (CUDA only): the copy engines' time for host->device and device->host copies,
  from CUDA events, bytes = bytes copied both ways;
- compute: the merge kernels (host thread time), bytes = input + output bytes;
- write: writing output bytes into the shards (after the GPU finished), and finishing the
  output after the last tensor (the last shard's hash, fsync and rename, the side files, the
  index; ``PipelineStats.finish``, which the wall time includes too), bytes = output bytes.

The stages run concurrently; ``overlapped`` = (sum of stage times) - wall, and the stage with
the largest time bounds the run. :func:`run_command` times whole commands (``mergecore merge``
and ``mergekit-yaml``) in child processes, with their peak resident memory.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mergecore.benchmark.roofs import drop_page_cache, resident_fraction
from mergecore.benchmark.shapes import model_bytes, preset_key

MODEL_NAMES = ("base", "ft1", "ft2")
STAGES = ("read", "transfer", "compute", "write")


def merge_config(method: str, base: str, ft1: str, ft2: str) -> dict[str, Any]:
    """The YAML (as a dict) of a ``method`` merge of the family, in bf16."""
    two = [{"model": ft1}, {"model": ft2}]
    configs: dict[str, dict[str, Any]] = {
        "ties": {"base_model": base, "models": [
            {"model": ft1, "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": ft2, "parameters": {"weight": 0.5, "density": 0.3}}]},
        "linear": {"models": [{"model": ft1, "parameters": {"weight": 0.6}},
                              {"model": ft2, "parameters": {"weight": 0.4}}]},
        "slerp": {"base_model": base, "models": [{"model": base}, {"model": ft1}],
                  "parameters": {"t": [0.2, 0.5, 0.8]}},
        "task_arithmetic": {"base_model": base, "models": [
            {"model": ft1, "parameters": {"weight": 0.7}},
            {"model": ft2, "parameters": {"weight": 0.3}}]},
    }
    for dare in ("dare_linear", "dare_ties"):
        configs[dare] = {"base_model": base, "random_seed": 1, "models": [
            {"model": ft1, "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": ft2, "parameters": {"weight": 0.5, "density": 0.5}}]}
    for crumbs in ("breadcrumbs", "breadcrumbs_ties"):
        configs[crumbs] = {"base_model": base, "models": [
            {"model": m["model"], "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.01}}
            for m in two]}
    if method not in configs:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(configs)}")
    return {"merge_method": method, "dtype": "bfloat16", **configs[method]}


METHODS = ("ties", "linear", "slerp", "task_arithmetic", "dare_linear", "dare_ties", "breadcrumbs",
           "breadcrumbs_ties")


def family_dir(root: Path, shape: str, layers: int) -> Path:
    """Where the generated family of ``shape`` with ``layers`` layers lives under ``root``."""
    return Path(root) / f"family-{preset_key(shape)}-{layers}L"


def family_ready(path: Path) -> bool:
    """A family generated to the end (the marker is written last)."""
    return (path / "COMPLETE").exists()


def disk_need(shape: str, layers: int, *, family_exists: bool, outputs: int = 1) -> int:
    """Bytes a run needs free: the three checkpoints (unless present) + ``outputs`` merged
    checkpoints alive at once + 2% and 256 MB of slack (headers, configs, tokenizers)."""
    one = model_bytes(shape, layers)
    need = (0 if family_exists else len(MODEL_NAMES) * one) + outputs * one
    return int(need * 1.02) + (256 << 20)


def check_disk(directory: Path, need: int, what: str) -> None:
    """A clear error, before anything is written, when ``directory`` lacks ``need`` bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if need > free:
        raise OSError(
            f"not enough disk space in {str(directory)!r} for {what}: it needs "
            f"{need / 1e9:.1f} GB free and {free / 1e9:.1f} GB are; pass fewer --layers or "
            f"another directory")


def remove_family(path: Path) -> None:
    """Delete a generated family, its ``COMPLETE`` marker first: a removal cut short leaves a
    family that the next run regenerates, never one it takes for complete."""
    (Path(path) / "COMPLETE").unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def ensure_family(root: Path, shape: str, layers: int) -> tuple[list[Path], float]:
    """The family's model directories, generated unless already complete; (dirs, seconds).
    A generation that fails or is interrupted removes what it wrote."""
    from mergecore.synthetic import make_bench_family

    path = family_dir(root, shape, layers)
    dirs = [path / n for n in MODEL_NAMES]
    if family_ready(path):
        return dirs, 0.0
    start = time.perf_counter()
    shutil.rmtree(path, ignore_errors=True)
    try:
        made = make_bench_family(path, params=preset_key(shape), layers=layers)
    except BaseException:
        remove_family(path)
        raise
    (path / "COMPLETE").write_text("generated by mergecore bench\n")
    return made, time.perf_counter() - start


def models_read(method: str, dirs: list[Path]) -> int:
    """How many of the family's models the ``method`` merge reads (2 for linear and slerp)."""
    cfg = merge_config(method, *(str(d) for d in dirs))
    return len({cfg.get("base_model"), *(m["model"] for m in cfg["models"])} - {None})


def weight_files(dirs: list[Path]) -> list[Path]:
    """Every safetensors file of the model directories ``dirs`` (the bytes a merge reads)."""
    return sorted(p for d in dirs for p in Path(d).glob("*.safetensors"))


def write_config(work: Path, method: str, dirs: list[Path]) -> Path:
    """Write the benchmark's YAML for ``method`` over ``dirs`` (base first) into ``work``."""
    cfg = merge_config(method, *(str(d) for d in dirs))
    path = work / f"bench-{method}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _faster(roofs: dict[str, Any], *keys: str) -> float | None:
    """The largest of the roofs ``keys`` that were measured (None when none was): the file
    stages are bounded by the faster of the buffered and the ``O_DIRECT`` rate."""
    found = [roofs[k] for k in keys if roofs.get(k)]
    return max(found) if found else None


def _read_roof(roofs: dict[str, Any]) -> tuple[float | None, str]:
    """The read stage's roof and its label: the faster of the buffered read (cold, or warm
    when the page cache served the cold one) and the ``O_DIRECT`` read."""
    cold_ok = (roofs.get("file_read_cold_cached_share") or 0.0) < 0.5
    buffered = "file_read_cold_gbps" if cold_ok else "file_read_warm_gbps"
    roof = _faster(roofs, buffered, "file_read_direct_gbps")
    if roof is not None and roof == roofs.get("file_read_direct_gbps") != roofs.get(buffered):
        return roof, "file read (O_DIRECT)"
    return roof, "file read" + ("" if cold_ok else " (warm)")


def stage_table(stats: dict[str, Any], roofs: dict[str, Any], device: str) -> dict[str, Any]:
    """Per-stage seconds, bytes, GB/s and roof; overlap; the bounding stage; input GB/s."""
    cuda = device.startswith("cuda")
    read_roof, read_label = _read_roof(roofs)
    stages: dict[str, dict[str, Any]] = {
        "read": {"seconds": stats["read_busy"], "bytes": stats["bytes_read"],
                 "roof_gbps": read_roof, "roof": read_label},
        "compute": {"seconds": stats["compute_busy"],
                    "bytes": stats["bytes_read"] + stats["bytes_written"],
                    "roof_gbps": roofs.get("d2d_copy_gbps" if cuda else "memcpy_gbps"),
                    "roof": "d2d copy" if cuda else "memcpy"},
        "write": {"seconds": stats["write_busy"] + stats.get("finish", 0.0),
                  "bytes": stats["bytes_written"],
                  "roof_gbps": _faster(roofs, "file_write_gbps", "file_write_direct_gbps"),
                  "roof": "file write"},
    }
    if cuda and "h2d_busy" in stats:
        h2d, d2h = stats["h2d_bytes"], stats["d2h_bytes"]
        roof = None
        if roofs.get("h2d_pinned_gbps") and roofs.get("d2h_pinned_gbps"):
            roof = (h2d + d2h) / (h2d / roofs["h2d_pinned_gbps"] + d2h / roofs["d2h_pinned_gbps"])
        stages["transfer"] = {"seconds": stats["h2d_busy"] + stats["d2h_busy"],
                              "bytes": h2d + d2h, "roof_gbps": roof, "roof": "h2d+d2h pinned"}
    ordered = {name: stages[name] for name in STAGES if name in stages}
    for st in ordered.values():
        st["gbps"] = st["bytes"] / st["seconds"] / 1e9 if st["seconds"] > 0 else None
        st["roof_share"] = (st["gbps"] / st["roof_gbps"]
                            if st["gbps"] is not None and st["roof_gbps"] else None)
    wall = stats["wall"]
    serial = sum(st["seconds"] for st in ordered.values())
    bound = max(ordered, key=lambda name: ordered[name]["seconds"])
    return {
        "stages": ordered,
        "wall_seconds": wall,
        "stage_seconds_sum": serial,
        "overlapped_seconds": max(0.0, serial - wall),
        "overlap_share": max(0.0, serial - wall) / serial if serial > 0 else 0.0,
        "bound_stage": bound,
        "bound_share_of_wall": ordered[bound]["seconds"] / wall if wall > 0 else None,
        "input_bytes": stats["bytes_read"],
        "output_bytes": stats["bytes_written"],
        "input_gbps": stats["bytes_read"] / wall / 1e9 if wall > 0 else None,
    }


def budget_note(run: dict[str, Any], shape: str, layers: int, max_memory: int) -> str | None:
    """A hint when ``--max-memory`` holds fewer than three of the largest tensor's inputs and
    output: the reader then waits for the writer, and the stages cannot overlap."""
    from mergecore.synthetic import llama_tensor_specs

    largest = max(math.prod(s) for _, s in llama_tensor_specs(preset_key(shape), layers)) * 2
    models = run["input_bytes"] / model_bytes(shape, layers)
    item = (models + 1) * largest
    if max_memory >= 0.99 * 3 * item:  # item is estimated from the preset: a 1% tolerance
        return None
    return (f"the memory budget ({max_memory / 2**30:.1f} GiB) holds {max_memory / item:.1f} of "
            f"the largest tensor's inputs and output ({item / 1e9:.2f} GB): stages wait for each "
            f"other on those; --max-memory {math.ceil(3 * item / 2**30)}GiB or more lets them "
            "overlap")


def run_pipeline(config: Path, out_dir: Path, device: str, max_memory: int | None,
                 inputs: list[Path]) -> dict[str, Any]:
    """mergecore's merge of ``config`` in this process; its ``PipelineStats`` as a dict, plus
    the plan time and the inputs' page-cache share before the run."""
    from mergecore.merge import MergeOptions, run_merge

    drop_page_cache(inputs)
    cached = resident_fraction(inputs)
    options = MergeOptions(device=device, max_memory=max_memory, quiet=True, overwrite=True)
    start = time.perf_counter()
    result = run_merge(config, out_dir, options)
    total = time.perf_counter() - start
    stats = result.stats.as_dict()
    stats.update(command_seconds=total, inputs_cached_share=cached)
    return stats


def _peak_rss(pid: int) -> int:
    """The process's resident high-water mark (``VmHWM``), 0 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def run_command(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Wall seconds and peak RSS of a child process; an error with its stderr.

    The peak is polled from ``/proc/PID/status`` (``VmHWM``, every 20 ms): ``wait4``'s
    ``ru_maxrss`` would report at least the parent's own size, which a forked child inherits.
    """
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        peak = 0
        while True:
            try:
                code = proc.wait(timeout=0.02)
                break
            except subprocess.TimeoutExpired:
                peak = max(peak, _peak_rss(proc.pid))
        wall = time.perf_counter() - start
        err.seek(0)
        tail = err.read()[-4000:]
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {code}):\n{tail}")
    return {"seconds": wall, "peak_rss_bytes": peak}


def mergecore_command(config: Path, out_dir: Path, device: str,
                      max_memory: int | None) -> list[str]:
    """The ``mergecore merge`` command line the benchmark times (a fresh process)."""
    budget = [] if max_memory is None else ["--max-memory", str(max_memory)]
    return [sys.executable, "-m", "mergecore", "merge", str(config), str(out_dir), "--overwrite",
            "--quiet", *budget, "--device", device]


def mergekit_command(config: Path, out_dir: Path, device: str) -> list[str]:
    """``mergekit-yaml`` through its module, with ``--cuda`` when our device is CUDA."""
    return [sys.executable, "-m", "mergekit.scripts.run_yaml", str(config), str(out_dir),
            *(["--cuda"] if device.startswith("cuda") else [])]


def mergekit_available() -> bool:
    """Whether mergekit's CLI can be imported here (``--vs mergekit`` needs it)."""
    try:
        import mergekit.scripts.run_yaml  # noqa: F401
    except ImportError:
        return False
    return True


def compare_commands(config: Path, work: Path, device: str, max_memory: int | None,
                     inputs: list[Path], step: Callable[[str], None] | None = None
                     ) -> dict[str, Any]:
    """``mergecore merge`` and ``mergekit-yaml`` on the same YAML, each from a cold cache, each
    in its own process; the ratio of their wall times (> 1: mergecore is faster)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    runs = {}
    for name, out in (("mergecore", work / "out-cli"), ("mergekit", work / "out-mergekit")):
        cmd = (mergecore_command(config, out, device, max_memory) if name == "mergecore"
               else mergekit_command(config, out, device))
        if step is not None:
            step(f"{name} command")
        os.sync()  # no dirty page of an earlier run (mergekit does not fsync) is written now
        drop_page_cache(inputs)
        try:
            runs[name] = run_command(cmd, env)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return {"mergecore_seconds": runs["mergecore"]["seconds"],
            "mergecore_peak_rss_bytes": runs["mergecore"]["peak_rss_bytes"],
            "mergekit_seconds": runs["mergekit"]["seconds"],
            "mergekit_peak_rss_bytes": runs["mergekit"]["peak_rss_bytes"],
            "speedup_vs_mergekit": runs["mergekit"]["seconds"] / runs["mergecore"]["seconds"]}
