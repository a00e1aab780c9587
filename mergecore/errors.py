"""Exceptions raised by mergecore's compute layer."""

from __future__ import annotations


class MergeError(ValueError):
    """A merge cannot be computed as asked (bad parameters, bad inputs)."""


class NonFiniteError(MergeError):
    """An input (or a merge result from finite inputs) holds NaN or Inf."""
