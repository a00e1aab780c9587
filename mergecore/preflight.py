"""Checks of the output side made before any tensor data is read.

The config and the inputs' headers are checked by ``mergecore.config`` and the planner; this
module checks where the result goes: the output path (a directory, empty unless
``--overwrite`` or ``--resume``, writable, not holding an input model) and the free space on
its file system (the shards' exact sizes, less what ``--overwrite`` frees or ``--resume``
keeps). Every problem found is returned as one line; the caller raises them all at once.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from pathlib import Path

from mergecore.io.checkpoint import TOKENIZER_FILE_NAMES, TOKENIZER_GLOBS
from mergecore.io.safetensors_format import header_bytes
from mergecore.io.writer import DEFAULT_METADATA, MANIFEST_NAME, ShardPlan
from mergecore.units import human_bytes

#: The files a merge output (mergecore's or mergekit's) consists of. ``--overwrite`` empties a
#: directory only when it holds nothing else: it replaces an earlier merge, and never deletes
#: what a merge did not write (notes, a config being edited, a whole project folder).
OUTPUT_ENTRY_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", ".*.partial",  # a file being written
    "*.bin", "*.bin.index.json", "config.json", "generation_config.json", "README.md",
    "mergekit_config.yml", MANIFEST_NAME, *TOKENIZER_FILE_NAMES, *TOKENIZER_GLOBS,
)

#: Room kept for config.json, the model card, the YAML and the manifest.
METADATA_ALLOWANCE = 1 << 20


class OutputCheckError(ValueError):
    """The output cannot be written as asked; ``problems`` lists every reason."""

    def __init__(self, out_dir: str | os.PathLike, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(f"cannot write the merge to {os.fspath(out_dir)!r} "
                         f"({count} problem{'' if count == 1 else 's'}):\n{lines}")


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _tree_bytes(directory: Path) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def directory_problems(out_dir: Path, *, overwrite: bool, resume: bool) -> list[str]:
    """What is wrong with ``out_dir`` as an output directory (needs no plan)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        return [f"output path {str(out_dir)!r} exists and is not a directory"]
    problems = []
    if out_dir.is_dir() and not (overwrite or resume) and any(out_dir.iterdir()):
        problems.append(f"output directory {str(out_dir)!r} is not empty; pass --overwrite to "
                        "replace it or --resume to finish an interrupted merge into it")
    if out_dir.is_dir() and overwrite:
        problems += overwrite_problems(out_dir)
    anchor = _existing_ancestor(out_dir)
    if not anchor.is_dir():
        problems.append(f"output directory {str(out_dir)!r}: {str(anchor)!r} is a file, not "
                        "a directory")
    elif not os.access(anchor, os.W_OK | os.X_OK):
        problems.append(f"output directory {str(out_dir)!r}: {str(anchor)!r} is not writable")
    return problems


def foreign_entries(out_dir: Path) -> list[str]:
    """Entries of ``out_dir`` that no merge writes (subdirectories end in ``/``)."""
    found = []
    for entry in sorted(Path(out_dir).iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            found.append(entry.name + "/")
        elif not any(fnmatch.fnmatch(entry.name, p) for p in OUTPUT_ENTRY_PATTERNS):
            found.append(entry.name)
    return found


def overwrite_problems(out_dir: Path) -> list[str]:
    """``--overwrite`` replaces an earlier merge output; a directory that also holds other
    files or any subdirectory is refused, naming them (nothing is deleted)."""
    foreign = foreign_entries(out_dir)
    if not foreign:
        return []
    shown = ", ".join(foreign[:6]) + (", ..." if len(foreign) > 6 else "")
    one = len(foreign) == 1
    return [(f"--overwrite replaces an earlier merge output, but {str(out_dir)!r} also holds "
             f"{len(foreign)} entr{'y' if one else 'ies'} no merge writes ({shown}); move "
             f"{'it' if one else 'them'} away or choose another output directory")]


def config_inside_output_problems(out_dir: Path, config_path: str | os.PathLike | None,
                                  keep_intermediates: str | os.PathLike | None) -> list[str]:
    """The config file, or the ``--keep-intermediates`` directory, inside the output
    directory: preparing the output would delete or collide with them. (A config that is
    the output's own ``mergekit_config.yml`` is fine: the merge writes that same text back.)"""
    out = Path(out_dir).absolute().resolve()
    problems = []
    if config_path is not None:
        config = Path(config_path).absolute().resolve()
        if out in config.parents and config != out / "mergekit_config.yml":
            problems.append(f"the config file {os.fspath(config_path)!r} is inside the output "
                            f"directory {str(out_dir)!r}; move it out (writing the output "
                            "there would delete it)")
    if keep_intermediates is not None:
        keep = Path(keep_intermediates).absolute().resolve()
        if keep == out or out in keep.parents:
            problems.append(f"--keep-intermediates {os.fspath(keep_intermediates)!r} is inside "
                            f"the output directory {str(out_dir)!r}; choose a directory "
                            "outside it")
    return problems


def input_overlap_problems(out_dir: Path, input_dirs: Iterable[str | os.PathLike]) -> list[str]:
    """An output directory that is, or contains, an input model's directory is refused:
    writing (or ``--overwrite``) there would destroy the inputs."""
    out = Path(out_dir).absolute().resolve()
    problems = []
    for d in sorted({str(Path(p).resolve()) for p in input_dirs}):
        if Path(d) == out or out in Path(d).parents:
            problems.append(f"output directory {str(out_dir)!r} holds the input model {d!r}; "
                            "choose another output directory")
    return problems


def shard_file_bytes(shards: ShardPlan) -> dict[str, int]:
    """Exact size on disk of every planned shard file (header + data; the header holds the
    ``__metadata__`` the streaming writer puts in every shard)."""
    return {spec.filename: len(header_bytes(spec.entries, DEFAULT_METADATA)[0]) + spec.data_bytes
            for spec in shards.shards}


def space_problems(out_dir: Path, shards: ShardPlan, *, overwrite: bool = False,
                   kept: Iterable[str] = (), extra_bytes: int = 0) -> list[str]:
    """Whether the file system of ``out_dir`` has room for the shards not ``kept``, plus
    ``extra_bytes`` (the tokenizer files to copy) and ``METADATA_ALLOWANCE``; with
    ``overwrite`` the current content of ``out_dir`` counts as free."""
    out_dir = Path(out_dir)
    sizes = shard_file_bytes(shards)
    kept = set(kept)
    other = METADATA_ALLOWANCE + extra_bytes
    need = sum(n for name, n in sizes.items() if name not in kept) + other
    anchor = _existing_ancestor(out_dir)
    try:
        st = os.statvfs(anchor)
    except (OSError, AttributeError):
        return []
    free = st.f_bavail * st.f_frsize
    if overwrite and out_dir.is_dir():
        free += _tree_bytes(out_dir)
    if need <= free:
        return []
    return [(f"not enough free space for the output on the file system of {str(anchor)!r}: "
            f"it needs {human_bytes(need)} ({need} bytes: {len(sizes) - len(kept)} shard(s) "
            f"and {human_bytes(other)} for the other files), "
            f"{human_bytes(free)} ({free} bytes) are free")]
