"""SIGINT and SIGTERM during a merge: stop cleanly, keep completed shards, say how to resume.

Ctrl-C already raises ``KeyboardInterrupt`` in the main thread. ``handle_termination()``
makes SIGTERM (what ``kill``, systemd and job schedulers send) raise ``MergeInterrupted``, a
``KeyboardInterrupt``, the same way, so both unwind through the pipeline: its worker threads
stop, shards already complete stay in place with their checksums in the manifest, temporary
files are removed, and ``mergecore merge ... --resume`` finishes the job later.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class MergeInterrupted(KeyboardInterrupt):
    """The merge was stopped by a signal (``signum``: SIGINT or SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise MergeInterrupted(signum)


@contextlib.contextmanager
def handle_termination() -> Iterator[None]:
    """Within the block, SIGTERM raises ``MergeInterrupted`` in the main thread (no-op when
    called from another thread, where Python cannot install signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def keeps_progress(exc: BaseException) -> bool:
    """Whether a merge stopped by ``exc`` keeps its completed shards for ``--resume``:
    interruptions and OS-level errors (disk full, I/O errors) do; bad data or parameters,
    which need a changed config or input anyway, do not."""
    return isinstance(exc, (KeyboardInterrupt, OSError))


def exit_status(exc: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + signal number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + getattr(exc, "signum", signal.SIGINT)
