"""Multi-stage recipes (mergekit-multi's format), executed as one fused streaming pass.

- ``graph``: plan each stage as if run alone, then fuse them into one expression graph per
  output tensor (``load_recipe`` / ``plan_recipe`` -> ``RecipePlan``);
- ``evaluate``: compute the graphs of a batch of items, stage wave by stage wave;
- ``run``: the command (``run_recipe``), ``--keep-intermediates`` and ``--dry-run``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mergecore.recipes.graph import (
    FusedTensor,
    RecipePlan,
    Stage,
    StageNode,
    final_document,
    is_recipe,
    load_recipe,
    plan_recipe,
)

if TYPE_CHECKING:
    from mergecore.merge import MergeOptions, MergeResult


def run_recipe(config_path: str | os.PathLike, out_dir: str | os.PathLike,
               options: MergeOptions | None = None) -> MergeResult:
    """Run a recipe file into ``out_dir`` (see ``mergecore.recipes.run.run_recipe``)."""
    from mergecore.recipes.run import run_recipe as _run_recipe

    return _run_recipe(config_path, out_dir, options)


__all__ = [
    "FusedTensor",
    "RecipePlan",
    "Stage",
    "StageNode",
    "final_document",
    "is_recipe",
    "load_recipe",
    "plan_recipe",
    "run_recipe",
]
