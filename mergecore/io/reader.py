"""Positional reads of tensor bytes straight into caller-provided CPU buffers.

``TensorReader.read_into(info, dst)`` copies bytes ``[info.data_start, info.data_start +
info.nbytes)`` of ``info.file`` into the first ``info.nbytes`` bytes of ``dst`` with
``pread``-family calls: no intermediate ``bytes`` object, no mmap, so the only copy is the
kernel's page cache -> ``dst`` (and with ``drop_cache=True`` those cached pages are released
right after, which keeps resident memory bounded when streaming a model larger than RAM).

The compiled helper ``mergecore._C.pread_into(fd, offset, nbytes, dst_addr, nthreads)`` is
used when the extension is built; otherwise ``os.preadv`` into a ``memoryview`` of ``dst``,
split across ``nthreads`` threads for large tensors (``preadv`` releases the GIL).

Direct reads (Linux, compiled helper, ``direct=True``, the default unless
``MERGECORE_IO_DIRECT=0``; rules in ``mergecore.io.direct``): a tensor of at least
``direct.MIN_BYTES`` whose destination starts at an address congruent to its file offset
modulo ``direct.ALIGN`` (``direct_phase`` says
which; ``BufferPool.take(phase=)`` places a buffer so) is read through a second, ``O_DIRECT``
descriptor of the file: the device writes the aligned interior straight into ``dst``; only the
partial pages at both ends go through the page cache. That saves the kernel's copy and the page
cache's bookkeeping (measured on the 2-core VM: buffered reads of two 1 GB files cost 1.7-2.5 s
of system CPU, direct ones 0.1 s, at the same or a better rate), which on a CPU merge is CPU
time the kernels get back. A file system that refuses ``O_DIRECT`` (tmpfs) is read buffered.

Warm files: when the reader opens a file it asks the kernel how much of it the page cache
holds (``mincore`` on a mapping of the file; nothing is read). In a file that is mostly cached
(``direct.warm``) the tensors of at least ``direct.MIN_BYTES`` are read through the page cache,
which copies from memory, and with ``drop_cache`` their pages are *not* dropped: they were
cached before the reader came and stay so (a second merge of a model family that fits in
memory reads it from memory). The verdict is taken once per file, before the reader's own
reads (whose read-ahead would make the next tensor look cached).
"""

from __future__ import annotations

import errno as errno_mod
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergecore.io import direct as direct_io
from mergecore.io.errors import SafetensorsError
from mergecore.io.types import TensorInfo

if TYPE_CHECKING:
    from typing_extensions import Self

#: Reads smaller than this are never split across threads.
SPLIT_MIN_BYTES = 8 << 20
_PIECE_ALIGN = 1 << 20

_native_cache: list[Callable[..., Any] | None] = []


def native_pread() -> Callable[..., Any] | None:
    """``mergecore._C.pread_into`` if the compiled extension provides it, else None.

    Set ``MERGECORE_IO_NATIVE=0`` to force the pure-Python path.
    """
    if not _native_cache:
        fn = None
        if os.environ.get("MERGECORE_IO_NATIVE", "1") != "0":
            try:
                from mergecore import _C  # type: ignore[attr-defined]

                fn = getattr(_C, "pread_into", None)
            except ImportError:
                fn = None
        _native_cache.append(fn)
    return _native_cache[0]


