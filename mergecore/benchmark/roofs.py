"""The machine's roofs, measured in the same run as the merges they bound.

- ``memcpy``: a host copy of a large buffer; GB/s counts bytes read + bytes written, the
  ceiling of a memory-bound CPU kernel that reads its inputs and writes its output once.
- ``file write`` / ``file read``: a file of random bytes in the benchmark directory, written
  and fsynced, then read twice with buffered ``pread``: once "cold" (its pages dropped from
  the page cache with ``POSIX_FADV_DONTNEED`` first) and once "warm" (just read, so cached).
  Before each read the share of its pages in the page cache is measured with ``mincore``,
  which says whether the cache served the read: a cold read with a high resident share means
  the kernel did not honour the drop.
- ``file write, direct`` / ``file read, direct``: the same file rewritten (then fsynced) and
  read through ``O_DIRECT`` descriptors, the way the merge moves tensors of 1 MiB or more
  (``mergecore.io.direct``); absent where the file system refuses ``O_DIRECT``. The end-to-end
  stage table bounds reading and writing by the faster of the buffered and the direct rate.
- CUDA: host-to-device from pinned memory, device-to-host into pinned memory (GB/s = bytes
  moved / time) and a device-to-device copy (bytes read + written), timed with CUDA events.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from mergecore.benchmark.timing import run_timed

_CHUNK = 64 << 20


def memcpy_gbps(nbytes: int, device: str = "cpu") -> float:
    """Copy bandwidth on ``device`` in GB/s (bytes read + bytes written), from the fastest of
    the repeats: a roof is what the machine can do, and other work only ever slows a copy."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = min(run_timed(lambda: dst.copy_(src), device, repeats=9, warmup=2))
    return 2 * nbytes / seconds / 1e9


