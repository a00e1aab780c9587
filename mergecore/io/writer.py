"""The streaming safetensors writer: headers from the plan, tensor bytes at final offsets.

Everything about the output is known before the first byte is computed: names, dtypes,
shapes and therefore shard boundaries, headers and every tensor's offset. So each shard
file is created with its header already in place and each tensor's bytes are written with
``pwrite`` at their final position, in any order; no shard is ever held in memory.

Crash safety: a shard lives under a hidden temporary name
(``.model-00001-of-00003.safetensors.partial``) until all its tensors are written; it is then
fsynced and renamed into place, and its sha256 recorded in ``.mergecore-manifest.json``
(rewritten atomically). The index ``model.safetensors.index.json`` is written last, by
``finalize()``. A file with a final name is therefore always complete.

Sharding follows mergekit 0.1.5 (``mergekit/io/tensor_writer.py``): tensors are taken in
order and a new shard starts before a tensor that would push a non-empty shard's data size
past ``max_shard_bytes`` (so a tensor larger than the limit gets a shard of its own); one
shard is named ``model.safetensors``, several ``model-00001-of-00003.safetensors``; the index
exists only when there are several shards.

Direct writes (rules in ``mergecore.io.direct``): a tensor of at least ``direct.MIN_BYTES``
whose bytes sit at an address congruent to its file offset modulo ``direct.ALIGN``
(``StreamingWriter.direct_phase`` says
which; the pipeline places its output buffers so) goes to the device through a second,
``O_DIRECT`` descriptor of the shard: its aligned interior skips the page cache, only the
partial pages at its two ends are written through it. On the 2-core VM, writing 2 GB through
the page cache costs 4-5 s of system CPU, direct 0.2 s, at 3x the rate. A file system that
refuses ``O_DIRECT`` (tmpfs) gets buffered writes; ``MERGECORE_IO_DIRECT=0`` turns direct
writes off. The sha256 of bytes written in file order is computed on a helper thread while
they are being written (hashlib releases the GIL), not after.
"""

from __future__ import annotations

import errno as errno_mod
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

from mergecore.io import direct as direct_io
from mergecore.io.errors import OutputFileError, TensorWriteError
from mergecore.io.safetensors_format import data_layout, header_bytes
from mergecore.io.types import TORCH_TO_SAFETENSORS

if TYPE_CHECKING:
    from typing_extensions import Self

MANIFEST_NAME = ".mergecore-manifest.json"
DEFAULT_METADATA = {"format": "pt"}
_HASH_CHUNK = 16 << 20

_hash_executor: list[ThreadPoolExecutor] = []
_hash_executor_lock = threading.Lock()


def _hasher_thread() -> ThreadPoolExecutor:
    """One process-wide thread that runs sha256 updates in submission order (so a write's
    hash overlaps with the write, and updates of one file never run out of order)."""
    with _hash_executor_lock:
        if not _hash_executor:
            _hash_executor.append(ThreadPoolExecutor(1, thread_name_prefix="mergecore-sha256"))
        return _hash_executor[0]


def _close_quietly(fd: int | None) -> None:
    """Close ``fd`` (if any), ignoring errors: for descriptors of files being given up."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _address(mv: memoryview) -> int:
    """The address of a C-contiguous byte buffer's first byte."""
    import numpy as np

    return int(np.frombuffer(mv, dtype=np.uint8).ctypes.data) if mv.nbytes else 0


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSpec:
    """One output file: its name, its tensors in data order, and their data size in bytes."""

    filename: str
    entries: tuple[tuple[str, str, tuple[int, ...]], ...]
    data_bytes: int


