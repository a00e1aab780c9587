"""The LLaMA presets ``mergecore bench`` knows, their tensor shapes and their sizes in bytes."""

from __future__ import annotations

import math

from mergecore.synthetic import SHAPES, llama_tensor_specs

#: ``--shape`` names -> keys of :data:`mergecore.synthetic.SHAPES`.
PRESETS = {"llama-1b": "1b", "llama-7b": "7b", "llama-13b": "13b", "llama-70b": "70b",
           "tiny": "tiny"}


def preset_key(shape: str) -> str:
    """``"llama-70b"`` (or ``"70b"``) -> ``"70b"``; a clear error for anything else."""
    key = PRESETS.get(shape.lower(), shape.lower())
    if key not in SHAPES:
        raise ValueError(f"--shape {shape!r}: choose one of {', '.join(PRESETS)}")
    return key


def full_depth(shape: str) -> int:
    """The preset's real number of layers (80 for llama-70b)."""
    return SHAPES[preset_key(shape)]["layers"]


def kernel_shapes(shape: str) -> dict[str, tuple[int, int]]:
    """The tensor shapes the kernel benchmark uses for a preset: the MLP projection (the
    largest per-layer tensor: ~82% of a LLaMA layer's bytes) and the attention projection."""
    s = SHAPES[preset_key(shape)]
    return {"mlp": (s["intermediate"], s["hidden"]), "attn": (s["hidden"], s["hidden"])}


def model_bytes(shape: str, layers: int, itemsize: int = 2) -> int:
    """Bytes of one checkpoint's tensors (embeddings, ``layers`` layers, final norm, head)."""
    specs = llama_tensor_specs(preset_key(shape), layers)
    return sum(math.prod(s) for _, s in specs) * itemsize


def layer_bytes(shape: str, itemsize: int = 2) -> int:
    """Bytes of one decoder layer of one checkpoint."""
    return model_bytes(shape, 2, itemsize) - model_bytes(shape, 1, itemsize)
