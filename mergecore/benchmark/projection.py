"""Projecting a full-depth merge's wall time from a run over a few layers.

A merge moves bytes through stages (read, transfer, compute, write) that run concurrently.
A run over ``L`` layers (embeddings, final norm and head counted once, as in the real model)
gives each stage's rate, ``r_s = bytes_s / seconds_s``. Every stage's bytes are proportional
to the checkpoint's tensor bytes ``B(L)``, so a run over ``L'`` layers moves
``bytes_s * B(L') / B(L)`` through stage ``s`` and, at the measured rate, takes

    T_s(L') = seconds_s * B(L') / B(L).

The slowest stage bounds the overlapped pipeline; what the run spent beyond its slowest
stage (filling and draining the pipeline: the first read before anything is computed, the
last write after) does not grow with depth. So

    wall(L') = max_s T_s(L') + (wall(L) - max_s seconds_s).

The method is checked by measuring two depths ``L1 < L2``: projecting ``L2`` from ``L1`` and
comparing the projected growth ``wall'(L2) - wall(L1)`` with the measured one; the relative
error of the growth (and of the wall) is reported.
"""

from __future__ import annotations

from typing import Any

from mergecore.benchmark.shapes import model_bytes


def project(run: dict[str, Any], shape: str, layers: int, target_layers: int) -> dict[str, Any]:
    """Project the run (a :func:`mergecore.benchmark.e2e.stage_table` result over ``layers``
    layers of ``shape``) to ``target_layers``: per-stage seconds, the bound, the wall."""
    factor = model_bytes(shape, target_layers) / model_bytes(shape, layers)
    stages = {}
    for name, st in run["stages"].items():
        stages[name] = {"gbps": st["gbps"], "bytes": st["bytes"] * factor,
                        "seconds": st["seconds"] * factor}
    measured_bound = max(st["seconds"] for st in run["stages"].values())
    fill_drain = max(0.0, run["wall_seconds"] - measured_bound)
    bound = max(stages, key=lambda name: stages[name]["seconds"])
    wall = stages[bound]["seconds"] + fill_drain
    return {
        "from_layers": layers,
        "target_layers": target_layers,
        "bytes_factor": factor,
        "stages": stages,
        "bound_stage": bound,
        "fill_drain_seconds": fill_drain,
        "wall_seconds": wall,
        "input_bytes": run["input_bytes"] * factor,
        "input_gbps": run["input_bytes"] * factor / wall / 1e9 if wall > 0 else None,
    }


def check(small: dict[str, Any], large: dict[str, Any], shape: str, small_layers: int,
          large_layers: int) -> dict[str, Any]:
    """Project ``large_layers`` from the ``small`` run and compare with the ``large`` run."""
    projected = project(small, shape, small_layers, large_layers)
    measured_growth = large["wall_seconds"] - small["wall_seconds"]
    projected_growth = projected["wall_seconds"] - small["wall_seconds"]
    return {
        "small_layers": small_layers,
        "large_layers": large_layers,
        "measured_wall_seconds": large["wall_seconds"],
        "projected_wall_seconds": projected["wall_seconds"],
        "wall_relative_error": (projected["wall_seconds"] - large["wall_seconds"])
        / large["wall_seconds"],
        "measured_growth_seconds": measured_growth,
        "projected_growth_seconds": projected_growth,
        "growth_relative_error": ((projected_growth - measured_growth) / measured_growth
                                  if measured_growth > 0 else None),
        "measured_bound_stage": large["bound_stage"],
        "projected_bound_stage": projected["bound_stage"],
    }
