"""The IO layer: safetensors headers, local checkpoints, positional reads, streaming writes."""

from mergecore.io.checkpoint import open_checkpoint, split_model_ref, tokenizer_files
from mergecore.io.errors import (
    CheckpointError,
    OutputFileError,
    SafetensorsError,
    TensorWriteError,
)
from mergecore.io.reader import TensorReader
from mergecore.io.safetensors_format import header_bytes, read_header
from mergecore.io.types import Checkpoint, TensorInfo
from mergecore.io.writer import (
    ShardPlan,
    StreamingWriter,
    plan_shards,
    write_checkpoint,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "OutputFileError",
    "SafetensorsError",
    "ShardPlan",
    "StreamingWriter",
    "TensorInfo",
    "TensorReader",
    "TensorWriteError",
    "header_bytes",
    "open_checkpoint",
    "plan_shards",
    "read_header",
    "split_model_ref",
    "tokenizer_files",
    "write_checkpoint",
]
