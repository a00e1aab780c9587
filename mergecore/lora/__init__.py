"""LoRA adapters (PEFT layout) applied to base weights on the fly.

- ``settings``: ``adapter_config.json`` checked; the scale of each module;
- ``adapter``: an adapter directory opened, its keys mapped to base tensors, checked against
  a model, and the update of one tensor computed (``LoraAdapter.apply(name, tensor)``);
- ``inputs``: the adapters of a merge plan's ``path+adapter`` inputs, for the pipeline.

``apply_lora`` applies an adapter to a whole state dict in memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from mergecore.lora.adapter import (
    AdapterError,
    LoraAdapter,
    LoraUpdate,
    TensorEdit,
    adapter_problems,
)
from mergecore.lora.settings import AdapterConfigError, LoraSettings


def apply_lora(state_dict: Mapping[str, torch.Tensor], adapter_dir: str | os.PathLike, *,
               device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """A new state dict: ``state_dict`` with the PEFT LoRA adapter in ``adapter_dir`` merged in.

    Each changed tensor is ``W + s * (B @ A)`` (see ``mergecore.lora.adapter``), computed in
    float32 on ``device`` (default: the tensor's own) and rounded to ``W``'s dtype; unchanged
    tensors are the same objects as in ``state_dict``. Raises ``AdapterError`` naming the
    adapter and key when the adapter does not fit the state dict (before any update).
    """
    with LoraAdapter(adapter_dir) as adapter:
        tensors = {n: (tuple(t.shape), t.is_floating_point()) for n, t in state_dict.items()}
        problems = adapter.problems(tensors)
        if problems:
            raise AdapterError("; ".join(problems))
        out = dict(state_dict)
        for name in adapter.edits:
            tensor = state_dict[name]
            if device is not None:
                tensor = tensor.to(device)
            out[name] = adapter.apply(name, tensor)
        return out


__all__ = [
    "AdapterConfigError",
    "AdapterError",
    "LoraAdapter",
    "LoraSettings",
    "LoraUpdate",
    "TensorEdit",
    "adapter_problems",
    "apply_lora",
]
