"""The safetensors container format: a defensive header parser and a header builder.

Layout of a ``.safetensors`` file::

    [8 bytes: N, unsigned little-endian]  [N bytes: UTF-8 JSON object]  [data area]

The JSON maps each tensor name to ``{"dtype": code, "shape": [d0, d1, ...],
"data_offsets": [begin, end]}`` (offsets relative to the start of the data area), plus an
optional ``"__metadata__"`` object of string -> string. A tensor's bytes are
``data[begin:end]`` with ``end - begin == prod(shape) * itemsize(dtype)``, row-major, little
endian.

``read_header`` trusts nothing in the file: every way a header can be wrong is reported as a
``SafetensorsError`` naming the file (and the tensor), never as an unrelated exception.
It is slightly more permissive than the ``safetensors`` package in one respect only: gaps
between tensors and trailing bytes after the last one are accepted (they are harmless for
positional reads); overlaps are not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mergecore.io.errors import SafetensorsError
from mergecore.io.types import SAFETENSORS_DTYPES, TensorInfo

#: Largest header accepted (the same bound as the reference implementation).
MAX_HEADER_BYTES = 100_000_000
#: The header's JSON is padded with spaces so that the data area starts 8-byte aligned.
HEADER_ALIGN = 8
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
METADATA_KEY = "__metadata__"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """``prod(shape) * itemsize(dtype)``: the size of a tensor's bytes in a safetensors file."""
    n = SAFETENSORS_DTYPES[dtype][1]
    for s in shape:
        n *= s
    return n


def _capped_nbytes(dtype: str, shape: list[int], cap: int) -> int | None:
    """``tensor_nbytes``, or None as soon as it exceeds ``cap`` (no huge products)."""
    if 0 in shape:
        return 0
    n = SAFETENSORS_DTYPES[dtype][1]
    for s in shape:
        n *= s
        if n > cap:
            return None
    return n


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    pass


def parse_header(
    raw: bytes, data_size: int, file: str | os.PathLike = "<memory>"
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a header's JSON bytes (without the 8-byte length) against a data area.

    ``data_size`` is the number of bytes after the header in the file. Returns the tensors
    sorted by data offset (``TensorInfo.data_start`` is absolute: ``8 + len(raw) + begin``)
    and the ``__metadata__`` map (empty when absent).
    """
    path = Path(file)
    where = f"safetensors file {str(path)!r}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SafetensorsError(f"{where}: header is not valid UTF-8 ({exc.reason} at byte "
                               f"{exc.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise SafetensorsError(f"{where}: header names {exc.args[0]!r} twice") from None
    except (ValueError, RecursionError) as exc:
        raise SafetensorsError(f"{where}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(
            f"{where}: header must be a JSON object, found {type(header).__name__}")

    metadata = header.pop(METADATA_KEY, None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(v, str) for v in metadata.values()
    ):
        raise SafetensorsError(f"{where}: {METADATA_KEY} must be an object of string values")

    base = HEADER_ALIGN + len(raw)
    spans: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    for name, entry in header.items():
        what = f"{where}, tensor {name!r}"
        if not isinstance(entry, dict):
            raise SafetensorsError(f"{what}: entry must be an object, found "
                                   f"{type(entry).__name__}")
        if set(entry) != _ENTRY_KEYS:
            raise SafetensorsError(
                f"{what}: entry must have exactly the keys dtype, shape, data_offsets; "
                f"found {sorted(entry)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise SafetensorsError(f"{what}: unknown dtype {dtype!r} (supported: "
                                   f"{', '.join(SAFETENSORS_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise SafetensorsError(f"{what}: shape must be a list of non-negative integers, "
                                   f"found {shape!r:.200}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) for o in offsets)):
            raise SafetensorsError(f"{what}: data_offsets must be two integers, found "
                                   f"{offsets!r:.200}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise SafetensorsError(f"{what}: data_offsets [{begin}, {end}] are not "
                                   f"0 <= begin <= end")
        if end > data_size:
            raise SafetensorsError(
                f"{what}: data ends at byte {end} of the data area, but the file holds only "
                f"{data_size} bytes of data (truncated file?)")
        expected = _capped_nbytes(dtype, shape, 1 << 64)
        if expected != end - begin:
            needs = "more than 2**64" if expected is None else str(expected)
            raise SafetensorsError(
                f"{what}: data_offsets span {end - begin} bytes, but shape {shape!r:.200} of "
                f"{dtype} needs {needs}")
        spans.append((begin, end, name, dtype, tuple(shape)))

    spans.sort()
    prev_end, prev_name = 0, None
    for begin, end, name, _, _ in spans:
        if begin == end:
            continue
        if prev_name is not None and begin < prev_end:
            raise SafetensorsError(
                f"{where}: tensors {prev_name!r} and {name!r} overlap (bytes {begin}..{prev_end}"
                f" of the data area)")
        prev_end, prev_name = end, name

    tensors = {
        name: TensorInfo(name=name, dtype=dtype, shape=shape, file=path,
                         data_start=base + begin, nbytes=end - begin)
        for begin, end, name, dtype, shape in spans
    }
    return tensors, dict(metadata)


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate the header of the safetensors file at ``path``.

    Returns ``(tensors, metadata)``: tensors in data-offset order with absolute byte
    positions, and the ``__metadata__`` string map. Raises ``SafetensorsError`` (naming the
    file and tensor) for any malformed or truncated file; ``OSError`` only when the file
    cannot be opened or read at all.
    """
    path = Path(path)
    where = f"safetensors file {str(path)!r}"
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < HEADER_ALIGN:
            raise SafetensorsError(f"{where}: file is {size} bytes, too short to hold the "
                                   f"8-byte header length")
        n = int.from_bytes(fh.read(HEADER_ALIGN), "little")
        if n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{where}: header length {n} exceeds the limit of "
                                   f"{MAX_HEADER_BYTES} bytes (not a safetensors file?)")
        if HEADER_ALIGN + n > size:
            raise SafetensorsError(f"{where}: header length {n} runs past the end of the "
                                   f"{size}-byte file (truncated or not a safetensors file?)")
        raw = fh.read(n)
    if len(raw) != n:
        raise SafetensorsError(f"{where}: file shrank while its header was being read")
    return parse_header(raw, size - HEADER_ALIGN - n, path)


