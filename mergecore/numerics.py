"""Units in the last place: the distance tests and benchmarks use to compare results."""

from __future__ import annotations

import torch

_INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def ordered_ints(t: torch.Tensor) -> torch.Tensor:
    """Map floats to int64 so that adjacent representable values differ by exactly 1."""
    bits = t.contiguous().view(_INT_OF[t.dtype]).to(torch.int64)
    sign_bit = 1 << (8 * t.element_size() - 1)
    # negative floats: flip so that ordering is monotone and -0 == +0
    return torch.where(bits < 0, -(bits + sign_bit), bits)


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance between a and b (same dtype) in units in the last place."""
    if a.dtype != b.dtype:
        raise TypeError(f"ulp_diff needs one dtype, got {a.dtype} and {b.dtype}")
    return (ordered_ints(a.reshape(-1)) - ordered_ints(b.reshape(-1))).abs()


def within_ulp_share(a: torch.Tensor, b: torch.Tensor, n: int = 1) -> float:
    """Share of elements of a and b that are within n ulp of each other."""
    if a.numel() == 0:
        return 1.0
    return float((ulp_diff(a, b) <= n).double().mean())
