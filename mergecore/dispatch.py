"""The one dispatch table: (merge method, device type) -> backend.

``cuda`` goes to the Triton kernels, ``cpu`` to the C++ kernels, anything else to the float64
reference. A backend that cannot be loaded (no compiled extension, no triton) falls back to
the reference with one warning. ``MERGECORE_BACKEND=reference|cpu|triton`` forces a backend
for every call (``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``). Backends are
imported on first use: importing mergecore compiles nothing and does not touch CUDA.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

from mergecore.dtypes import KERNEL_DTYPES
from mergecore.methods import METHODS

BACKEND_MODULES = {
    "reference": "mergecore.backends.reference",
    "cpu": "mergecore.backends.cpu",
    "triton": "mergecore.backends.triton",
}
_DEVICE_BACKEND = {"cpu": "cpu", "cuda": "triton"}

# (method, device type) -> backend name.
DISPATCH_TABLE: dict[tuple[str, str], str] = {
    (method, device): backend
    for method in METHODS
    for device, backend in _DEVICE_BACKEND.items()
}

_loaded: dict[str, object] = {}
_warned: set[str] = set()

MergeFn = Callable[..., list[torch.Tensor]]  # (jobs, outs=None, counts=None) -> outputs


def forced_backend() -> str | None:
    """The backend named by ``MERGECORE_BACKEND`` (None when unset or ``auto``)."""
    name = os.environ.get("MERGECORE_BACKEND", "").strip().lower()
    if name in ("", "auto"):
        return None
    aliases = {"cpp": "cpu", "c++": "cpu", "ref": "reference", "torch": "reference"}
    name = aliases.get(name, name)
    if name not in BACKEND_MODULES:
        raise ValueError(
            f"MERGECORE_BACKEND={name!r} is not a backend; use one of {sorted(BACKEND_MODULES)}"
        )
    return name


def load_backend(name: str) -> ModuleType | None:
    """Import a backend module, or None (with one warning) when it is not available."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(BACKEND_MODULES[name])
        except ImportError as exc:
            _loaded[name] = None
            if name not in _warned:
                _warned.add(name)
                warnings.warn(
                    f"mergecore: the {name} backend is not available ({exc}); "
                    "using the float64 reference backend (correct, slower)",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _loaded[name]


def backend_name(method: str, device: torch.device | str, dtype: torch.dtype,
                 out_dtype: torch.dtype | None = None) -> str:
    """The backend that will run ``method`` on tensors of this device and dtype, giving
    ``out_dtype`` (default: ``dtype``). float64 inputs or outputs are the reference
    backend's (the kernels read and write bfloat16, float16 and float32), whatever
    ``MERGECORE_BACKEND`` says."""
    if dtype not in KERNEL_DTYPES or (out_dtype is not None and out_dtype not in KERNEL_DTYPES):
        return "reference"
    forced = forced_backend()
    if forced is not None:
        return forced
    name = DISPATCH_TABLE.get((method, torch.device(device).type), "reference")
    if name != "reference" and load_backend(name) is None:
        return "reference"
    return name


def implementation(name: str) -> MergeFn:
    """The function computing a list of jobs on backend ``name``."""
    module = load_backend(name)
    if module is None or name == "reference":
        from mergecore.backends import reference

        return reference.merge_jobs
    from mergecore import composed

    return lambda jobs, outs=None, counts=None: composed.merge_jobs(module, jobs, outs, counts)