def _check_entry(name: Any, dtype: Any, shape: Any) -> tuple[int, ...]:
    if not isinstance(name, str) or name == METADATA_KEY:
        raise ValueError(f"invalid tensor name {name!r}")
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name!r}: unknown safetensors dtype {dtype!r}")
    try:
        shape = tuple(shape)
    except TypeError:
        raise ValueError(f"tensor {name!r}: shape {shape!r} is not a sequence") from None
    if not all(_is_int(s) and s >= 0 for s in shape):
        raise ValueError(f"tensor {name!r}: shape {shape!r} must hold non-negative integers")
    return shape


def data_layout(entries: Iterable[tuple[str, str, Sequence[int]]]) -> list[tuple[int, int]]:
    """``(begin, end)`` data-area offsets of tensors laid out back to back in the given order."""
    offsets = []
    pos = 0
    seen: set[str] = set()
    for name, dtype, shape in entries:
        shape = _check_entry(name, dtype, shape)
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice")
        seen.add(name)
        n = tensor_nbytes(dtype, shape)
        offsets.append((pos, pos + n))
        pos += n
    return offsets


def header_bytes(
    entries: Sequence[tuple[str, str, Sequence[int]]],
    metadata: dict[str, str] | None = None,
) -> tuple[bytes, list[tuple[int, int]]]:
    """Build a safetensors header for tensors stored back to back in the given order.

    Returns ``(header, offsets)``: ``header`` is the 8-byte little-endian length followed by
    the JSON padded with spaces to a multiple of 8 bytes, so the data area starts at
    ``len(header)``; ``offsets[i]`` is ``(begin, end)`` of ``entries[i]`` in the data area
    (absolute position: ``len(header) + begin``). ``metadata`` (string -> string) goes into
    ``__metadata__`` when given.
    """
    entries = list(entries)
    offsets = data_layout(entries)
    doc: dict[str, Any] = {}
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise ValueError("safetensors metadata must be a dict of str -> str")
        doc[METADATA_KEY] = dict(metadata)
    for (name, dtype, shape), (begin, end) in zip(entries, offsets):
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    try:
        body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"a tensor name or metadata value is not encodable as UTF-8: "
                         f"{exc}") from None
    body += b" " * (-len(body) % HEADER_ALIGN)
    if len(body) > MAX_HEADER_BYTES:
        raise ValueError(f"safetensors header of {len(body)} bytes exceeds the limit of "
                         f"{MAX_HEADER_BYTES} bytes")
    return len(body).to_bytes(HEADER_ALIGN, "little") + body, offsets
