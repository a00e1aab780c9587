"""The compute device a merge or a benchmark asks for, checked before any work starts."""

from __future__ import annotations

import torch


def check_device(device: str | torch.device, *, flag: str | None = None) -> str:
    """``device`` as a string, if this machine can compute on it; otherwise a ValueError (a
    string that names no device type, a type other than cpu/cuda, a CUDA index beyond the
    GPUs present) or a RuntimeError (CUDA asked for where there is none), naming the flag.

    Checking this first matters: a merge that fails on its device only after it has emptied
    an ``--overwrite`` output directory would lose that output for nothing. ``flag`` is how the
    user asked for the device (``--cuda``); by default ``--device DEVICE``."""
    said = flag or f"--device {device}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{said}: not a device (use cpu, cuda or cuda:N): {exc}"
                         ) from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"{said}: only cpu and cuda (cuda:N) are supported")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"{said}: no CUDA device is available here (torch "
                f"{torch.__version__}, built with CUDA {torch.version.cuda or 'none'}); "
                + ("drop --cuda to merge on the CPU" if flag == "--cuda" else
                   "run with --device cpu"))
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{said}: this machine has {count} CUDA device(s) "
                             f"(cuda:0 to cuda:{count - 1})")
    return str(device)
