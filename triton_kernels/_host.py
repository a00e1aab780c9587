"""Host-side helpers of the launchers: offsets tables, program tables, one upload per call.

A launch describes many tensors with int64 tables of *element offsets* relative to one
reference tensor per dtype. All tables of one launch are packed into one int64 array and
copied to the device once (pinned memory, asynchronous), so launching does not wait for the
GPU.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Sequence

import numpy as np
import torch

from triton_kernels import _config

MAX_NUMEL = (1 << 31) - 1  # element indices are int32 inside the selection kernels


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_options(num_warps: int) -> dict:
    """Compiler options of every launch: the warp count, and FMA contraction as ``_config``
    says (pinned, so a Triton release that changes its default does not change results)."""
    return {"num_warps": num_warps, "enable_fp_fusion": _config.FP_FUSION}


def on_device(device: torch.device):
    """Context in which a launch runs on ``device``: Triton launches on the *current* CUDA
    device and its current stream, whatever device the tensors are on, so a launch for
    ``cuda:1`` must make cuda:1 current (torch ops on the tensors already use its stream)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def f32_bits(x: float) -> int:
    """The bit pattern of ``float32(x)`` as a signed 32-bit int (for int64 tables)."""
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


def rel_offset(t: torch.Tensor, ref: torch.Tensor, what: str) -> int:
    """Offset of ``t`` from ``ref`` in elements (both of one dtype)."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{what}: dtype {t.dtype} differs from {ref.dtype} in one launch")
    delta = t.data_ptr() - ref.data_ptr()
    size = t.element_size()
    if delta % size:
        raise ValueError(f"{what}: data pointer is not aligned to its element size {size}")
    return delta // size


def all_aligned(refs: Sequence[torch.Tensor], offsets: Sequence[int]) -> bool:
    """True when every reference is 16-byte aligned and every offset a multiple of 16."""
    return all(r.data_ptr() % 16 == 0 for r in refs) and all(o % 16 == 0 for o in offsets)


class Tables:
    """Collects int64 arrays, uploads them as one buffer, hands back device views."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._size = 0

    def add(self, values) -> int:
        """Queue an array (any shape, flattened); returns its handle."""
        arr = np.ascontiguousarray(np.asarray(values, dtype=np.int64).reshape(-1))
        self._parts.append(arr)
        self._size += max(arr.size, 1)
        return len(self._parts) - 1

    def upload(self, device: torch.device) -> list[torch.Tensor]:
        """One host-to-device copy; returns one int64 device view per queued array."""
        flat = np.zeros(max(self._size, 1), dtype=np.int64)
        bounds = []
        pos = 0
        for arr in self._parts:
            flat[pos : pos + arr.size] = arr
            bounds.append((pos, arr.size))
            pos += max(arr.size, 1)
        host = torch.from_numpy(flat)
        if device.type == "cuda":
            host = host.pin_memory()
            dev = host.to(device, non_blocking=True)
        else:
            dev = host.to(device)
        return [dev[p : p + max(s, 1)] for p, s in bounds]


def program_table(ntiles: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """For tiles of many jobs in one grid: each program's (job, tile)."""
    counts = np.asarray(ntiles, dtype=np.int64)
    jobs = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    tiles = np.arange(int(counts.sum()), dtype=np.int64) - starts
    return jobs, tiles


def upload_launch(parts: Sequence, ntiles: Sequence[int], device: torch.device):
    """Upload a launch's tables in one copy, plus its program table when the launch covers
    several jobs (``len(ntiles) > 1``).

    Returns ``(views, prog_job, prog_tile, multi)``: one device view per part, and the program
    table's two columns; with a single job the kernel does not read them, so they alias the
    first part."""
    multi = len(ntiles) > 1
    tables = Tables()
    for part in parts:
        tables.add(part)
    if multi:
        for column in program_table(ntiles):
            tables.add(column)
    dev = tables.upload(device)
    views = dev[: len(parts)]
    if multi:
        return views, dev[-2], dev[-1], True
    return views, views[0], views[0], False


def sum_partials(partial: torch.Tensor, prog_job: torch.Tensor, njobs: int,
                 multi: bool) -> list[list[float]]:
    """Per-job float64 sums of the per-program fp32 partial rows of a reduction launch.

    Summed on the host, in program order: a GPU ``index_add_`` adds with float64 atomics in
    no fixed order, so two runs of one merge could differ in the last bits of a slerp angle
    or a DARE rescale factor. The partials are a few floats per 4096 elements, and reading
    the sums back synchronizes anyway."""
    partial = partial.double().cpu()
    if multi:
        sums = torch.zeros((njobs, partial.shape[1]), dtype=torch.float64)
        sums.index_add_(0, prog_job.cpu(), partial)
    else:
        sums = partial.sum(0, keepdim=True)
    return sums.tolist()


def reduce_launch(kernel, ref: torch.Tensor, rows: list, offsets: Sequence[int], *,
                  width: int, block: int, warps: int, **constexprs) -> list[list[float]]:
    """One launch of a whole-tensor reduction over the jobs ``rows`` (``rows[j][0]`` is job
    j's element count; ``offsets`` its element offsets from ``ref``, for the alignment
    flag): ``width`` fp32 partials per ``block``-element tile, summed per job in float64
    (:func:`sum_partials`). The kernel takes ``(ref, jobs, prog_job, prog_tile, partial)``
    and the constexprs MULTI, ALIGNED, BLOCK plus ``constexprs``."""
    ntiles = [cdiv(r[0], block) for r in rows]
    (jobs_t,), pj_t, pt_t, multi = upload_launch([rows], ntiles, ref.device)
    grid = sum(ntiles)
    partial = torch.empty((grid, width), dtype=torch.float32, device=ref.device)
    kernel[(grid,)](ref, jobs_t, pj_t, pt_t, partial, MULTI=multi,
                    ALIGNED=all_aligned([ref], offsets), BLOCK=block, **constexprs,
                    **launch_options(warps))
    return sum_partials(partial, pj_t, len(rows), multi)


def launch_groups(items: Sequence, key, size=None):
    """The launches of one call: indices of ``items`` grouped by ``key(item)`` (a tuple whose
    first element is the items' ``torch.device``), less the items whose ``size(item)`` is 0,
    each non-empty group yielded with ``(key, indices)`` while its device is current (Triton
    launches on the current CUDA device, see :func:`on_device`)."""
    for k, idx in group_by(items, key).items():
        if size is not None:
            idx = [i for i in idx if size(items[i]) > 0]
        if idx:
            with on_device(k[0]):
                yield k, idx


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def group_by(items: Sequence, key) -> dict:
    """Indices of ``items`` grouped by ``key(item)``, in first-seen order."""
    groups: dict = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return groups
