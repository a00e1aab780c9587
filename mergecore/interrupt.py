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


#: ``handle_termination``'s state: how deep ``interrupts_deferred`` blocks are nested, and a
#: signal that arrived inside one (raised when the outermost block ends).
_deferred = {"depth": 0, "pending": None}


def _interruption(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else MergeInterrupted(signum)


def _raise_interrupted(signum: int, frame: object) -> None:
    if _deferred["depth"]:
        if _deferred["pending"] is None:
            _deferred["pending"] = signum
        return
    raise _interruption(signum)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Within the block, a SIGINT or SIGTERM (under ``handle_termination``) is held back and
    raised when the block ends without an error of its own. Python raises a signal's
    exception between any two bytecodes of the main thread, also between taking a lock
    and the ``try`` that releases it (inside ``queue.Queue``, ``threading.Condition``): a
    lock left held hangs the merge's other threads, and then the merge. Code that takes
    locks in the main thread while a merge runs does it in such a block."""
    _deferred["depth"] += 1
    try:
        yield
    except BaseException:
        _deferred["depth"] -= 1
        raise
    _deferred["depth"] -= 1
    if not _deferred["depth"] and _deferred["pending"] is not None:
        signum, _deferred["pending"] = _deferred["pending"], None
        raise _interruption(signum)


@contextlib.contextmanager
def handle_termination() -> Iterator[None]:
    """Within the block, SIGTERM raises ``MergeInterrupted`` and SIGINT ``KeyboardInterrupt``
    in the main thread, held back inside ``interrupts_deferred`` blocks (no-op when called
    from another thread, where Python cannot install signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_interrupted)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _deferred["pending"] = None


def keeps_progress(exc: BaseException) -> bool:
    """Whether a merge stopped by ``exc`` keeps its completed shards for ``--resume``:
    interruptions and OS-level errors (disk full, I/O errors) do; bad data or parameters,
    which need a changed config or input anyway, do not."""
    return isinstance(exc, (KeyboardInterrupt, OSError))


def exit_status(exc: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + signal number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + getattr(exc, "signum", signal.SIGINT)
