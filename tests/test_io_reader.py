"""TensorReader: positional reads into caller buffers, checked against safetensors' loader."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from mergecore.io.errors import SafetensorsError
from mergecore.io.reader import SPLIT_MIN_BYTES, TensorReader, native_pread
from mergecore.io.safetensors_format import read_header
from mergecore.io.types import SAFETENSORS_DTYPES

SHAPES = [(), (1,), (0,), (3, 0), (7,), (13, 17), (5, 123, 123), (127,)]
CODES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3"]
PATHS = [pytest.param(False, id="python")] + [
    pytest.param(True, id="native", marks=pytest.mark.skipif(
        native_pread() is None, reason="mergecore._C.pread_into not built"))
]


def _random(code: str, shape, gen) -> torch.Tensor:
    dtype, itemsize = SAFETENSORS_DTYPES[code]
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(1, 256, (n * itemsize,), dtype=torch.uint8, generator=gen)
    if code == "BOOL":
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    gen = torch.Generator().manual_seed(5)
    tensors = {f"{code}.{i}": _random(code, shape, gen)
               for code in CODES for i, shape in enumerate(SHAPES)}
    path = tmp_path_factory.mktemp("reader") / "model.safetensors"
    safetensors.torch.save_file(tensors, path)
    infos, _ = read_header(path)
    return path, tensors, infos


@pytest.mark.parametrize("native", PATHS)
@pytest.mark.parametrize("drop_cache", [False, True])
def test_read_tensor_matches_safetensors(model_file, native, drop_cache):
    path, tensors, infos = model_file
    loaded = safetensors.torch.load_file(path)
    with TensorReader(use_native=native, drop_cache=drop_cache) as reader:
        for name, info in infos.items():
            got = reader.read_tensor(info)
            assert got.dtype == tensors[name].dtype and got.shape == tensors[name].shape
            assert _bytes(got) == _bytes(loaded[name]) == _bytes(tensors[name])


@pytest.mark.parametrize("native", PATHS)
def test_read_into_poisoned_buffers(model_file, native):
    """Only the first nbytes change; typed and byte destinations; offsets into a buffer."""
    _, tensors, infos = model_file
    with TensorReader(use_native=native) as reader:
        for name, info in infos.items():
            # a uint8 staging buffer larger than needed, poisoned, seen through a slice
            big = torch.full((info.nbytes + 64,), 0xA5, dtype=torch.uint8)
            dst = big[16:]
            reader.read_into(info, dst)
            assert big[:16].eq(0xA5).all() and big[16 + info.nbytes:].eq(0xA5).all()
            assert bytes(dst[: info.nbytes].numpy()) == _bytes(tensors[name])
            # a typed destination, poisoned with NaN where the dtype has one
            typed = torch.empty(info.shape, dtype=info.torch_dtype)
            if info.is_float and info.dtype not in ("F8_E4M3", "F8_E5M2"):
                typed.fill_(float("nan"))
            else:
                typed.reshape(-1).view(torch.uint8).fill_(0x5A)
            reader.read_into(info, typed)
            assert _bytes(typed) == _bytes(tensors[name])


@pytest.mark.parametrize("native", PATHS)
@pytest.mark.parametrize("nthreads", [1, 3, 4])
def test_large_reads_split_across_threads(tmp_path, native, nthreads):
    gen = torch.Generator().manual_seed(9)
    # prime-length tensors past the split threshold, and one just under it
    n_big = SPLIT_MIN_BYTES // 4 * 2 + 7919
    tensors = {"big": _random("F32", (n_big,), gen),
               "odd": _random("BF16", (3, SPLIT_MIN_BYTES // 6 + 101), gen),
               "small": _random("F32", (SPLIT_MIN_BYTES // 4 - 3,), gen)}
    path = tmp_path / "big.safetensors"
    safetensors.torch.save_file(tensors, path)
    infos, _ = read_header(path)
    with TensorReader(nthreads=nthreads, use_native=native) as reader:
        for name, info in infos.items():
            dst = torch.full((info.nbytes + 3,), 0xEE, dtype=torch.uint8)
            reader.read_into(info, dst)
            assert bytes(dst[: info.nbytes].numpy()) == _bytes(tensors[name])
            assert dst[info.nbytes:].eq(0xEE).all()


@pytest.mark.parametrize("native", PATHS)
def test_truncated_file_names_the_tensor(tmp_path, native):
    gen = torch.Generator().manual_seed(2)
    path = tmp_path / "trunc.safetensors"
    safetensors.torch.save_file({"a": _random("F32", (64,), gen),
                                 "b": _random("F32", (64,), gen)}, path)
    infos, _ = read_header(path)
    with open(path, "r+b") as fh:
        fh.truncate(infos["b"].data_start + 10)
    with TensorReader(use_native=native) as reader:
        reader.read_tensor(infos["a"])
        with pytest.raises(SafetensorsError, match="truncated") as err:
            reader.read_tensor(infos["b"])
    assert "'b'" in str(err.value) and str(path) in str(err.value)


def test_bad_destinations(model_file):
    _, _, infos = model_file
    info = infos["F32.5"]  # (13, 17) float32
    with TensorReader() as reader:
        with pytest.raises(ValueError, match="too small"):
            reader.read_into(info, torch.empty(info.nbytes - 1, dtype=torch.uint8))
        with pytest.raises(ValueError, match="contiguous"):
            reader.read_into(info, torch.empty(17, 13 * 2, dtype=torch.float32).t())
        with pytest.raises(TypeError):
            reader.read_into(info, bytearray(info.nbytes))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="closed"):
        reader.read_tensor(info)


def test_one_descriptor_per_file(model_file):
    _, _, infos = model_file
    reader = TensorReader()
    for info in infos.values():
        reader.read_tensor(info)
    assert len(reader._fds) == 1
    reader.close()
    reader.close()
    assert reader._fds == {}


def test_requiring_native_without_it():
    if native_pread() is not None:
        pytest.skip("the native helper is built")
    with pytest.raises(RuntimeError, match="not available"):
        TensorReader(use_native=True)
