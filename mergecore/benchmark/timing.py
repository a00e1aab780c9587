"""Clocks and names shared by every benchmark: medians of synchronised runs, commit, machine."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mergecore.devices import check_device


def git_commit() -> str:
    """Short hash of the checkout mergecore runs from ("unknown" for an installed wheel).

    ``MERGECORE_GIT_REV`` wins when set: a copy of the tree without its ``.git`` (the lent GPU
    machine gets one) still records which commit it measured.
    """
    if os.environ.get("MERGECORE_GIT_REV"):
        return os.environ["MERGECORE_GIT_REV"]
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=here, timeout=10, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    """The GPU's name on CUDA, else the CPU's model and core count."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{_cpu_model() or platform.machine()} x{os.cpu_count()} cores"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def sync(device: str) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def run_timed(fn: Callable[[], Any], device: str, *, repeats: int = 5, warmup: int = 1,
              min_time: float = 0.0) -> list[float]:
    """Wall seconds of each run of ``fn`` (synchronised on CUDA) after ``warmup`` untimed
    runs; at least ``repeats`` runs and at least ``min_time`` seconds (at most 1000 runs)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_time:
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if len(times) >= 1000:
            break
    return times


def time_median(fn: Callable[[], Any], device: str, *, repeats: int = 5, warmup: int = 1,
                min_time: float = 0.0) -> float:
    """Median of :func:`run_timed` (what a kernel typically takes)."""
    return statistics.median(run_timed(fn, device, repeats=repeats, warmup=warmup,
                                       min_time=min_time))


def require_device(device: str) -> str:
    """``device`` if it can run here (see :func:`mergecore.devices.check_device`)."""
    return check_device(device)
