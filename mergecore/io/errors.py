"""Exceptions of the IO layer.

Every message names the file (and the tensor, where one is involved), so that a user
looking at a failed merge of a dozen checkpoints knows which one is at fault.
"""

from __future__ import annotations


class SafetensorsError(ValueError):
    """A ``.safetensors`` file is malformed: bad header, bad entry, truncated data."""


class CheckpointError(ValueError):
    """A model reference cannot be opened as a safetensors checkpoint (or an output is misused)."""


class TensorWriteError(CheckpointError):
    """The streaming writer was asked to write something the plan does not allow.

    Unknown tensor name, a tensor written twice, wrong dtype/shape/size, missing tensors at
    ``finalize()``, or a write after the writer was finalized or aborted.
    """


class OutputFileError(OSError):
    """Writing an output file failed at the OS level (ENOSPC, EIO, EFBIG ...).

    Carries the original ``errno``; the message names the output file (and the tensor).
    """
