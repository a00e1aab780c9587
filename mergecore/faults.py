"""Fault injection for the reliability tests: a real signal or OS error at a chosen tensor.

Set ``MERGECORE_FAULT`` in a merge's environment to a comma-separated list of
``key=value`` (unset: nothing changes, the writer is used as is):

- ``after=N``: act right after the N-th output tensor was written (1-based);
- ``signal=KILL|TERM|INT``: send that signal to the merge's own process (a real SIGKILL
  stops it on the spot, mid-shard, as a power loss or the OOM killer would);
- ``errno=ENOSPC``: the disk fills up: the descriptors of the output files still being
  written are pointed at ``/dev/full``, so the writer's next ``pwrite`` gets a real ENOSPC from the
  kernel (if no output file is open, or for another errno such as ``EIO``: the write
  raises ``OutputFileError`` with that errno);
- ``delay=SECONDS``: sleep after every tensor written (gives a test time to send a signal
  from outside at a random moment).
"""

from __future__ import annotations

import errno as errno_mod
import os
import signal
import threading
import time
from typing import Any

from mergecore.io.errors import OutputFileError

ENV_VAR = "MERGECORE_FAULT"


def parse_fault(text: str) -> dict[str, str]:
    """``"after=3,signal=KILL"`` -> ``{"after": "3", "signal": "KILL"}`` (keys checked)."""
    spec: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in ("after", "signal", "errno", "delay"):
            raise ValueError(f"{ENV_VAR}: cannot parse {part!r} (keys: after, signal, errno, "
                             "delay)")
        spec[key] = value
    return spec


class FaultyWriter:
    """Wraps a ``StreamingWriter``; acts as ``spec`` says after the ``after``-th write."""

    def __init__(self, writer: Any, spec: dict[str, str]):
        self._writer = writer
        self._after = int(spec.get("after", 0))
        self._signal = spec.get("signal")
        self._errno = spec.get("errno")
        self._delay = float(spec.get("delay", 0))
        self._count = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    def write(self, name: str, data: Any) -> None:
        self._writer.write(name, data)
        with self._lock:
            self._count += 1
            hit = self._count == self._after
        if self._delay:
            time.sleep(self._delay)
        if not hit:
            return
        if self._signal:
            os.kill(os.getpid(), getattr(signal, "SIG" + self._signal.upper()))
        if self._errno:
            code = getattr(errno_mod, self._errno.upper())
            if code == errno_mod.ENOSPC and self._fill_disk():
                return
            raise OutputFileError(code, f"writing tensor {name!r} failed: "
                                        f"{os.strerror(code)} (injected by {ENV_VAR})")

    def _fill_disk(self) -> bool:
        """Point the output files still receiving tensors at /dev/full (shards already
        written in full and being finished are left alone); False when none is open (or
        there is no /dev/full)."""
        writer = self._writer
        filling = {writer.plan.shard_index(n) for n in writer.missing()}
        fds = [fd for k in sorted(filling) for fd in writer.shards[k].filenos()]
        if not fds or not os.path.exists("/dev/full"):
            return False
        full = os.open("/dev/full", os.O_WRONLY)
        try:
            for fd in fds:
                os.dup2(full, fd)
        finally:
            os.close(full)
        return True


def wrap_writer(writer: Any) -> Any:
    """``writer`` itself, or a ``FaultyWriter`` around it when ``MERGECORE_FAULT`` is set."""
    text = os.environ.get(ENV_VAR)
    if not text:
        return writer
    return FaultyWriter(writer, parse_fault(text))
