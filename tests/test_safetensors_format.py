"""The safetensors header parser and builder, against the ``safetensors`` package.

Round trips: files written by ``safetensors`` parse to the same tensors (names, dtypes,
shapes, bytes) and headers built here are byte-identical to the package's for the same
layout, and load with ``safe_open``. Property tests feed malformed headers, corrupted and
truncated files: only ``SafetensorsError`` may escape, and whatever the package itself
accepts must be accepted here too.
"""

from __future__ import annotations

import itertools
import json
import string
import struct
import tempfile
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergecore.io.errors import SafetensorsError
from mergecore.io.safetensors_format import (
    MAX_HEADER_BYTES,
    header_bytes,
    parse_header,
    read_header,
    tensor_nbytes,
)
from mergecore.io.types import SAFETENSORS_DTYPES, TORCH_TO_SAFETENSORS

ALL_CODES = list(SAFETENSORS_DTYPES)
SHAPES = [(), (1,), (0,), (5, 0, 3), (7,), (13, 17), (5, 123, 123), (2, 3, 5, 7), (257,)]


def _random_tensor(code: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random bits of the right dtype (never zeros): raw uint8 noise reinterpreted."""
    dtype, itemsize = SAFETENSORS_DTYPES[code]
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(1, 256, (n * itemsize,), dtype=torch.uint8, generator=gen)
    if code == "BOOL":
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def _file_bytes(path: Path, info) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(info.data_start)
        return fh.read(info.nbytes)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _raw_header(path: Path) -> bytes:
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        return struct.pack("<Q", n) + fh.read(n)


# ------------------------------------------------------------------------------------------------
# round trips against the safetensors package
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"a": "1", "ünï": "çødé ✓"}])
def test_files_written_by_safetensors_parse_identically(tmp_path, metadata):
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for i, code in enumerate(ALL_CODES):
        for j, shape in enumerate(SHAPES):
            tensors[f"layer.{i}.{j}.w"] = _random_tensor(code, shape, gen)
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(tensors, path, metadata=metadata)

    infos, meta = read_header(path)
    assert meta == (metadata or {})
    assert set(infos) == set(tensors)
    starts = [i.data_start for i in infos.values()]
    assert starts == sorted(starts)
    with safetensors.safe_open(path, "pt") as f:
        assert set(f.keys()) == set(infos)
        for name, info in infos.items():
            ref = f.get_tensor(name)
            assert info.name == name and info.file == path
            assert info.torch_dtype == ref.dtype == tensors[name].dtype
            assert info.shape == tuple(ref.shape)
            assert info.nbytes == tensor_nbytes(info.dtype, info.shape)
            assert _file_bytes(path, info) == _tensor_bytes(tensors[name])

    # a header built here for the same layout is the package's header: byte for byte (the
    # package orders several metadata keys arbitrarily, so then as JSON of the same length)
    entries = [(i.name, i.dtype, i.shape) for i in infos.values()]
    built, offsets = header_bytes(entries, metadata)
    theirs = _raw_header(path)
    if len(metadata or {}) <= 1:
        assert built == theirs
    else:
        assert len(built) == len(theirs) and json.loads(built[8:]) == json.loads(theirs[8:])
    assert [len(built) + b for b, _ in offsets] == starts


def _write_with_header(path: Path, tensors: dict[str, torch.Tensor], order: list[str],
                       metadata) -> None:
    entries = [(n, TORCH_TO_SAFETENSORS[tensors[n].dtype], tuple(tensors[n].shape)) for n in order]
    header, offsets = header_bytes(entries, metadata)
    assert len(header) % 8 == 0
    with open(path, "wb") as fh:
        fh.write(header)
        for n, (b, e) in zip(order, offsets):
            assert fh.tell() == len(header) + b
            fh.write(_tensor_bytes(tensors[n]))


_names = st.text(alphabet=string.ascii_letters + string.digits + "._-é✓", min_size=1,
                 max_size=12).filter(lambda s: s != "__metadata__")
_shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None)
@given(
    spec=st.dictionaries(_names, st.tuples(st.sampled_from(ALL_CODES), _shapes), min_size=1,
                         max_size=8),
    metadata=st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    data=st.data(),
)
def test_built_headers_load_with_safe_open(spec, metadata, data):
    gen = torch.Generator().manual_seed(len(spec))
    tensors = {n: _random_tensor(c, s, gen) for n, (c, s) in spec.items()}
    order = data.draw(st.permutations(sorted(tensors)))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        _write_with_header(path, tensors, order, metadata)
        with safetensors.safe_open(path, "pt") as f:
            assert set(f.keys()) == set(tensors)
            assert (f.metadata() or {}) == (metadata or {})
            for n, t in tensors.items():
                got = f.get_tensor(n)
                assert got.dtype == t.dtype and got.shape == t.shape
                assert _tensor_bytes(got) == _tensor_bytes(t)
        infos, meta = read_header(path)
        assert meta == (metadata or {})
        # tensors come back in data-offset order: the written order, empties first at ties
        nonempty = [n for n in order if infos[n].nbytes]
        assert [n for n in infos if infos[n].nbytes] == nonempty
        for n, t in tensors.items():
            assert _file_bytes(path, infos[n]) == _tensor_bytes(t)


def test_header_bytes_rejects_bad_entries():
    with pytest.raises(ValueError, match="twice"):
        header_bytes([("a", "F32", (1,)), ("a", "F32", (2,))])
    with pytest.raises(ValueError, match="unknown safetensors dtype"):
        header_bytes([("a", "F33", (1,))])
    with pytest.raises(ValueError, match="non-negative"):
        header_bytes([("a", "F32", (-1,))])
    with pytest.raises(ValueError, match="str -> str"):
        header_bytes([("a", "F32", (1,))], {"k": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="invalid tensor name"):
        header_bytes([("__metadata__", "F32", (1,))])


def test_empty_header_is_valid(tmp_path):
    header, offsets = header_bytes([], None)
    path = tmp_path / "e.safetensors"
    path.write_bytes(header)
    assert offsets == []
    assert read_header(path) == ({}, {})


# ------------------------------------------------------------------------------------------------
# malformed files: each check, with a message naming the file (and the tensor)
# ------------------------------------------------------------------------------------------------
def _file_from_json(path: Path, header_text: str | bytes, data: bytes = b"") -> Path:
    raw = header_text.encode() if isinstance(header_text, str) else header_text
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_HEADERS = {
    "not utf-8": (b'{"a\xff": 1}', None, "UTF-8"),
    "not json": ('{"a": ', None, "not valid JSON"),
    "json list": ("[1, 2]", None, "must be a JSON object"),
    "json number": ("3", None, "must be a JSON object"),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, None, "not valid JSON"),
    "duplicate key": (f'{{"w": {json.dumps(_entry())}, "w": {json.dumps(_entry())}}}', "w",
                      "twice"),
    "entry not object": ({"w": [1, 2]}, "w", "must be an object"),
    "missing key": ({"w": {"dtype": "F32", "shape": [2]}}, "w", "exactly the keys"),
    "extra key": ({"w": {**_entry(), "x": 1}}, "w", "exactly the keys"),
    "unknown dtype": ({"w": _entry(dtype="F12")}, "w", "unknown dtype"),
    "dtype not str": ({"w": _entry(dtype=4)}, "w", "unknown dtype"),
    "negative dim": ({"w": _entry(shape=(-2,))}, "w", "non-negative"),
    "float dim": ({"w": _entry(shape=(2.0,))}, "w", "non-negative"),
    "bool dim": ({"w": _entry(shape=(True, 2))}, "w", "non-negative"),
    "shape not list": ({"w": {**_entry(), "shape": 2}}, "w", "non-negative"),
    "three offsets": ({"w": _entry(offsets=(0, 8, 8))}, "w", "two integers"),
    "float offset": ({"w": _entry(offsets=(0, 8.0))}, "w", "two integers"),
    "bool offset": ({"w": _entry(offsets=(False, 8))}, "w", "two integers"),
    "begin after end": ({"w": _entry(shape=(0,), offsets=(8, 0))}, "w", "begin <= end"),
    "negative begin": ({"w": _entry(offsets=(-8, 0))}, "w", "begin <= end"),
    "size mismatch": ({"w": _entry(shape=(3,))}, "w", "needs 12"),
    "huge shape": ({"w": _entry(shape=(10**30, 10**30))}, "w", "needs more"),
    "past data end": ({"w": _entry(shape=(4,), offsets=(0, 16))}, "w", "truncated"),
    "overlap": ({"a": _entry(shape=(1,), offsets=(0, 4)), "b": _entry(shape=(1,), offsets=(2, 6))},
                "b", "overlap"),
    "metadata not object": ({"__metadata__": [1], "w": _entry()}, None, "__metadata__"),
    "metadata not str": ({"__metadata__": {"k": 1}, "w": _entry()}, None, "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_malformed_header_is_named(tmp_path, case):
    header, tensor, message = BAD_HEADERS[case]
    text = header if isinstance(header, (str, bytes)) else json.dumps(header)
    path = _file_from_json(tmp_path / f"bad {case}.safetensors", text, b"\x01" * 8)
    with pytest.raises(SafetensorsError, match=message) as err:
        read_header(path)
    assert str(path) in str(err.value)
    if tensor is not None:
        assert repr(tensor) in str(err.value)


@pytest.mark.parametrize("size", range(8))
def test_file_shorter_than_length_prefix(tmp_path, size):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x07" * size)
    with pytest.raises(SafetensorsError, match="too short") as err:
        read_header(path)
    assert str(path) in str(err.value)


def test_header_length_over_limit_and_past_end(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(SafetensorsError, match="exceeds the limit"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    with pytest.raises(SafetensorsError, match="exceeds the limit"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 64) + b"{}      ")
    with pytest.raises(SafetensorsError, match="past the end"):
        read_header(path)


def test_truncated_data_area(tmp_path):
    gen = torch.Generator().manual_seed(3)
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file({"a": _random_tensor("F32", (5, 7), gen),
                                 "b": _random_tensor("BF16", (3,), gen)}, path)
    full = path.read_bytes()
    path.write_bytes(full[:-1])
    with pytest.raises(SafetensorsError, match="truncated") as err:
        read_header(path)
    assert "'b'" in str(err.value) and str(path) in str(err.value)


def test_gaps_and_trailing_bytes_are_accepted(tmp_path):
    header = {"a": _entry(shape=(1,), offsets=(4, 8)), "b": _entry(shape=(1,), offsets=(12, 16))}
    path = _file_from_json(tmp_path / "gaps.safetensors", json.dumps(header), bytes(range(24)))
    infos, _ = read_header(path)
    assert list(infos) == ["a", "b"]
    base = 8 + len(json.dumps(header).encode())
    assert infos["a"].data_start == base + 4 and infos["b"].data_start == base + 12
    assert _file_bytes(path, infos["b"]) == bytes(range(12, 16))


def test_zero_sized_tensors_never_overlap(tmp_path):
    header = {"a": _entry(shape=(2,), offsets=(0, 8)), "e": _entry(shape=(0, 4), offsets=(4, 4))}
    path = _file_from_json(tmp_path / "z.safetensors", json.dumps(header), b"\x01" * 8)
    infos, _ = read_header(path)
    assert infos["e"].nbytes == 0 and infos["a"].nbytes == 8


def test_unreadable_path_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_header(tmp_path / "missing.safetensors")
    with pytest.raises(IsADirectoryError):
        read_header(tmp_path)


# ------------------------------------------------------------------------------------------------
# property tests: garbage in, SafetensorsError (or a valid parse) out
# ------------------------------------------------------------------------------------------------
def _check_valid_parse(infos, file_size: int) -> None:
    """Invariants of any successful parse."""
    spans = []
    for name, info in infos.items():
        assert info.name == name
        assert info.dtype in SAFETENSORS_DTYPES
        assert all(isinstance(s, int) and s >= 0 for s in info.shape)
        assert info.nbytes == tensor_nbytes(info.dtype, info.shape)
        assert 8 <= info.data_start and info.data_start + info.nbytes <= file_size
        if info.nbytes:
            spans.append((info.data_start, info.data_start + info.nbytes))
    spans.sort()
    for (_, e0), (b1, _) in itertools.pairwise(spans):
        assert b1 >= e0
    starts = [i.data_start for i in infos.values()]
    assert starts == sorted(starts)


_json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                 | st.floats(allow_nan=True) | st.text(max_size=6))
_json = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
_plausible_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(ALL_CODES + ["U16", "F4", "", 3]),
    "shape": st.lists(st.integers(-2, 9), max_size=3) | _json,
    "data_offsets": st.lists(st.integers(-4, 300), min_size=0, max_size=3) | _json,
}) | _json
_plausible_header = st.dictionaries(
    st.sampled_from(["a", "b", "c", "__metadata__", "ü"]) | st.text(max_size=4),
    _plausible_entry, max_size=5,
) | _json

@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "fuzz.safetensors"


def _parse_file(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    try:
        infos, meta = read_header(path)
    except SafetensorsError as exc:
        assert str(path) in str(exc)
        return
    _check_valid_parse(infos, len(content))
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=_plausible_header, data_len=st.integers(0, 300))
def test_fuzzed_headers_raise_only_safetensors_error(fuzz_file, header, data_len):
    text = json.dumps(header, allow_nan=True)
    data = bytes((i * 37 + 11) % 256 for i in range(data_len))
    _parse_file(fuzz_file, struct.pack("<Q", len(text.encode())) + text.encode() + data)
    # and the pure parser on the same input
    try:
        infos, _ = parse_header(text.encode(), data_len, "mem.safetensors")
    except SafetensorsError:
        return
    _check_valid_parse(infos, 8 + len(text.encode()) + data_len)


@settings(max_examples=300, deadline=None)
@given(content=st.binary(max_size=200))
def test_random_bytes_raise_only_safetensors_error(fuzz_file, content):
    _parse_file(fuzz_file, content)


@settings(max_examples=150, deadline=None)
@given(prefix=st.integers(0, 2**64 - 1), body=st.binary(max_size=100))
def test_random_length_prefix(fuzz_file, prefix, body):
    _parse_file(fuzz_file, struct.pack("<Q", prefix) + body)


def _valid_file_bytes() -> bytes:
    gen = torch.Generator().manual_seed(11)
    tensors = {"emb": _random_tensor("BF16", (3, 5), gen), "n": _random_tensor("F32", (4,), gen),
               "e": _random_tensor("F16", (0, 2), gen), "s": _random_tensor("I8", (), gen)}
    return safetensors.torch.save(tensors, metadata={"format": "pt"})


_VALID = _valid_file_bytes()


def _safetensors_accepts(content: bytes) -> dict | None:
    try:
        loaded = safetensors.torch.load(content)
    except Exception:  # noqa: BLE001 - any refusal by the reference implementation
        return None
    return loaded


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)),
                      min_size=1, max_size=4),
       cut=st.none() | st.integers(0, len(_VALID)))
def test_corrupted_and_truncated_files(fuzz_file, edits, cut):
    content = bytearray(_VALID)
    for pos, value in edits:
        content[pos] = value
    content = bytes(content[:cut] if cut is not None else content)
    _parse_file(fuzz_file, content)
    # what the reference implementation accepts, we accept, with the same tensors
    ref = _safetensors_accepts(content)
    if ref is None:
        return
    try:
        infos, _ = read_header(fuzz_file)
    except SafetensorsError as exc:
        # the only places where this parser is deliberately stricter than the package
        if any(s in str(exc) for s in ("unknown dtype", "exactly the keys", "twice")):
            return
        raise
    assert set(infos) == set(ref)
    for name, t in ref.items():
        assert infos[name].shape == tuple(t.shape) and infos[name].torch_dtype == t.dtype
        assert content[infos[name].data_start:infos[name].data_start + infos[name].nbytes] == \
            _tensor_bytes(t)
