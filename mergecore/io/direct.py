"""The knobs and rules of direct (``O_DIRECT``) IO, shared by the reader and the writer.

A transfer goes straight between the device and a buffer when the buffer's address is
congruent to the transfer's file offset modulo ``ALIGN``: the aligned interior then satisfies
``O_DIRECT``'s rule (offset, length and address all multiples of ``ALIGN``) and only the
partial pages at both ends go through the page cache. ``phase`` says where a buffer should
start for that; ``congruent`` checks a buffer. Transfers under ``MIN_BYTES`` use the page
cache (a direct transfer waits for the device, which small tensors do not amortize).
``MERGECORE_IO_DIRECT=0`` turns direct IO off.

A tensor whose pages the page cache already holds (at least ``WARM_SHARE`` of them, by
``mincore``) is read through the page cache instead: copying from memory beats the device
(on the 2-core VM: 9.5 GB/s from the cache, 1-1.7 GB/s direct), and its pages are left
cached, as they were found.
"""

from __future__ import annotations

import os

#: Alignment of offsets, lengths and addresses (a multiple of any logical block size).
ALIGN = 4096
#: Smaller transfers go through the page cache.
MIN_BYTES = 1 << 20
#: A read whose range has at least this share of its pages in the page cache is "warm": it
#: goes through the cache, and the reader leaves those pages cached.
WARM_SHARE = 0.5


def enabled() -> bool:
    """Whether direct IO is used where possible (the platform has it, and
    ``MERGECORE_IO_DIRECT`` is not ``0``)."""
    return hasattr(os, "O_DIRECT") and os.environ.get("MERGECORE_IO_DIRECT", "1") != "0"


def phase(offset: int, nbytes: int) -> int | None:
    """Where a buffer for ``nbytes`` at file ``offset`` should start, modulo ``ALIGN``, to be
    transferred directly; None when such a transfer goes through the page cache anyway."""
    return offset % ALIGN if nbytes >= MIN_BYTES else None


def congruent(address: int, offset: int, nbytes: int) -> bool:
    """True when a buffer at ``address`` holding ``nbytes`` for file ``offset`` can take the
    direct path."""
    return nbytes >= MIN_BYTES and (address - offset) % ALIGN == 0


def warm(cached_pages: int, total_pages: int) -> bool:
    """Whether a range with ``cached_pages`` of its ``total_pages`` in the page cache is read
    through the cache (False when the kernel did not tell: ``total_pages == 0``)."""
    return total_pages > 0 and cached_pages >= WARM_SHARE * total_pages