def drop_page_cache(paths: list[Path] | list[str]) -> None:
    """Write back and drop the cached pages of ``paths`` (``POSIX_FADV_DONTNEED``)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                os.fsync(fd)
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths: list[Path] | list[str]) -> float | None:
    """Share of the pages of ``paths`` held in the page cache (``_C.cached_pages``: mmap +
    mincore, nothing is read); None when unknown (no compiled extension, or the kernel will
    not tell)."""
    try:
        from mergecore import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    cached = total = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            got, pages = _C.cached_pages(fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        if pages == 0 and os.path.getsize(path) > 0:
            return None
        cached += got
        total += pages
    return cached / total if total else None


def _read_file(path: Path, buf: torch.Tensor) -> int:
    """Read the whole file in ``_CHUNK`` pieces into ``buf`` with buffered ``pread``."""
    from mergecore.io.reader import native_pread

    native = native_pread()
    view = memoryview(buf.numpy())
    done = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            if native is not None:
                got = native(fd, done, len(view), buf.data_ptr(), 4)
            else:
                got = os.preadv(fd, [view], done)
            if got <= 0:
                return done
            done += got
    finally:
        os.close(fd)


def _aligned_buffer(nbytes: int, align: int) -> torch.Tensor:
    raw = torch.empty(nbytes + align, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % align
    return raw[skip: skip + nbytes]


def direct_file_roofs(path: Path, block: torch.Tensor) -> dict[str, float]:
    """Rewrite ``path`` in place through an ``O_DIRECT`` descriptor (then fsync), and read it
    back through one, as the merge moves its large tensors (``mergecore.io.direct``): GB/s of
    each, over the file's size rounded down to ``direct.ALIGN``. Empty where the platform, the
    file system or the build has no direct IO."""
    from mergecore.io import direct as direct_io

    try:
        from mergecore import _C  # type: ignore[attr-defined]
    except ImportError:
        return {}
    if not hasattr(os, "O_DIRECT") or not hasattr(_C, "pread_direct_into"):
        return {}
    align = direct_io.ALIGN
    nbytes = path.stat().st_size // align * align
    chunk = block.numel() // align * align
    if nbytes == 0 or chunk == 0:
        return {}
    buf = _aligned_buffer(chunk, align)
    buf.copy_(block[:chunk])
    try:
        dfd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError:
        return {}
    fd = os.open(path, os.O_RDONLY)
    try:
        view = memoryview(buf.numpy())
        start = time.perf_counter()
        for off in range(0, nbytes, chunk):
            os.pwrite(dfd, view[: min(chunk, nbytes - off)], off)
        os.fsync(dfd)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        for off in range(0, nbytes, chunk):
            _C.pread_direct_into(dfd, fd, off, min(chunk, nbytes - off), buf.data_ptr(), 4, align)
        read_s = time.perf_counter() - start
    except OSError:
        return {}  # e.g. a file system that takes the open but refuses the transfers
    finally:
        os.close(dfd)
        os.close(fd)
    return {"file_write_direct_gbps": nbytes / write_s / 1e9,
            "file_read_direct_gbps": nbytes / read_s / 1e9}


def file_roofs(directory: str | os.PathLike, nbytes: int) -> dict[str, Any]:
    """Write, then read cold and warm, a file of ``nbytes`` random bytes in ``directory``;
    then the same through ``O_DIRECT`` (``direct_file_roofs``) where the file system allows.

    Returns GB/s for each and the page-cache share found before each buffered read.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".mergecore-bench-io.bin"
    chunk = min(_CHUNK, nbytes)
    block = torch.randint(0, 256, (chunk,), dtype=torch.uint8)
    try:
        start = time.perf_counter()
        with open(path, "wb", buffering=0) as fh:
            left = nbytes
            view = memoryview(block.numpy())
            while left > 0:
                left -= fh.write(view[: min(left, chunk)])
            os.fsync(fh.fileno())
        write_s = time.perf_counter() - start
        buf = torch.empty(chunk, dtype=torch.uint8)
        drop_page_cache([path])
        cold_cached = resident_fraction([path])
        start = time.perf_counter()
        got = _read_file(path, buf)
        cold_s = time.perf_counter() - start
        warm_cached = resident_fraction([path])
        start = time.perf_counter()
        _read_file(path, buf)
        warm_s = time.perf_counter() - start
        if got != nbytes:
            raise OSError(f"read {got} of {nbytes} bytes back from {path}")
        direct = direct_file_roofs(path, block)
    finally:
        path.unlink(missing_ok=True)
    return {
        **direct,
        "file_bytes": nbytes,
        "file_write_gbps": nbytes / write_s / 1e9,
        "file_read_cold_gbps": nbytes / cold_s / 1e9,
        "file_read_cold_cached_share": cold_cached,
        "file_read_warm_gbps": nbytes / warm_s / 1e9,
        "file_read_warm_cached_share": warm_cached,
    }


def _cuda_seconds(fn, device: torch.device, repeats: int = 10) -> float:
    """Fastest of ``repeats`` runs of ``fn`` on the current stream, timed with CUDA events."""
    fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return min(times)


def cuda_roofs(nbytes: int, device: str = "cuda") -> dict[str, float]:
    """H2D (pinned source), D2H (pinned destination) and D2D copy GB/s on ``device``."""
    dev = torch.device(device)
    with torch.cuda.device(dev):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        host.fill_(1)
        gpu = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        gpu2 = torch.empty_like(gpu)
        h2d = _cuda_seconds(lambda: gpu.copy_(host, non_blocking=True), dev)
        d2h = _cuda_seconds(lambda: host.copy_(gpu, non_blocking=True), dev)
        d2d = _cuda_seconds(lambda: gpu2.copy_(gpu), dev)
    return {"h2d_pinned_gbps": nbytes / h2d / 1e9, "d2h_pinned_gbps": nbytes / d2h / 1e9,
            "d2d_copy_gbps": 2 * nbytes / d2d / 1e9}


def measure_roofs(directory: str | os.PathLike, device: str, *, memcpy_bytes: int,
                  file_bytes: int, cuda_bytes: int) -> dict[str, Any]:
    """Every roof that applies to ``device``, as one flat dict of GB/s values."""
    roofs: dict[str, Any] = {"memcpy_gbps": memcpy_gbps(memcpy_bytes, "cpu")}
    roofs.update(file_roofs(directory, file_bytes))
    if device.startswith("cuda"):
        roofs.update(cuda_roofs(cuda_bytes, device))
    return roofs
