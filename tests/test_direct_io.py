"""O_DIRECT reads and writes (mergecore.io.reader / writer) give the bytes the page cache does.

Tensors of at least 1 MiB whose buffers sit at the right address modulo 4096 take the direct
path: the aligned interior goes straight between the device and the buffer, the partial
pages at both ends through the page cache. The tests build files whose tensors start at
unaligned offsets with odd sizes, poison every destination, and compare with the bytes read
plainly from the file (reads) or with what safetensors loads and the manifest's sha256
(writes); a whole merge with direct IO for every tensor is byte-identical to one without,
also after a disk-full stop and --resume. Where the file system refuses O_DIRECT (tmpfs),
the direct-path assertions are skipped and only the fallback is checked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergecore.buffer_pool import BufferPool
from mergecore.checksums import file_sha256
from mergecore.io import StreamingWriter, TensorReader, open_checkpoint, plan_shards
from mergecore.io import direct as direct_io
from mergecore.io import writer as writer_mod
from mergecore.io.errors import SafetensorsError
from mergecore.io.types import TORCH_TO_SAFETENSORS
from mergecore.io.writer import MANIFEST_NAME

try:
    from mergecore import _C  # type: ignore[attr-defined]
except ImportError:  # no compiled extension
    _C = None

pytestmark = pytest.mark.usefixtures("keep_thread_settings")


def _direct_supported(directory: Path) -> bool:
    probe = directory / ".direct-probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | getattr(os, "O_DIRECT", 0), 0o644)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return hasattr(os, "O_DIRECT")


def _odd_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Sizes that put every tensor at an unaligned offset and end (1 to 4 MiB each)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "a.small": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b.big": torch.randn(1031, 1021, generator=g).to(torch.bfloat16),
        "c.fp32": torch.randn(777, 1001, generator=g),
        "d.fp16": torch.randn(3, 349_529, generator=g).to(torch.float16),
        "e.tiny": torch.randn(7, generator=g),
        "f.big": torch.randn(2053, 997, generator=g).to(torch.bfloat16),
    }


@pytest.fixture
def never_warm(monkeypatch):
    """Every large tensor counts as cold (the files the tests just wrote sit in the page
    cache, which would send their reads through it)."""
    monkeypatch.setattr(direct_io, "WARM_SHARE", 2.0)


def test_reads_match_the_file_bytes_on_every_path(tmp_path, never_warm):
    path = tmp_path / "model.safetensors"
    save_file(_odd_tensors(1), str(path))
    raw = path.read_bytes()
    infos = list(open_checkpoint(path).tensors.values())
    assert any(i.data_start % 4096 for i in infos if i.nbytes >= direct_io.MIN_BYTES)
    big = [i for i in infos if i.nbytes >= direct_io.MIN_BYTES]
    pool = BufferPool(1 << 30)
    with TensorReader(nthreads=2, direct=True, drop_cache=True) as rd:
        for info in infos:
            phase = rd.direct_phase(info)
            for where in (phase, None if phase is None else (phase + 2) % 4096):
                buf = pool.take(info.nbytes, phase=where)
                buf.fill_(0xA5)
                rd.read_into(info, buf)
                want = raw[info.data_start: info.data_start + info.nbytes]
                assert bytes(buf.numpy()) == want, (info.name, where)
                pool.give(buf)
        if not rd.uses_direct:
            pytest.skip("no compiled pread_direct_into or no O_DIRECT on this platform")
        if not _direct_supported(tmp_path):
            assert rd.direct_reads == 0
            pytest.skip("this file system refuses O_DIRECT: the buffered fallback was checked")
        assert rd.direct_reads == len(big)  # the congruent buffer of each large tensor


def test_a_truncated_file_is_an_error_on_the_direct_path(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_odd_tensors(2), str(path))
    infos = {i.name: i for i in open_checkpoint(path).tensors.values()}
    last = max(infos.values(), key=lambda i: i.data_start)
    os.truncate(path, last.data_start + last.nbytes // 2)  # cut inside the last tensor
    pool = BufferPool(1 << 30)
    with TensorReader(nthreads=2, direct=True) as rd, pytest.raises(SafetensorsError) as err:
        rd.read_into(last, pool.take(last.nbytes, phase=rd.direct_phase(last)))
    assert last.name in str(err.value) and "truncated" in str(err.value)


def _evict(path: Path) -> bool:
    """Drop ``path``'s pages from the page cache; False where the file system keeps the file
    in memory anyway (tmpfs) or the kernel will not tell."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        cached, total = _C.cached_pages(fd, 0, path.stat().st_size)
    finally:
        os.close(fd)
    return total > 0 and cached < total // 4


