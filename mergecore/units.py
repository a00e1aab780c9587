"""Parsing the human sizes users type: ``5B``, ``500M``, ``2GiB``."""

from __future__ import annotations

import argparse
import re

_SUFFIX = {
    "": 1,
    "K": 1000, "M": 1000**2, "B": 1000**3, "G": 1000**3, "T": 1000**4,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
    "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
}


def parse_size(text: str | int) -> int:
    """``"5B"`` (mergekit's billions) -> 5_000_000_000; ``"2GiB"`` -> 2 * 2**30; ints pass."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _SUFFIX:
        raise ValueError(f"cannot read {text!r} as a size (examples: 5B, 500M, 2GiB, 1000000)")
    return int(float(match.group(1)) * _SUFFIX[match.group(2).upper()])


def size_arg(text: str | int) -> int:
    """``parse_size`` for command-line sizes (``--out-shard-size``, where 0 means no limit,
    one shard, as mergekit reads it); errors are ``argparse.ArgumentTypeError``, which
    argparse prints after the flag's name."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_size(text: str | int) -> int:
    """``size_arg`` for command-line sizes that must be at least one byte."""
    size = size_arg(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {text!r}")
    return size


def positive_int(text: str) -> int:
    """An integer of at least 1 from the command line (``argparse.ArgumentTypeError`` else)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
