"""Shared helpers of the bench/ scripts: the package's timing and tables, results files.

The measuring code lives in :mod:`mergecore.benchmark` (so that ``mergecore bench`` works from
an installed package); this module adds what only the repository has: ``bench/results/``.
"""

from __future__ import annotations

import json
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
