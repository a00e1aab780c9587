"""Shared helpers of the bench/ scripts: the package's timing and tables, results files.

The measuring code lives in :mod:`mergecore.benchmark` (so that ``mergecore bench`` works from
an installed package); this module adds what only the repository has: ``bench/results/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mergecore.benchmark.report import format_table
from mergecore.benchmark.roofs import memcpy_gbps as copy_roof
from mergecore.benchmark.timing import device_name, git_commit, sync, time_median

__all__ = ["RESULTS_DIR", "append_results", "copy_roof", "device_name", "git_commit",
           "print_table", "sync", "time_median"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def append_results(filename: str, rows: list[dict[str, Any]]) -> Path:
    """Append JSON lines to bench/results/<filename>."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / filename
    with open(path, "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    print(format_table(rows, columns))


def bench_family(work: Path, params: str, layers: int | None, n_models: int = 3) -> Path:
    """The generated bench family (base + ``n_models - 1`` fine-tunes) under ``work``, made on
    the first call and reused while its last model is complete."""
    from mergecore.synthetic import make_bench_family

    fam = work / f"family{n_models}-{params}-{layers or 'all'}"
    if not (fam / f"ft{n_models - 1}" / "config.json").exists():
        t0 = time.perf_counter()
        make_bench_family(fam, params=params, layers=layers, n_models=n_models)
        print(f"generated the family in {time.perf_counter() - t0:.1f} s under {fam}")
    return fam
