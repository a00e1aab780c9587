"""The compute device a merge or a benchmark asks for, checked before any work starts."""

from __future__ import annotations

import torch

# the switches that ask for the GPU without naming a device
CUDA_FLAGS = ("--cuda", "--gpu-rich", "--multi-gpu")


def resolve_device(*, device: str | None, cuda: bool = False, gpu_rich: bool = False,
                   multi_gpu: bool = False) -> tuple[str, str | None]:
    """The compute device that mergekit-yaml's flags ask for, by mergekit's rules, and the flag
    that chose it (for error messages; None for the default): ``--device`` wins (``auto``:
    cuda when torch sees a GPU, else cpu); otherwise ``--cuda``, ``--gpu-rich`` (mergekit's
    alias for --cuda and its multi-GPU executor) or ``--multi-gpu`` (mergekit's executor
    that runs on every GPU) mean cuda (mergecore computes on one); otherwise cpu."""
    if device:
        if device == "auto":
            return ("cuda" if torch.cuda.is_available() else "cpu"), "--device auto"
        return device, None
    for asked, flag in zip((cuda, gpu_rich, multi_gpu), CUDA_FLAGS):
        if asked:
            return "cuda", flag
    return "cpu", None


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
                + (f"drop {flag} to merge on the CPU" if flag in CUDA_FLAGS else
                   "run with --device cpu"))
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{said}: this machine has {count} CUDA device(s) "
                             f"(cuda:0 to cuda:{count - 1})")
    return str(device)
