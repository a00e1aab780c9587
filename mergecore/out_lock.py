"""One merge at a time per output directory: an advisory lock on the directory itself.

Two merges writing into one OUT_DIR would delete or overwrite each other's files (a second
``--overwrite`` or ``--resume`` run started while the first still writes). A merge takes an
exclusive ``flock`` on the output directory (an open descriptor of the directory, so no lock
file appears in the output) before it checks or changes anything there and holds it until
the output is finalized or abandoned. The kernel drops the lock when the process dies, also
by SIGKILL, so a crash never leaves a stale lock behind. ``--overwrite`` empties the
directory in place (``empty_directory``) rather than replacing it, so the locked inode stays
the output directory.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path


class OutputLock:
    """An exclusive, non-blocking ``flock`` on ``out_dir`` (taken once it exists)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock if ``out_dir`` exists; True when held (also when already held),
        False when another process holds it or the directory does not exist yet."""
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def busy(self) -> bool:
        """True when ``out_dir`` exists and another process holds its lock (tries to take
        it: afterwards this object holds it when it was free)."""
        return self.out_dir.is_dir() and not self.acquire()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> OutputLock:  # noqa: PYI034 (Python 3.10 has no typing.Self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def busy_message(out_dir: str | os.PathLike) -> str:
    """The error for an output directory another merge holds the lock of."""
    return (f"output directory {os.fspath(out_dir)!r} is being written by another mergecore "
            "merge right now; wait for it to finish or choose another directory")


def empty_directory(directory: Path) -> None:
    """Delete everything inside ``directory`` and keep the directory itself."""
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