def _cached_share(path: Path, info) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        cached, total = _C.cached_pages(fd, info.data_start, info.nbytes)
    finally:
        os.close(fd)
    return cached / total


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_warm_tensors_are_read_from_the_page_cache_and_left_there(tmp_path, direct):
    """The tensors of a file found in the page cache are read through it (not O_DIRECT) and
    their pages stay cached with drop_cache; those of a cold file are read directly or have
    their pages dropped after the read."""
    if _C is None or not hasattr(_C, "cached_pages"):
        pytest.skip("no compiled extension: the reader cannot ask the page cache")
    path = tmp_path / "model.safetensors"
    save_file(_odd_tensors(3), str(path))
    raw = path.read_bytes()
    big = [i for i in open_checkpoint(path).tensors.values() if i.nbytes >= direct_io.MIN_BYTES]
    pool = BufferPool(1 << 30)
    if not _evict(path):
        pytest.skip("this file system keeps the file in memory: nothing is ever cold")
    with TensorReader(nthreads=2, direct=direct, drop_cache=True) as rd:
        for info in big:  # a cold file
            buf = pool.take(info.nbytes, phase=rd.direct_phase(info))
            buf.fill_(0xA5)
            rd.read_into(info, buf)
            assert bytes(buf[:info.nbytes].numpy()) == raw[info.data_start:][:info.nbytes]
            assert _cached_share(path, info) < 0.25, info.name  # dropped, or never cached
            pool.give(buf)
        assert rd.warm_reads == 0
        if direct and rd.uses_direct and _direct_supported(tmp_path):
            assert rd.direct_reads == len(big)
    assert len(path.read_bytes()) == len(raw)  # now the whole file is cached
    with TensorReader(nthreads=2, direct=direct, drop_cache=True) as rd:
        for info in big:  # a warm file
            phase = rd.direct_phase(info)
            assert phase is None, info.name  # any buffer will do
            buf = pool.take(info.nbytes, phase=info.data_start % direct_io.ALIGN)
            buf.fill_(0x5A)
            rd.read_into(info, buf)  # a congruent buffer, still read through the cache
            assert bytes(buf[:info.nbytes].numpy()) == raw[info.data_start:][:info.nbytes]
            assert _cached_share(path, info) > 0.9, info.name  # left as found
            pool.give(buf)
        assert rd.warm_reads == len(big)
        assert rd.direct_reads == 0


@pytest.mark.parametrize("order", ["in file order", "reversed"])
def test_writes_are_the_planned_file_on_every_path(tmp_path, order, monkeypatch):
    monkeypatch.setenv("MERGECORE_IO_DIRECT", "1")
    tensors = _odd_tensors(3)
    entries = [(n, TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    out = tmp_path / "out"
    writer = StreamingWriter(out, plan_shards(entries, 6_000_000), fsync=False)
    assert len(writer.shards) >= 2
    pool = BufferPool(1 << 30)
    names = list(tensors) if order == "in file order" else list(reversed(tensors))
    for name in names:
        t = tensors[name].contiguous().view(-1).view(torch.uint8)
        buf = pool.take(t.numel(), phase=writer.direct_phase(name))
        buf.copy_(t)
        writer.write(name, buf.view(tensors[name].dtype).view(tensors[name].shape))
        pool.give(buf)
    writer.finalize()
    loaded = {}
    for f in sorted(out.glob("model-*.safetensors")):
        loaded.update(load_file(str(f)))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t), name
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for entry in manifest["shards"]:
        assert entry["done"] and file_sha256(out / entry["file"]) == entry["sha256"]
    direct = sum(s.direct_bytes for s in writer.shards)
    if not _direct_supported(tmp_path):
        assert direct == 0
        pytest.skip("this file system refuses O_DIRECT: the buffered fallback was checked")
    assert direct > 0.9 * sum(t.numel() * t.element_size() for t in tensors.values()
                              if t.numel() * t.element_size() >= direct_io.MIN_BYTES)


@pytest.fixture
def everything_direct(monkeypatch, never_warm):
    """Direct IO for every tensor of at least one page (the small family's tensors)."""
    monkeypatch.setattr(direct_io, "MIN_BYTES", 4096)


def _merge(config: Path, out: Path, *extra: str) -> int:
    from mergecore.cli import main

    return main(["merge", str(config), str(out), "--quiet", "--out-shard-size", "100K",
                 *extra])


def test_a_merge_with_direct_io_is_byte_identical_and_resumes(small_family, tmp_path,
                                                              monkeypatch, everything_direct):
    from mergecore.faults import ENV_VAR

    base, ft1, ft2 = small_family
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": base,
        "models": [{"model": ft1, "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": ft2, "parameters": {"weight": 0.5, "density": 0.7}}]}))
    monkeypatch.setenv("MERGECORE_IO_DIRECT", "0")
    assert _merge(config, tmp_path / "plain" / "out") == 0
    monkeypatch.setenv("MERGECORE_IO_DIRECT", "1")
    direct_bytes, complete = [], writer_mod.ShardWriter.complete

    def counting_complete(self):
        direct_bytes.append(self.direct_bytes)
        return complete(self)

    monkeypatch.setattr(writer_mod.ShardWriter, "complete", counting_complete)
    assert _merge(config, tmp_path / "direct" / "out") == 0
    if _direct_supported(tmp_path):
        assert sum(direct_bytes) > 0
    monkeypatch.setenv(ENV_VAR, "after=25,errno=ENOSPC")
    assert _merge(config, tmp_path / "stopped" / "out") == 1
    monkeypatch.delenv(ENV_VAR)
    assert _merge(config, tmp_path / "stopped" / "out", "--resume") == 0

    def weights(d: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(d.glob("model*"))}

    plain = weights(tmp_path / "plain" / "out")
    assert len(plain) >= 3
    assert weights(tmp_path / "direct" / "out") == plain
    assert weights(tmp_path / "stopped" / "out") == plain
