"""GPU-side durations of the pipeline's host<->device copies, from CUDA event pairs.

A host clock around a ``non_blocking`` copy measures only its launch; the copy itself runs
later on its stream. ``TransferTimer.begin(stream)`` records an event before the copies are
queued on ``stream`` and ``end`` one after them; once the run is over (every event has
completed), ``seconds()`` sums ``end - begin`` over all pairs: the time the copy engines
spent on the pipeline's transfers.
"""

from __future__ import annotations

import torch


class TransferTimer:
    """Collects (begin, end) CUDA event pairs and the bytes each pair moved."""

    def __init__(self) -> None:
        self._pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.bytes = 0

    def begin(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def end(self, begin: torch.cuda.Event, stream: torch.cuda.Stream, nbytes: int) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        self._pairs.append((begin, event))
        self.bytes += nbytes

    def seconds(self) -> float:
        """Total copy time; call after the copies have finished (synchronises on each)."""
        total = 0.0
        for start, stop in self._pairs:
            stop.synchronize()
            total += start.elapsed_time(stop) / 1e3
        return total
