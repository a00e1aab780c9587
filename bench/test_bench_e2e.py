"""pytest-benchmark suite: end-to-end merges of a generated family (one layer of the preset,
embeddings and head included) in this process, per method; the stage times go into the
benchmark's extra info (``pytest bench/test_bench_e2e.py --benchmark-only``)."""

from __future__ import annotations

import shutil

import pytest

from bench.conftest import DEVICE, SHAPE
from mergecore.benchmark import e2e

LAYERS = 1
METHODS = ("ties", "linear", "slerp")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-e2e")
    e2e.check_disk(root, e2e.disk_need(SHAPE, LAYERS, family_exists=False), "the e2e suite")
    dirs, _ = e2e.ensure_family(root, SHAPE, LAYERS)
    yield root, dirs
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("method", METHODS)
def test_e2e_merge(benchmark, record, family, method):
    root, dirs = family
    config = e2e.write_config(root, method, dirs)
    inputs = e2e.weight_files(dirs)
    out = root / f"out-{method}"
    stats: list[dict] = []

    def run():
        stats.append(e2e.run_pipeline(config, out, DEVICE, 2 << 30, inputs))

    benchmark.group = f"e2e {SHAPE}"
    benchmark.pedantic(run, rounds=2 if SHAPE != "tiny" else 1, warmup_rounds=0)
    shutil.rmtree(out, ignore_errors=True)
    table = e2e.stage_table(stats[-1], {}, DEVICE)
    benchmark.extra_info.update(
        {f"{name}_seconds": st["seconds"] for name, st in table["stages"].items()},
        input_gbps=table["input_gbps"], bound_stage=table["bound_stage"])
    assert table["input_bytes"] > 0 and table["wall_seconds"] > 0
    record("e2e-suite", op=f"merge-{method}", backend=f"mergecore-{DEVICE}",
           shape=f"{SHAPE}:{LAYERS}L", dtype="bfloat16", nbytes=table["input_bytes"],
           bound_stage=table["bound_stage"],
           stage_seconds={n: st["seconds"] for n, st in table["stages"].items()})
