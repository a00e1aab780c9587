"""Outputs that keep the first model's larger vocabulary (``MergeConfig.vocab_rows = "first"``).

A vocabulary-sized tensor planned with ``tail_from = k`` and ``common_rows = n`` is merged on
its first ``n`` rows (the rows every input has); rows ``n`` and on are input ``k``'s,
unchanged (rounded to the output dtype). ``split_tail`` cuts the inputs before the merge,
``join_tail`` appends the kept rows to its result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mergecore.plan import PlannedTensor


def split_tail(planned: PlannedTensor, inputs: Sequence[torch.Tensor]
               ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """``(inputs cut to the common rows, the rows to append)``; ``(inputs, None)`` when the
    tensor keeps no extra rows."""
    if planned.tail_from is None:
        return list(inputs), None
    n = planned.common_rows
    return [t[:n] for t in inputs], inputs[planned.tail_from][n:]


def join_tail(merged: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
    """The merged rows followed by ``tail`` (in ``merged``'s dtype and device)."""
    if tail is None:
        return merged
    return torch.cat([merged, tail.to(device=merged.device, dtype=merged.dtype)], dim=0)
