"""LoRA adapters on the inputs of a merge plan: opened once, applied as each input is loaded.

The pipeline's reader calls ``updates(planned)`` for each output tensor: the adapter tensors
of the inputs written ``path+adapter`` are read on the host (and copied to the merge device
with the inputs); the compute stage calls ``apply_updates`` on the merge device just before
the merge. An input without an adapter, or a tensor its adapter leaves alone, is passed
through untouched (and its buffer may be shared with the same model's plain input).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from mergecore.lora.adapter import LoraAdapter, LoraUpdate


class PlanAdapters:
    """The distinct adapters named by a plan's inputs (``PlannedInput.adapter``)."""

    def __init__(self, adapter_paths: Iterable[str]):
        self.adapters: dict[str, LoraAdapter] = {}
        try:
            for path in adapter_paths:
                if path not in self.adapters:
                    self.adapters[path] = LoraAdapter(path)
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_plan(cls, tensors: Iterable) -> PlanAdapters | None:
        """Adapters of every ``PlannedTensor`` in ``tensors``; None when no input has one."""
        paths = [inp.adapter for t in tensors for inp in t.inputs if inp.adapter]
        return cls(paths) if paths else None

    def _pairs(self, planned) -> Iterable[tuple[int, LoraAdapter, str]]:
        for k, inp in enumerate(planned.inputs):
            if inp.adapter:
                yield k, self.adapters[inp.adapter], inp.info.name

    def updates(self, planned) -> list[LoraUpdate | None] | None:
        """One update per input of ``planned`` (None where nothing changes), or None when no
        input of this tensor is changed. Reads the adapter tensors (host memory)."""
        out: list[LoraUpdate | None] = [None] * len(planned.inputs)
        for k, adapter, name in self._pairs(planned):
            out[k] = adapter.update(name)
        return out if any(u is not None for u in out) else None

    def extra_bytes(self, planned) -> int:
        """Memory the updates of ``planned`` take at most: the adapter tensors (as fp32) plus
        an fp32 working copy and the result of every changed input."""
        total = 0
        for k, adapter, name in self._pairs(planned):
            factors = adapter.update_nbytes(name)
            if factors:
                info = planned.inputs[k].info
                total += factors + info.numel * 4 + info.nbytes
        return total

    def close(self) -> None:
        for adapter in self.adapters.values():
            adapter.close()


def updates_to(updates: Sequence[LoraUpdate | None], device: torch.device,
               non_blocking: bool = False) -> list[LoraUpdate | None]:
    """``updates`` with their tensors moved to ``device``."""
    return [None if u is None else u.to(device, non_blocking=non_blocking) for u in updates]


def apply_updates(inputs: Sequence[torch.Tensor],
                  updates: Sequence[LoraUpdate | None] | None) -> list[torch.Tensor]:
    """The inputs with their updates applied (unchanged where the update is None)."""
    if updates is None:
        return list(inputs)
    return [t if u is None else u.apply(t) for t, u in zip(inputs, updates)]
