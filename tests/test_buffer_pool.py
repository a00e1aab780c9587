"""The pipeline's buffer pool: reuse, size matching, its bound, and a merge that reuses."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergecore.buffer_pool import BufferPool


def test_take_gives_exact_sizes_and_reuses_given_back_buffers():
    pool = BufferPool(1 << 24, granule=4096)
    a = pool.take(10_000)
    assert a.numel() == 10_000 and a.dtype == torch.uint8
    a.fill_(7)
    pool.give(a)
    b = pool.take(10_000)  # its 12288-byte buffer is within the 1.25 slack
    assert b.data_ptr() == a.data_ptr() and b.numel() == 10_000
    assert (pool.allocations, pool.reuses) == (1, 1)


def test_a_too_large_free_buffer_is_not_used_for_a_small_request():
    pool = BufferPool(1 << 24, granule=4096)
    big = pool.take(1 << 20)
    pool.give(big)
    small = pool.take(4096)
    assert small.data_ptr() != big.data_ptr()
    assert pool.allocations == 2


def test_the_smallest_fitting_buffer_is_taken():
    pool = BufferPool(1 << 24, granule=1024)
    bufs = [pool.take(n) for n in (12_288, 10_240, 11_264)]
    for b in bufs:
        pool.give(b)
    assert pool.take(10_000).data_ptr() == bufs[1].data_ptr()


def test_free_buffers_are_dropped_to_stay_within_capacity():
    pool = BufferPool(3 << 20, granule=1 << 20)
    a, b = pool.take(1 << 20), pool.take(1 << 20)
    pool.give(a)
    pool.give(b)
    c = pool.take(2 << 20)  # needs room: the oldest free buffer goes
    assert pool.total <= 3 << 20
    assert c.numel() == 2 << 20
    d = pool.take(3 << 20)  # nothing free fits, everything else in use or dropped
    assert d.numel() == 3 << 20


@pytest.mark.parametrize("phase", [0, 2, 4094, 1000])
def test_take_places_a_view_at_the_asked_phase_and_gives_it_back(phase):
    pool = BufferPool(1 << 24)
    first = pool.take(3 << 20, phase=phase)
    assert first.numel() == 3 << 20 and first.data_ptr() % 4096 == phase
    first.fill_(7)  # the whole view lies inside its buffer
    pool.give(first)
    again = pool.take(3 << 20, phase=(phase + 8) % 4096)
    assert again.data_ptr() % 4096 == (phase + 8) % 4096
    assert (pool.allocations, pool.reuses) == (1, 1)
    with pytest.raises(ValueError):
        pool.give(again[1:])
    pool.give(again)


def test_pinned_buffers_are_counted_at_the_size_the_pinned_allocator_pins():
    # PyTorch's caching host allocator rounds a pinned request up to a power of two; the pool
    # makes its pinned buffers that size, so its capacity bounds the memory actually pinned
    pinned = BufferPool(1 << 30, pin_memory=True, granule=1 << 16)
    plain = BufferPool(1 << 30, granule=1 << 16)
    for n in (1, 65536, 65537, 3 * 2**20 + 5, 1_100_000_000):
        size = pinned.buffer_size(n)
        assert size >= n and size & (size - 1) == 0 and size < 2 * max(n, 1 << 16)
        assert plain.buffer_size(n) % (1 << 16) == 0 and n <= plain.buffer_size(n) < n + (1 << 16)


def test_give_rejects_foreign_buffers():
    pool = BufferPool(1 << 20)
    with pytest.raises(ValueError, match="not a buffer taken"):
        pool.give(torch.empty(10, dtype=torch.uint8))
    a = pool.take(100)
    pool.give(a)
    with pytest.raises(ValueError, match="not a buffer taken"):
        pool.give(a)  # twice


def test_a_merge_reuses_its_buffers_and_is_unchanged(small_family, tmp_path):
    """Under a one-byte budget (one tensor in flight at a time) every layer's tensors reuse
    the previous layer's buffers; the output equals a merge with many tensors in flight."""
    from mergecore.merge import MergeOptions, run_merge

    base, ft1, ft2 = small_family
    cfg = tmp_path / "ties.yml"
    cfg.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": base, "dtype": "bfloat16",
        "models": [{"model": ft1, "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": ft2, "parameters": {"weight": 0.5, "density": 0.3}}]}))
    result = run_merge(cfg, tmp_path / "out_tiny", MergeOptions(quiet=True, max_memory=1))
    extra = result.stats.extra
    assert extra["pool_reuses"] > 2 * extra["pool_allocations"] > 0
    run_merge(cfg, tmp_path / "out", MergeOptions(quiet=True, max_memory=8 << 20))
    for a, b in zip(sorted((tmp_path / "out").glob("*.safetensors")),
                    sorted((tmp_path / "out_tiny").glob("*.safetensors"))):
        ta, tb = load_file(a), load_file(b)
        assert ta.keys() == tb.keys()
        for name in ta:
            assert torch.equal(ta[name], tb[name]), name
