"""Setup of the pytest-benchmark suites in bench/ (``pytest bench/ --benchmark-only``).

Environment knobs:

- ``MERGECORE_BENCH_QUICK=1``: tiny shapes, for checking that the suites still work (CI);
- ``MERGECORE_BENCH_SHAPE``: the LLaMA preset whose tensor shapes are measured (default
  ``llama-7b``; ``tiny`` when quick);
- ``MERGECORE_BENCH_DEVICE``: ``cpu`` or ``cuda`` (default: cuda when available);
- ``MERGECORE_BENCH_RESULTS``: the folder results are appended to (default bench/results).

Every measured benchmark appends one JSON line to ``<results>/<suite>.jsonl`` keyed by
operation, backend, shape, dtype, device and commit (with the date, median seconds and GB/s).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch

from mergecore.benchmark.timing import device_name, git_commit

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

QUICK = os.environ.get("MERGECORE_BENCH_QUICK", "") not in ("", "0")
SHAPE = "tiny" if QUICK else os.environ.get("MERGECORE_BENCH_SHAPE", "llama-7b")
DEVICE = os.environ.get("MERGECORE_BENCH_DEVICE",
                        "cuda" if torch.cuda.is_available() else "cpu")
RESULTS = Path(os.environ.get("MERGECORE_BENCH_RESULTS",
                              Path(__file__).resolve().parent / "results"))


@pytest.fixture(scope="session")
def run_meta() -> dict:
    return {"commit": git_commit(), "device": DEVICE, "device_name": device_name(DEVICE),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "quick": QUICK}


@pytest.fixture
def record(benchmark, run_meta):
    """``record(suite, op=..., backend=..., shape=..., dtype=..., nbytes=..., **extra)``:
    after the benchmark ran, append its median (and GB/s over ``nbytes``) to the suite's file."""
    pending: list[tuple[str, dict]] = []

    def add(suite: str, **key) -> None:
        pending.append((suite, key))

    yield add
    stats = getattr(benchmark, "stats", None)
    if stats is None or not getattr(stats, "stats", None):
        return  # benchmarks disabled: nothing was measured
    median = stats.stats.median
    for suite, key in pending:
        nbytes = key.pop("nbytes", None)
        row = dict(run_meta, **key, seconds=median,
                   gbps=nbytes / median / 1e9 if nbytes else None)
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / f"{suite}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
