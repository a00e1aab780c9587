"""The pipeline's reusable buffer pool."""

from __future__ import annotations

import threading

import pytest

from mergecore.buffers import BufferPool


def test_a_returned_buffer_is_taken_again_for_the_same_or_a_slightly_smaller_size():
    pool = BufferPool(1 << 20)
    a = pool.take(1000)
    assert a.numel() == 1000 and pool.allocated == 1
    pool.give(a)
    b = pool.take(1000)
    assert b.data_ptr() == a.data_ptr() and pool.reused == 1
    pool.give(b)
    c = pool.take(600)  # 1000 <= 2 * 600: reused
    assert c.data_ptr() == a.data_ptr()
    pool.give(c)
    d = pool.take(400)  # 1000 > 2 * 400: too wasteful, a new one
    assert d.data_ptr() != a.data_ptr() and d.numel() == 400
    e = pool.take(1001)  # larger than any free buffer
    assert e.numel() == 1001 and e.data_ptr() != a.data_ptr()


def test_the_smallest_fitting_buffer_is_chosen():
    pool = BufferPool(1 << 20)
    bufs = [pool.take(n) for n in (3000, 1100, 2000)]
    for b in bufs:
        pool.give(b)
    assert pool.take(1000).numel() == 1100
    assert pool.take(1000).numel() == 2000  # next smallest that fits within 2x
    assert pool.take(1000).numel() == 1000  # 3000 > 2000: fresh


def test_free_bytes_stay_within_keep_bytes_dropping_the_largest():
    pool = BufferPool(5000)
    bufs = [pool.take(n) for n in (1000, 2000, 3000)]
    for b in bufs:
        pool.give(b)
    assert pool.free_bytes == 3000  # 1000 + 2000 kept; 6000 > 5000 dropped the 3000
    pool.give(pool.take(10_000))  # larger than keep_bytes: never kept
    assert pool.free_bytes == 3000
    with pytest.raises(ValueError, match="keep_bytes"):
        BufferPool(-1)


def test_concurrent_take_and_give_never_hands_one_buffer_to_two_holders():
    pool = BufferPool(1 << 24)
    held: set[int] = set()
    lock = threading.Lock()
    errors = []

    def worker(seed: int) -> None:
        for i in range(300):
            buf = pool.take(4096 + (seed * 7 + i) % 3 * 1024)
            with lock:
                if buf.data_ptr() in held:
                    errors.append(buf.data_ptr())
                held.add(buf.data_ptr())
            buf.fill_(seed)
            with lock:
                held.discard(buf.data_ptr())
            pool.give(buf)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and pool.reused > 0