def byte_view(dst: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous CPU tensor (no copy); errors otherwise."""
    if not isinstance(dst, torch.Tensor):
        raise TypeError(f"destination must be a torch.Tensor, got {type(dst).__name__}")
    if dst.device.type != "cpu":
        raise ValueError(f"destination must be a CPU tensor, got device {dst.device}")
    if not dst.is_contiguous():
        raise ValueError("destination tensor must be contiguous")
    t = dst.detach().reshape(-1)
    if t.dtype != torch.uint8:
        t = t.view(torch.uint8)
    return t


def _os_error(exc: OSError, info: TensorInfo) -> OSError:
    code = exc.errno or errno_mod.EIO
    return OSError(code, f"reading tensor {info.name!r} from {str(info.file)!r} failed: "
                         f"{exc.strerror or exc}")


class TensorReader:
    """Reads tensors of safetensors files (described by ``TensorInfo``) into CPU buffers.

    Keeps one read-only file descriptor per file until ``close()`` (or the end of a
    ``with`` block). Thread-safe: reads are positional, so threads may share the reader.

    ``nthreads``: threads used to split one large read (pure-Python path and native helper).
    ``drop_cache``: default for ``read_into(..., drop_cache=)``: after reading, advise the
    kernel to drop the file pages just read (``POSIX_FADV_DONTNEED``), except those of a
    warm tensor (module docstring).
    ``use_native``: None = use ``mergecore._C.pread_into`` when available; False = never;
    True = require it.
    ``direct``: read large tensors through an ``O_DIRECT`` descriptor when the destination
    is placed for it (module docstring); None = ``direct.enabled()``.
    """

    def __init__(self, *, nthreads: int = 4, drop_cache: bool = False,
                 use_native: bool | None = None, direct: bool | None = None):
        if nthreads < 1:
            raise ValueError("nthreads must be >= 1")
        self.nthreads = int(nthreads)
        self.drop_cache = bool(drop_cache)
        self._native = None if use_native is False else native_pread()
        if use_native is True and self._native is None:
            raise RuntimeError("mergecore._C.pread_into is not available (extension not built)")
        self._direct = None
        self._cached_pages = None
        if self._native is not None:
            from mergecore import _C  # type: ignore[attr-defined]

            self._cached_pages = getattr(_C, "cached_pages", None)
            if hasattr(os, "O_DIRECT") and (direct_io.enabled() if direct is None else direct):
                self._direct = getattr(_C, "pread_direct_into", None)
        self._fds: dict[Path, int] = {}
        self._direct_fds: dict[Path, int] = {}  # -1: the file system refuses O_DIRECT
        self.direct_reads = 0  # reads that took the O_DIRECT path (tests, stats)
        self.warm_reads = 0  # reads of tensors of warm files (tests, stats)
        self._file_warm: dict[Path, bool] = {}  # taken when the file is opened
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    @property
    def uses_native(self) -> bool:
        return self._native is not None

    @property
    def uses_direct(self) -> bool:
        return self._direct is not None

    def direct_phase(self, info: TensorInfo) -> int | None:
        """Where a destination buffer for ``info`` should start, modulo ``direct.ALIGN``, for
        a direct read (None: this read goes through the page cache, any buffer will do)."""
        if self._direct is None:
            return None
        phase = direct_io.phase(info.data_start, info.nbytes)
        return None if phase is None or self._is_warm(info) else phase

    def _is_warm(self, info: TensorInfo) -> bool:
        """Whether ``info`` is read as warm: at least ``direct.MIN_BYTES``, in a warm file."""
        if info.nbytes < direct_io.MIN_BYTES:
            return False
        self._fd(info.file)  # opening the file takes its verdict
        return self._file_warm.get(info.file, False)

    def _file_is_warm(self, fd: int) -> bool:
        """Whether the page cache holds most of the open file ``fd`` (``direct.warm``); False
        where the kernel does not tell or the extension is not built."""
        if self._cached_pages is None:
            return False
        try:
            cached, total = self._cached_pages(fd, 0, os.fstat(fd).st_size)
        except OSError:
            return False
        return direct_io.warm(cached, total)

    # ----- file descriptors -----------------------------------------------------------------
    def _fd(self, file: Path) -> int:
        with self._lock:
            if self._closed:
                raise ValueError("TensorReader is closed")
            fd = self._fds.get(file)
            if fd is None:
                fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                self._file_warm[file] = self._file_is_warm(fd)
                if hasattr(os, "posix_fadvise"):
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    except OSError:
                        pass
                self._fds[file] = fd
            return fd

    def _direct_fd(self, file: Path) -> int:
        """An O_DIRECT descriptor of ``file`` (-1 when the file system refuses one)."""
        with self._lock:
            fd = self._direct_fds.get(file)
            if fd is None:
                try:
                    fd = os.open(file, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    fd = -1
                self._direct_fds[file] = fd
            return fd

    def close(self) -> None:
        """Close every file descriptor (and the helper threads). Idempotent."""
        with self._lock:
            self._closed = True
            fds, self._fds = [*self._fds.values(), *self._direct_fds.values()], {}
            self._direct_fds = {}
            pool, self._pool = self._pool, None
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- reads ------------------------------------------------------------------------------
    def _pread_full(self, fd: int, mv: memoryview, offset: int, info: TensorInfo) -> None:
        pos, n = 0, len(mv)
        while pos < n:
            try:
                got = os.preadv(fd, [mv[pos:]], offset + pos)
            except InterruptedError:
                continue
            except OSError as exc:
                raise _os_error(exc, info) from exc
            if got == 0:
                raise SafetensorsError(
                    f"safetensors file {str(info.file)!r} ends at byte {offset + pos} while "
                    f"reading tensor {info.name!r} (bytes {info.data_start}.."
                    f"{info.data_start + info.nbytes}): truncated file?")
            pos += got

    def _python_read(self, fd: int, buf: torch.Tensor, info: TensorInfo) -> None:
        mv = memoryview(buf.numpy())[: info.nbytes]
        n = info.nbytes
        if self.nthreads == 1 or n < SPLIT_MIN_BYTES:
            self._pread_full(fd, mv, info.data_start, info)
            return
        pieces = min(self.nthreads, n // (SPLIT_MIN_BYTES // 2))
        step = -(-n // pieces)
        step += -step % _PIECE_ALIGN
        bounds = [(b, min(b + step, n)) for b in range(0, n, step)]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.nthreads - 1,
                                                thread_name_prefix="mergecore-pread")
            pool = self._pool
        futures = [pool.submit(self._pread_full, fd, mv[b:e], info.data_start + b, info)
                   for b, e in bounds[1:]]
        first_error: BaseException | None = None
        try:
            b, e = bounds[0]
            self._pread_full(fd, mv[b:e], info.data_start + b, info)
        except BaseException as exc:  # noqa: BLE001 - re-raised after the others finish
            first_error = exc
        for fut in futures:
            try:
                fut.result()
            except BaseException as exc:  # noqa: BLE001
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def read_into(self, info: TensorInfo, dst: torch.Tensor, *,
                  drop_cache: bool | None = None) -> None:
        """Fill the first ``info.nbytes`` bytes of ``dst`` with the tensor's raw bytes.

        ``dst``: a contiguous CPU tensor of any dtype (a ``uint8`` buffer, pinned or not, or
        a typed tensor, viewed as bytes) holding at least ``info.nbytes`` bytes. Bytes of
        ``dst`` past ``info.nbytes`` are left untouched. Raises ``SafetensorsError`` if the
        file ends early, ``OSError`` (naming tensor and file) on a read error.
        """
        buf = byte_view(dst)
        if buf.numel() < info.nbytes:
            raise ValueError(f"buffer of {buf.numel()} bytes is too small for tensor "
                             f"{info.name!r} ({info.nbytes} bytes, from {str(info.file)!r})")
        if info.nbytes == 0:
            return
        fd = self._fd(info.file)
        warm = self._is_warm(info)
        self.warm_reads += warm
        if self._native is not None:
            direct = not warm and self._direct is not None and direct_io.congruent(
                buf.data_ptr(), info.data_start, info.nbytes)
            try:
                dfd = self._direct_fd(info.file) if direct else -1
                if dfd >= 0:
                    got = self._direct(dfd, fd, info.data_start, info.nbytes, buf.data_ptr(),
                                       self.nthreads, direct_io.ALIGN)
                    self.direct_reads += 1
                else:
                    got = self._native(fd, info.data_start, info.nbytes, buf.data_ptr(),
                                       self.nthreads)
            except OSError as exc:
                raise _os_error(exc, info) from exc
            if got is not None and got != info.nbytes:
                raise SafetensorsError(
                    f"safetensors file {str(info.file)!r}: read {got} of {info.nbytes} bytes "
                    f"of tensor {info.name!r}: truncated file?")
        else:
            self._python_read(fd, buf, info)
        if (self.drop_cache if drop_cache is None else drop_cache) and not warm:
            self.drop_cached_pages(info)

    def read_tensor(self, info: TensorInfo, *, pin_memory: bool = False,
                    drop_cache: bool | None = None) -> torch.Tensor:
        """A new CPU tensor of ``info``'s dtype and shape holding its data."""
        out = torch.empty(info.shape, dtype=info.torch_dtype, pin_memory=pin_memory)
        self.read_into(info, out, drop_cache=drop_cache)
        return out

    # ----- page cache advice ------------------------------------------------------------------
    def _advise(self, info: TensorInfo, advice_name: str) -> None:
        advice = getattr(os, advice_name, None)
        if advice is None or not hasattr(os, "posix_fadvise") or info.nbytes == 0:
            return
        try:
            os.posix_fadvise(self._fd(info.file), info.data_start, info.nbytes, advice)
        except OSError:
            pass  # advice only

    def drop_cached_pages(self, info: TensorInfo) -> None:
        """Ask the kernel to drop the cached pages of ``info``'s bytes (POSIX_FADV_DONTNEED)."""
        self._advise(info, "POSIX_FADV_DONTNEED")

    def prefetch(self, info: TensorInfo) -> None:
        """Ask the kernel to start reading ``info``'s bytes ahead of use (POSIX_FADV_WILLNEED)."""
        self._advise(info, "POSIX_FADV_WILLNEED")
