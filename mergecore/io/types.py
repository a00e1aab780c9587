"""Plain records shared by the IO layer, the config layer and the planner."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergecore.dtypes import FLOAT8_DTYPES

# safetensors dtype code -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v[0]: k for k, v in SAFETENSORS_DTYPES.items()}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
#: float8 codes (``mergecore.dtypes.FLOAT8_DTYPES``): read, merged in float32, never written
FLOAT8_CODES = frozenset(TORCH_TO_SAFETENSORS[dt] for dt in FLOAT8_DTYPES)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: ``nbytes`` bytes at absolute offset ``data_start`` of ``file``."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    data_start: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype][0]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


@dataclass
class Checkpoint:
    """A local HF-layout model directory with safetensors weights.

    ``tensors`` maps every tensor name to its TensorInfo, in file order (file by file, and
    by data offset inside a file), which is the order reads should follow.
    """

    path: Path
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] | None = None
    weight_files: list[Path] = field(default_factory=list)
