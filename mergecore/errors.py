"""Exceptions raised by mergecore's compute layer."""

from __future__ import annotations


class MergeError(ValueError):
    """A merge cannot be computed as asked (bad parameters, bad inputs)."""


class MergeTypeError(MergeError, TypeError):
    """An argument of the wrong kind (not a tensor, an integer tensor, a dtype the kernels
    cannot write): a ``TypeError`` and a ``MergeError`` both."""


class NonFiniteError(MergeError):
    """An input (or a merge result from finite inputs) holds NaN or Inf.

    ``tensor`` names the merged tensor; ``input_index`` is the position of the offending input
    among the job's inputs (the base first when there is one), None when the merge itself
    produced the NaN/Inf; ``count`` of that input's ``numel`` values are NaN/Inf."""

    def __init__(self, message: str, *, tensor: str | None = None,
                 input_index: int | None = None, count: int | None = None,
                 numel: int | None = None):
        super().__init__(message)
        self.tensor = tensor
        self.input_index = input_index
        self.count = count
        self.numel = numel