@dataclass
class ShardPlan:
    """Where every output tensor goes: shard files, the weight map and the index name."""

    shards: list[ShardSpec]
    weight_map: dict[str, str]
    total_size: int
    index_filename: str | None
    _shard_of: dict[str, int] = field(default_factory=dict, repr=False)

    def shard_index(self, name: str) -> int:
        """Position in ``shards`` of the shard that holds tensor ``name``."""
        return self._shard_of[name]

    def index_json(self, extra_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """The content of ``model.safetensors.index.json`` (``metadata.total_size`` is the sum
        of tensor data sizes, headers excluded, as transformers and mergekit write it)."""
        return {
            "metadata": {"total_size": self.total_size, **(extra_metadata or {})},
            "weight_map": dict(self.weight_map),
        }


def shard_filename(index: int, count: int, basename: str = "model") -> str:
    """``model.safetensors`` for a single shard, else ``model-00002-of-00005.safetensors``."""
    if count == 1:
        return f"{basename}.safetensors"
    return f"{basename}-{index + 1:05d}-of-{count:05d}.safetensors"


def plan_shards(
    entries: Sequence[tuple[str, str, Sequence[int]]],
    max_shard_bytes: int | None,
    *,
    basename: str = "model",
) -> ShardPlan:
    """Group ``(name, dtype_code, shape)`` entries, in order, into shards (mergekit's cut).

    A new shard starts before a tensor when the current shard is non-empty and its data size
    plus the tensor's would exceed ``max_shard_bytes``; None or a value <= 0 means one shard.
    An empty ``entries`` gives a plan with no shards.
    """
    entries = [(n, d, tuple(s)) for n, d, s in entries]
    offsets = data_layout(entries)  # validates names, dtypes, shapes; rejects duplicates
    limit = max_shard_bytes if max_shard_bytes and max_shard_bytes > 0 else None
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = []
    sizes: list[int] = []
    for entry, (begin, end) in zip(entries, offsets):
        n = end - begin
        if not groups or (limit is not None and groups[-1] and sizes[-1] + n > limit):
            groups.append([])
            sizes.append(0)
        groups[-1].append(entry)
        sizes[-1] += n
    count = len(groups)
    shards = [ShardSpec(shard_filename(i, count, basename), tuple(g), s)
              for i, (g, s) in enumerate(zip(groups, sizes))]
    weight_map = {name: spec.filename for spec in shards for name, _, _ in spec.entries}
    shard_of = {name: i for i, spec in enumerate(shards) for name, _, _ in spec.entries}
    return ShardPlan(
        shards=shards,
        weight_map=weight_map,
        total_size=sum(sizes),
        index_filename=f"{basename}.safetensors.index.json" if count > 1 else None,
        _shard_of=shard_of,
    )


# ---------------------------------------------------------------------------------------------
# small file helpers
# ---------------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on directories
    finally:
        os.close(fd)


def atomic_write(path: Path, fill: Callable[[BinaryIO], object], fsync: bool, *,
                 what: str | None = None) -> None:
    """Create ``path`` with the bytes ``fill(fh)`` writes, through the temporary
    ``.NAME.partial``, renamed into place when complete. On any failure or interruption
    (ENOSPC, Ctrl-C) the temporary file is removed; an OS error is raised as
    ``OutputFileError`` that says ``what`` failed (default: writing ``path``)."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as fh:
            fill(fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, OutputFileError):
            raise OutputFileError(exc.errno or errno_mod.EIO,
                                  f"{what or f'writing {str(path)!r}'} failed: "
                                  f"{exc.strerror or exc}") from exc
        raise
    if fsync:
        _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, fsync: bool) -> None:
    """Write ``data`` to ``path`` through a temporary name (``atomic_write``)."""
    atomic_write(path, lambda fh: fh.write(data), fsync)


def _as_bytes(name: str, data: Any, dtype: str, shape: tuple[int, ...]) -> memoryview:
    """Validate ``data`` against the planned dtype/shape; a flat byte view of it."""
    if isinstance(data, torch.Tensor):
        if data.device.type != "cpu":
            raise TensorWriteError(f"tensor {name!r} must be on the CPU to be written, "
                                   f"found device {data.device}")
        code = TORCH_TO_SAFETENSORS.get(data.dtype)
        if code != dtype:
            raise TensorWriteError(f"tensor {name!r} was planned as {dtype}, got {data.dtype}")
        if tuple(data.shape) != shape:
            raise TensorWriteError(f"tensor {name!r} was planned with shape {list(shape)}, "
                                   f"got {list(data.shape)}")
        t = data.detach().contiguous().reshape(-1)
        if t.dtype != torch.uint8:
            t = t.view(torch.uint8)
        return memoryview(t.numpy())
    try:
        mv = memoryview(data)
    except TypeError:
        raise TensorWriteError(f"tensor {name!r}: cannot write a {type(data).__name__}; "
                               f"pass a torch.Tensor or a bytes-like buffer") from None
    if not mv.c_contiguous:
        raise TensorWriteError(f"tensor {name!r}: buffer must be C-contiguous")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


class ShardWriter:
    """One output file: created under a temporary name with its header, filled by ``pwrite``,
    and renamed into place by ``complete()``.

    ``tensors`` maps each tensor name to ``(absolute offset, nbytes)`` in this file.
    The sha256 of the file is computed while writing as long as bytes arrive in file
    order, and by reading back the rest at ``complete()`` otherwise.
    """

    def __init__(self, final_path: Path, header: bytes, tensors: dict[str, tuple[int, int]],
                 *, fsync: bool = True, checksum: bool = True, direct: bool | None = None):
        self.final_path = final_path
        self.direct = direct_io.enabled() if direct is None else direct
        self._direct_fd: int | None = None
        self.direct_bytes = 0  # bytes that went through the O_DIRECT descriptor
        self.partial_path = final_path.with_name(f".{final_path.name}.partial")
        self.header = header
        self.tensors = tensors
        self.size = len(header) + sum(n for _, n in tensors.values())
        self.fsync = fsync
        self.checksum = checksum
        self.sha256: str | None = None
        self._fd: int | None = None
        self._hasher = hashlib.sha256() if checksum else None
        self._hash_pos = 0
        self._lock = threading.Lock()
        self.done = False

    def _error(self, exc: OSError, what: str) -> OutputFileError:
        return OutputFileError(
            exc.errno or errno_mod.EIO,
            f"{what} output file {str(self.final_path)!r} (temporary "
            f"{self.partial_path.name!r}) failed: {exc.strerror or exc}")

    def open(self) -> None:
        """Create the temporary file with the header written (tensor writes extend it)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        try:
            self._fd = os.open(self.partial_path, flags, 0o644)
        except OSError as exc:
            raise self._error(exc, "creating") from exc
        if self.direct:
            try:
                self._direct_fd = os.open(self.partial_path, os.O_WRONLY | os.O_DIRECT
                                          | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                self._direct_fd = None  # the file system refuses O_DIRECT: page cache only
        self.pwrite(0, memoryview(self.header), "(header)")

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def fileno(self) -> int | None:
        """The descriptor of the open temporary file (None when not open)."""
        return self._fd

    def filenos(self) -> list[int]:
        """Every open descriptor of the temporary file (buffered, and O_DIRECT if any)."""
        return [fd for fd in (self._fd, self._direct_fd) if fd is not None]

    def direct_phase(self, offset: int, nbytes: int) -> int | None:
        """Where the bytes of a write at ``offset`` should sit in memory, modulo
        ``direct.ALIGN``, for a direct write (None: it goes through the page cache)."""
        return direct_io.phase(offset, nbytes) if self.direct else None

    def _write_all(self, fd: int, mv: memoryview, offset: int, name: str) -> int:
        """pwrite all of ``mv`` (retrying short writes); returns the bytes written, which are
        fewer only when ``fd`` is the O_DIRECT descriptor and the file system refuses it."""
        pos, n = 0, len(mv)
        while pos < n:
            try:
                done = os.pwrite(fd, mv[pos:], offset + pos)
            except InterruptedError:
                continue
            except OSError as exc:
                if fd == self._direct_fd and exc.errno == errno_mod.EINVAL:
                    return pos
                raise self._error(exc, f"writing tensor {name!r} to") from exc
            if done == 0:
                raise self._error(OSError(errno_mod.EIO, "write returned 0"),
                                  f"writing tensor {name!r} to")
            pos += done
            if fd == self._direct_fd and pos % direct_io.ALIGN:
                return pos  # an unaligned short write: the rest through the page cache
        return pos

    def _write_bytes(self, offset: int, mv: memoryview, name: str) -> None:
        fd = self._fd
        n = len(mv)
        dfd = self._direct_fd
        align = direct_io.ALIGN
        if dfd is not None and direct_io.congruent(_address(mv), offset, n):
            begin = -(-offset // align) * align - offset  # relative to offset
            end = (offset + n) // align * align - offset
            if end > begin:
                self._write_all(fd, mv[:begin], offset, name)
                done = self._write_all(dfd, mv[begin:end], offset + begin, name)
                with self._lock:
                    self.direct_bytes += done
                if done < end - begin:
                    self._write_all(fd, mv[begin + done:end], offset + begin + done, name)
                self._write_all(fd, mv[end:], offset + end, name)
                return
        self._write_all(fd, mv, offset, name)

    def pwrite(self, offset: int, mv: memoryview, name: str) -> None:
        """Write all of ``mv`` at ``offset`` (retrying short writes); hash it if in order."""
        if self._fd is None:
            raise TensorWriteError(f"output file {str(self.final_path)!r} is not open")
        n = len(mv)
        hashing: Future | None = None
        if self._hasher is not None and n:
            with self._lock:  # claim the position and queue the update in file order
                if offset == self._hash_pos:
                    self._hash_pos += n
                    hashing = _hasher_thread().submit(self._hasher.update, mv)
        try:
            self._write_bytes(offset, mv, name)
        finally:
            if hashing is not None:
                hashing.result()  # the caller may reuse mv's memory once this returns

    def complete(self) -> str | None:
        """Finish the hash, fsync, close and rename into place; returns the sha256 (hex)."""
        fd = self._fd
        if fd is None:
            raise TensorWriteError(f"output file {str(self.final_path)!r} is not open")
        try:
            if self._hasher is not None:
                pos = self._hash_pos
                while pos < self.size:
                    chunk = os.pread(fd, min(_HASH_CHUNK, self.size - pos), pos)
                    if not chunk:
                        raise OSError(errno_mod.EIO, "file shorter than planned")
                    self._hasher.update(chunk)
                    pos += len(chunk)
                self.sha256 = self._hasher.hexdigest()
            if self.fsync:
                os.fsync(fd)
        except OSError as exc:
            raise self._error(exc, "finishing") from exc
        self._fd = None
        self._close_direct()
        os.close(fd)
        try:
            os.replace(self.partial_path, self.final_path)
        except OSError as exc:
            raise self._error(exc, "renaming") from exc
        self.done = True
        if self.fsync:
            _fsync_dir(self.final_path.parent)
        return self.sha256

    def _close_direct(self) -> None:
        dfd, self._direct_fd = self._direct_fd, None
        _close_quietly(dfd)

    def discard(self) -> None:
        """Close and delete the temporary file (and the final file if already renamed)."""
        self._close_direct()
        fd, self._fd = self._fd, None
        _close_quietly(fd)
        for p in (self.partial_path, self.final_path if self.done else None):
            if p is not None:
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass


class StreamingWriter:
    """Writes a ``ShardPlan`` into ``out_dir`` tensor by tensor, in any order.

    ``write(name, data)`` puts one tensor's bytes at its final offset (``data``: a CPU
    tensor of the planned dtype and shape, or a bytes-like buffer of the planned size);
    ``finalize()`` checks that every tensor was written and writes the index last;
    ``abort()`` deletes every file this writer created. Used as a context manager it
    finalizes on success and aborts on an exception. An OS error while writing (ENOSPC,
    EIO ...) aborts and raises ``OutputFileError`` naming the output file. Thread-safe:
    several threads may write different tensors at once.

    A completed shard is finished (rest of its sha256, fsync, rename, manifest update) on a
    background thread, so writing the next shard overlaps with flushing the last one;
    ``wait()`` blocks until every completed shard is finished (``finalize()`` does too), and
    an error there is raised by the next ``write()``/``wait()``/``finalize()``.

    ``metadata`` is each shard's safetensors ``__metadata__`` (default ``{"format": "pt"}``);
    ``index_metadata`` goes into the index's ``metadata`` next to ``total_size``.
    ``check_space``: fail up front with ENOSPC when the file system lacks room for the plan.
    ``manifest_extra``: more keys for the manifest (``mergecore.resume`` records the plan's
    fingerprint there). ``completed``: ``{shard filename: sha256}`` of shards already in
    place and verified by the caller (a resumed merge): they count as written and are not
    touched. ``suspend()`` stops like ``abort()`` but keeps completed shards and the manifest;
    ``keep_complete_on_os_error``: an OS error suspends instead of aborting (so that a merge
    stopped by a full disk can be resumed).
    """

    def __init__(self, out_dir: str | os.PathLike, plan: ShardPlan,
                 metadata: dict[str, str] | None = None, *, fsync: bool = True,
                 checksum: bool = True, manifest: bool = True, check_space: bool = True,
                 index_metadata: dict[str, Any] | None = None,
                 manifest_extra: dict[str, Any] | None = None,
                 completed: dict[str, str | None] | None = None,
                 keep_complete_on_os_error: bool = False):
        self.out_dir = Path(out_dir)
        self.plan = plan
        self.metadata = dict(DEFAULT_METADATA if metadata is None else metadata)
        self.fsync = fsync
        self.manifest_path = self.out_dir / MANIFEST_NAME if manifest else None
        if index_metadata is None:
            from mergecore import __version__

            index_metadata = {"mergecore_version": __version__}
        self.index_metadata = index_metadata
        self.manifest_extra = dict(manifest_extra or {})
        self.keep_complete_on_os_error = keep_complete_on_os_error
        self._lock = threading.Lock()
        self._manifest_lock = threading.Lock()
        self._slots: dict[str, tuple[ShardWriter, int, int, str, tuple[int, ...]]] = {}
        self._claimed: set[str] = set()
        self._written: set[str] = set()
        self._remaining: list[int] = []
        self.shards: list[ShardWriter] = []
        self._state = "open"
        self._index_written = False
        self._finisher: ThreadPoolExecutor | None = None
        self._finishing: list[Future] = []
        self._side_files: list[dict[str, Any]] | None = None
        self._index_sha256: str | None = None

        for spec in plan.shards:
            header, offsets = header_bytes(spec.entries, self.metadata)
            tensors = {name: (len(header) + b, e - b)
                       for (name, _, _), (b, e) in zip(spec.entries, offsets)}
            shard = ShardWriter(self.out_dir / spec.filename, header, tensors, fsync=fsync,
                                checksum=checksum)
            self.shards.append(shard)
            self._remaining.append(len(spec.entries))
            for name, dtype, shape in spec.entries:
                off, n = tensors[name]
                self._slots[name] = (shard, off, n, dtype, shape)
            if completed is not None and spec.filename in completed:
                shard.done, shard.sha256 = True, completed[spec.filename]
                self._remaining[-1] = 0
                names = [name for name, _, _ in spec.entries]
                self._claimed.update(names)
                self._written.update(names)

        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputFileError(exc.errno or errno_mod.EIO, f"cannot create output "
                                  f"directory {str(self.out_dir)!r}: {exc.strerror}") from exc
        if check_space:
            self._check_space()
        self._write_manifest()

    # ----- bookkeeping --------------------------------------------------------------------------
    def _check_space(self) -> None:
        need = 0
        for shard in self.shards:
            existing = shard.final_path.stat().st_size if shard.final_path.is_file() else 0
            need += max(0, shard.size - existing)
        try:
            st = os.statvfs(self.out_dir)
        except (OSError, AttributeError):
            return
        free = st.f_bavail * st.f_frsize
        if need > free:
            raise OutputFileError(
                errno_mod.ENOSPC, f"not enough free space in {str(self.out_dir)!r} for the "
                f"merged model: it needs {need} bytes, {free} are available")

    def _write_manifest(self) -> None:
        if self.manifest_path is None:
            return
        with self._manifest_lock:
            doc = {
                "format": "mergecore-manifest",
                "version": 1,
                **self.manifest_extra,
                "complete": all(s.done for s in self.shards),
                # every file of the output written and recorded (finalize): until then the
                # output is unfinished even when all of its shards are complete
                "finalized": self._side_files is not None,
                "index": self.plan.index_filename,
                "shards": [
                    {"file": s.final_path.name, "tensors": len(s.tensors), "bytes": s.size,
                     "done": s.done, "sha256": s.sha256}
                    for s in self.shards
                ],
            }
            if self._side_files is not None:
                doc["index_sha256"] = self._index_sha256
                doc["side_files"] = self._side_files
            atomic_write_bytes(self.manifest_path,
                                (json.dumps(doc, indent=2) + "\n").encode(), self.fsync)

    @property
    def written(self) -> frozenset[str]:
        """Names of the tensors written so far."""
        with self._lock:
            return frozenset(self._written)

    def missing(self) -> list[str]:
        """Names of the planned tensors not written yet, in plan order."""
        with self._lock:
            return [n for n in self._slots if n not in self._written]

    # ----- background completion of shards -------------------------------------------------------
    def _finish(self, shard: ShardWriter) -> None:
        if self._state == "aborted":
            return
        shard.complete()
        self._write_manifest()

    def _raise_finisher_error(self, wait: bool) -> None:
        with self._lock:
            futures = list(self._finishing)
        for fut in futures:
            if not wait and not fut.done():
                continue
            exc = fut.exception()
            if exc is not None:
                self._stop_after_error(exc)
                raise exc

    def wait(self) -> None:
        """Block until every completed shard is fsynced, renamed and in the manifest."""
        self._raise_finisher_error(wait=True)

    # ----- writing ------------------------------------------------------------------------------
    def direct_phase(self, name: str) -> int | None:
        """Where tensor ``name``'s bytes should sit in memory, modulo ``direct.ALIGN``, for
        ``write`` to send them to the device directly (None: any place will do)."""
        slot = self._slots.get(name)
        return None if slot is None else slot[0].direct_phase(slot[1], slot[2])

    def write(self, name: str, data: Any) -> None:
        """Write tensor ``name``'s bytes at its final offset (see the class docstring)."""
        self._raise_finisher_error(wait=False)
        slot = self._slots.get(name)
        if slot is None:
            raise TensorWriteError(f"tensor {name!r} is not in the output plan")
        shard, offset, nbytes, dtype, shape = slot
        mv = _as_bytes(name, data, dtype, shape)
        if mv.nbytes != nbytes:
            raise TensorWriteError(f"tensor {name!r} ({dtype} {list(shape)}) needs {nbytes} "
                                   f"bytes, got {mv.nbytes}")
        with self._lock:
            if self._state != "open":
                raise TensorWriteError(f"cannot write tensor {name!r}: the writer is "
                                       f"{self._state}")
            if name in self._claimed:
                raise TensorWriteError(f"tensor {name!r} is written twice")
            self._claimed.add(name)
            if not shard.is_open and not shard.done:
                try:
                    shard.open()
                except BaseException:
                    self._claimed.discard(name)
                    raise
        try:
            shard.pwrite(offset, mv, name)
        except OutputFileError as exc:
            self._stop_after_error(exc)
            raise
        k = self.plan.shard_index(name)
        with self._lock:
            self._written.add(name)
            self._remaining[k] -= 1
            finished = self._remaining[k] == 0
        if finished:
            with self._lock:
                if self._state == "aborted":
                    return
                if self._finisher is None:
                    self._finisher = ThreadPoolExecutor(1, thread_name_prefix="mergecore-shard")
                self._finishing.append(self._finisher.submit(self._finish, shard))

    def finalize(self, side_files: Iterable[str] = ()) -> list[Path]:
        """Check that every planned tensor was written, then write the index (last).

        ``side_files``: names of the other files of the output already in ``out_dir``
        (config.json, the tokenizer ...); their sizes and sha256, and the index's sha256, are
        recorded in the manifest just before the index is written, so that ``mergecore
        verify`` can check every file of the output. Returns the paths of the files written
        (shards, then the index). Idempotent.
        """
        if self._state == "open":
            self.wait()
        with self._lock:
            if self._state == "finalized":
                return self._final_files()
            if self._state in ("aborted", "suspended"):
                raise TensorWriteError(f"cannot finalize: the writer was {self._state}")
            missing = [n for n in self._slots if n not in self._written]
            if missing:
                shown = ", ".join(repr(n) for n in missing[:8])
                more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
                raise TensorWriteError(f"cannot finalize {str(self.out_dir)!r}: "
                                       f"{len(missing)} planned tensors were never written: "
                                       f"{shown}{more}")
            self._state = "finalized"
        index = None
        if self.plan.index_filename is not None:
            index = (json.dumps(self.plan.index_json(self.index_metadata), indent=2)
                     + "\n").encode()
        try:
            self._record_side_files(side_files, index)
        except BaseException as exc:
            with self._lock:
                self._state = "open"
            if isinstance(exc, OutputFileError):
                self._stop_after_error(exc)
            raise
        if index is not None:
            self._index_written = True  # it may exist from here on: abort/suspend remove it
            try:
                atomic_write_bytes(self.out_dir / self.plan.index_filename, index, self.fsync)
            except BaseException as exc:  # a full disk, or Ctrl-C while it is written
                with self._lock:
                    self._state = "open"
                if isinstance(exc, OutputFileError):
                    self._stop_after_error(exc)
                raise
        self._shutdown_finisher()
        return self._final_files()

    def _record_side_files(self, names: Iterable[str], index: bytes | None) -> None:
        """Put ``names``' sizes and sha256 and the index's sha256 in the manifest."""
        if self.manifest_path is None:
            return
        from mergecore.checksums import file_sha256

        records = []
        for name in dict.fromkeys(names):
            path = self.out_dir / name
            try:
                records.append({"file": name, "bytes": path.stat().st_size,
                                "sha256": file_sha256(path)})
            except OSError as exc:
                raise OutputFileError(exc.errno or errno_mod.EIO, f"cannot read the output "
                                      f"file {str(path)!r} to record its checksum: "
                                      f"{exc.strerror or exc}") from exc
        self._side_files = records
        self._index_sha256 = hashlib.sha256(index).hexdigest() if index is not None else None
        self._write_manifest()

    def _shutdown_finisher(self) -> None:
        with self._lock:
            finisher, self._finisher = self._finisher, None
        if finisher is not None:
            finisher.shutdown(wait=True)

    def _final_files(self) -> list[Path]:
        files = [s.final_path for s in self.shards]
        if self.plan.index_filename is not None:
            files.append(self.out_dir / self.plan.index_filename)
        return files

    def abort(self) -> None:
        """Delete every file this writer created (temporary and completed shards, the index,
        the manifest). No-op after ``finalize()``; idempotent."""
        with self._lock:
            if self._state in ("finalized", "aborted"):
                return
            self._state = "aborted"
        self._shutdown_finisher()  # a shard being renamed right now is then deleted below
        for shard in self.shards:
            shard.discard()
        self._remove_index()
        paths = [self.manifest_path, self.manifest_path.with_name(
            f".{self.manifest_path.name}.partial") if self.manifest_path else None]
        for p in paths:
            if p is not None:
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass

    @property
    def finalized(self) -> bool:
        """Whether ``finalize()`` completed: every shard and the index are in place."""
        return self._state == "finalized"

    def _remove_index(self) -> None:
        """Delete the index if this writer began writing it (a stopped output has none)."""
        if self._index_written and self.plan.index_filename is not None:
            (self.out_dir / self.plan.index_filename).unlink(missing_ok=True)

    def _stop_after_error(self, exc: BaseException) -> None:
        if self.keep_complete_on_os_error and isinstance(exc, OSError):
            self.suspend()
        else:
            self.abort()

    def suspend(self) -> None:
        """Stop after an interruption, keeping what is complete: shards already handed to the
        finisher are completed, temporary files of the others are deleted, and the manifest
        (which lists the completed shards and their checksums) stays for a resumed run.
        No-op after ``finalize()`` or ``abort()``."""
        with self._lock:
            if self._state in ("finalized", "aborted", "suspended"):
                return
            self._state = "suspended"
        self._shutdown_finisher()
        for shard in self.shards:
            if not shard.done:
                shard.discard()
        self._remove_index()
        self._side_files = None  # the caller removes them: a resumed run writes them again
        try:
            self._write_manifest()
        except OutputFileError:
            pass  # the previous manifest still lists only shards that were complete

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.finalize()
        except BaseException:
            self.abort()
            raise


def write_checkpoint(out_dir: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]],
                     max_shard_bytes: int | None = None, **kwargs: Any) -> list[Path]:
    """Write named CPU tensors (in the given order) as a sharded safetensors checkpoint."""
    items = list(tensors)
    entries = []
    for name, t in items:
        if t.dtype not in TORCH_TO_SAFETENSORS:
            raise TensorWriteError(f"tensor {name!r}: dtype {t.dtype} has no safetensors code")
        entries.append((name, TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape)))
    plan = plan_shards(entries, max_shard_bytes)
    with StreamingWriter(out_dir, plan, **kwargs) as writer:
        for name, t in items:
            writer.write(name, t)
    return writer.finalize()


__all__ = [
    "MANIFEST_NAME",
    "ShardPlan",
    "ShardSpec",
    "ShardWriter",
    "StreamingWriter",
    "atomic_write",
    "atomic_write_bytes",
    "plan_shards",
    "shard_filename",
    "write_checkpoint",
]
