"""Computing fused recipe items: the stage nodes of many graphs, wave by wave.

Nodes of the same depth (across every item of a batch) do not depend on each other, so each
wave is one ``merge_many`` call: the small tensors of a batch still cost one kernel call per
stage, not one per tensor. A node's result has its stage's output dtype, exactly the tensor a
stage-by-stage run would write and read back, so the fused result is bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mergecore.io.types import SAFETENSORS_DTYPES
from mergecore.methods import MergeJob
from mergecore.ops import merge_many
from mergecore.plan import PlannedTensor
from mergecore.recipes.graph import FusedTensor, NodeArg
from mergecore.vocab_tail import join_tail, split_tail

#: ``(planned, input tensors, seed) -> MergeJob``: how one stage tensor becomes a kernel job
#: (the pipeline's own rule, so that a fused node computes what a plain merge computes).
JobFactory = Callable[[PlannedTensor, list[torch.Tensor], int], MergeJob]
#: ``(write key, tensor, bytes)`` of each output of an item.
Written = tuple[object, torch.Tensor, int]


def _value(arg: NodeArg, leaves: Sequence[torch.Tensor],
           results: Sequence[torch.Tensor | None]) -> torch.Tensor:
    value = leaves[arg.index] if arg.kind == "input" else results[arg.index]
    if value is None:  # a node is always computed before its users (depth order)
        raise RuntimeError("internal error: a recipe node was used before it was computed")
    if arg.rows is not None and value.shape and arg.rows < value.shape[0]:
        value = value[: arg.rows]
    return value


def evaluate_fused(items: Sequence[tuple[FusedTensor, Sequence[torch.Tensor]]],
                   job_for: JobFactory) -> list[list[Written]]:
    """Compute every node of every ``(fused tensor, its leaf tensors)`` and return, per item,
    its outputs as ``(write key, tensor, bytes)`` (see ``FusedTensor.write_key``)."""
    results: list[list[torch.Tensor | None]] = [[None] * len(ft.nodes) for ft, _ in items]
    depth = max((n.depth for ft, _ in items for n in ft.nodes), default=0)
    for level in range(1, depth + 1):
        jobs: list[MergeJob] = []
        where: list[tuple[int, int, torch.Tensor | None]] = []
        for i, (ft, leaves) in enumerate(items):
            for k, node in enumerate(ft.nodes):
                if node.depth != level:
                    continue
                args = [_value(a, leaves, results[i]) for a in node.args]
                if node.planned.method == "copy":
                    results[i][k] = args[0].to(SAFETENSORS_DTYPES[node.planned.out_dtype][0])
                else:
                    args, tail = split_tail(node.planned, args)
                    jobs.append(job_for(node.planned, args, node.seed))
                    where.append((i, k, tail))
        if jobs:
            for (i, k, tail), out in zip(where, merge_many(jobs)):
                results[i][k] = join_tail(out, tail)
    out: list[list[Written]] = []
    for i, (ft, _) in enumerate(items):
        out.append([(ft.write_key(dest, k), results[i][k], ft.nodes[k].out_nbytes)
                    for dest, k in ft.outputs])
    return out
