"""Projecting a full-depth merge's wall time from a run over a few layers.

A merge moves bytes through stages (read, transfer, compute, write) that run concurrently.
A run over ``L`` layers (embeddings, final norm and head counted once, as in the real model)
gives each stage's rate, ``r_s = bytes_s / seconds_s``. Every stage's bytes are proportional
to the checkpoint's tensor bytes ``B(L)``, so a run over ``L'`` layers moves
``bytes_s * B(L') / B(L)`` through stage ``s`` and, at the measured rate, takes
``T_s(L') = seconds_s * B(L') / B(L)``.

With perfect overlap the wall would be the slowest stage plus filling and draining the
pipeline. The run's remainder ``R = wall - max_s seconds_s`` splits in two: the fill and drain
``F`` (reading and merging the first tensor before anything else can be merged, merging and
writing the last one after everything else is read), estimated at the measured rates from the
first and last tensors' bytes, which do not depend on the depth; and the rest ``R - F``, time
in which the stages did not overlap (they shared too few CPUs, or the memory budget held too
few tensors to keep every stage busy), which grows with the bytes like the stages do:

    wall(L') = max_s T_s(L') + F + (R - F) * B(L') / B(L).

The method is checked by measuring two depths ``L1 < L2``: projecting ``L2`` from ``L1`` and
comparing the projected growth ``wall'(L2) - wall(L1)`` with the measured one; the relative
error of the growth (and of the wall) is reported.
"""

from __future__ import annotations

import math
from typing import Any

from mergecore.benchmark.shapes import model_bytes, preset_key
from mergecore.synthetic import llama_tensor_specs


def fill_drain_seconds(run: dict[str, Any], shape: str, layers: int) -> float:
    """Seconds to read + merge the first tensor (the embeddings) and to merge + write the last
    (the head), at the run's stage rates; at most the run's remainder."""
    specs = llama_tensor_specs(preset_key(shape), layers)
    itemsize = 2
    first, last = (math.prod(specs[k][1]) * itemsize for k in (0, -1))
    models = run["input_bytes"] / model_bytes(shape, layers)  # checkpoints read per tensor

    def seconds(stage: str, nbytes: float) -> float:
        st = run["stages"].get(stage)
        return nbytes / (st["gbps"] * 1e9) if st and st["gbps"] else 0.0

    fill = seconds("read", models * first) + seconds("compute", (models + 1) * first)
    drain = seconds("compute", (models + 1) * last) + seconds("write", last)
    remainder = run["wall_seconds"] - max(st["seconds"] for st in run["stages"].values())
    return max(0.0, min(fill + drain, remainder))


def project(run: dict[str, Any], shape: str, layers: int, target_layers: int) -> dict[str, Any]:
    """Project the run (a :func:`mergecore.benchmark.e2e.stage_table` result over ``layers``
    layers of ``shape``) to ``target_layers``: per-stage seconds, the bound, the wall."""
    factor = model_bytes(shape, target_layers) / model_bytes(shape, layers)
    stages = {}
    for name, st in run["stages"].items():
        stages[name] = {"gbps": st["gbps"], "bytes": st["bytes"] * factor,
                        "seconds": st["seconds"] * factor}
    remainder = max(0.0, run["wall_seconds"] - max(st["seconds"] for st in run["stages"].values()))
    fill_drain = fill_drain_seconds(run, shape, layers)
    not_overlapped = (remainder - fill_drain) * factor
    bound = max(stages, key=lambda name: stages[name]["seconds"])
    wall = stages[bound]["seconds"] + fill_drain + not_overlapped
    return {
        "from_layers": layers,
        "target_layers": target_layers,
        "bytes_factor": factor,
        "stages": stages,
        "bound_stage": bound,
        "fill_drain_seconds": fill_drain,
        "not_overlapped_seconds": not_overlapped,
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
