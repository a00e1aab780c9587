"""Resuming an interrupted merge: the plan's fingerprint and the check of what is already done.

A merge records in its manifest (``.mergecore-manifest.json``, kept up to date by the
streaming writer) a *fingerprint*: the sha256 of everything that decides the output bytes
(and the named parts it was computed from, so a refusal can say what changed) —
every output tensor (name, shape, dtype, method, parameters), every input it reads (file,
tensor, dtype, shape, byte range, LoRA adapter), each input file's and adapter file's size
and modification time, the shard size, the random seed, the compute device type, a forced
backend, the output config.json and the mergecore version. Thread count and batching are not in it: they do not change the bytes.

``mergecore merge ... --resume`` recomputes the fingerprint and refuses an output directory
whose manifest holds a different one (another config, changed inputs or options), so a
resumed output is never a mix of two merges. It then re-hashes every shard the manifest
marks complete; those whose size and sha256 still match are kept, every other shard is
merged again. Because every kernel is deterministic (DARE's random stream is keyed by seed
and tensor name, not by position), the result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergecore.checksums import hash_files
from mergecore.io.writer import MANIFEST_NAME, ShardPlan

FINGERPRINT_KEY = "plan_fingerprint"
FINGERPRINT_PARTS_KEY = "plan_fingerprint_parts"


class ResumeError(ValueError):
    """An output directory cannot be resumed (foreign or unreadable manifest, other merge)."""


class Fingerprint(str):
    """A plan's fingerprint (the sha256 hex digest, usable as a plain string) with the
    ``parts`` it was computed from: readable names -> values (settings as they are, large
    parts as ``sha256:`` digests), recorded in the manifest so that a refused ``--resume``
    can say what changed."""

    parts: dict[str, Any]

    @classmethod
    def of(cls, parts: dict[str, Any]) -> Fingerprint:
        fp = cls(_sha256(parts))
        fp.parts = parts
        return fp

    def manifest_entries(self) -> dict[str, Any]:
        """What the manifest records: the digest, and the parts."""
        return {FINGERPRINT_KEY: str(self), FINGERPRINT_PARTS_KEY: self.parts}


def _sha256(value: Any) -> str:
    """sha256 (hex) of ``value``'s canonical JSON."""
    text = json.dumps(value, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _digest(value: Any) -> str:
    """A short tagged digest of a large fingerprint part."""
    return "sha256:" + _sha256(value)[:16]


def plan_fingerprint(plan: Any, *, out_shard_size: int | None, random_seed: int | None,
                     device: str = "cpu") -> Fingerprint:
    """The fingerprint of everything in ``plan`` and the options that decides the output
    bytes (see the module docstring)."""
    from mergecore import __version__

    files: dict[str, Any] = {}
    resolved: dict[object, str] = {}
    tensors = []
    for t in plan.tensors:
        inputs = []
        for inp in t.inputs:
            path = resolved.get(inp.info.file)
            if path is None:
                path = resolved[inp.info.file] = _file_key(inp.info.file)
            if path not in files:
                try:
                    st = os.stat(path)
                    files[path] = [st.st_size, st.st_mtime_ns]
                except OSError:
                    files[path] = [-1, -1]
            if inp.adapter and inp.adapter not in files:
                files[inp.adapter] = _digest(_dir_stats(inp.adapter))
            inputs.append([inp.model, inp.adapter, inp.rows, path, inp.info.name,
                           inp.info.dtype, list(inp.info.shape), inp.info.data_start,
                           inp.info.nbytes])
        tensors.append([t.name, list(t.shape), t.out_dtype, t.compute_dtype, t.method,
                        t.base_index, t.global_params, t.input_params, inputs])
    parts: dict[str, Any] = {
        "mergecore version": __version__,
        "--out-shard-size": out_shard_size,
        "--random-seed": random_seed,
        "device": str(device).split(":")[0],
        "MERGECORE_BACKEND": os.environ.get("MERGECORE_BACKEND", ""),
        "the output's config.json": _digest(plan.output_config),
        "the output tensors, their inputs, methods and parameters": _digest(tensors),
    }
    parts.update({f"input {path!r}": stat for path, stat in files.items()})
    return Fingerprint.of(parts)


def recipe_fingerprint(recipe: Any, *, out_shard_size: int | None,
                       random_seed: int | None, device: str = "cpu") -> Fingerprint:
    """The fingerprint of a multi-stage recipe: every stage's ``plan_fingerprint`` parts (its
    tensors, parameters, inputs and their file stats; a stage used as a model appears by
    name), with the final output's shard size."""
    parts: dict[str, Any] = {"--out-shard-size": out_shard_size}
    for s in recipe.stages:
        stage = plan_fingerprint(s.plan, out_shard_size=None, device=device,
                                 random_seed=s.plan.random_seed or random_seed)
        parts.update({f"{s.title}: {k}": v for k, v in stage.parts.items()
                      if k != "--out-shard-size"})
    return Fingerprint.of(parts)


def describe_changes(before: Any, now: dict[str, Any] | None, *, most: int = 6) -> str:
    """What differs between two fingerprints' parts, as one phrase ('' when unknown)."""
    if not isinstance(before, dict) or not now:
        return ""
    changes = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if old == new:
            continue
        if key not in before:
            changes.append(f"{key} is new")
        elif key not in now:
            changes.append(f"{key} is no longer used")
        elif key.startswith("input ") and isinstance(old, list) and isinstance(new, list):
            changes.append(f"{key} changed (size {old[0]} -> {new[0]} bytes)" if old[0] != new[0]
                           else f"{key} was modified since")
        elif isinstance(old, str) and old.startswith("sha256:"):
            changes.append(f"{key} changed")
        else:
            changes.append(f"{key} was {old!r}, now {new!r}")
    if len(changes) > most:
        changes = changes[:most] + [f"and {len(changes) - most} more"]
    return "; ".join(changes)


def _file_key(file: Any) -> str:
    """An input file as the fingerprint names it: its absolute path, or for the virtual
    checkpoint of a recipe stage (``<mergecore-stage>/name``) that name as it is, so the
    fingerprint does not depend on the working directory."""
    from mergecore.recipes.graph import STAGE_FILE_ROOT

    path = Path(file)
    if path.parts[:1] == STAGE_FILE_ROOT.parts:
        return str(path)
    return str(path.resolve())


def _dir_stats(directory: str) -> list:
    """``[name, size, mtime_ns]`` of every file directly in ``directory`` (a LoRA adapter)."""
    out = []
    try:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if entry.is_file():
                st = entry.stat()
                out.append([entry.name, st.st_size, st.st_mtime_ns])
    except OSError:
        pass
    return out


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The manifest of ``out_dir`` as a dict, None when there is none; ``ResumeError`` when it
    is not a readable mergecore manifest."""
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResumeError(f"cannot read the manifest {str(path)!r}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != "mergecore-manifest" \
            or not isinstance(doc.get("shards"), list):
        raise ResumeError(f"{str(path)!r} is not a mergecore manifest")
    return doc


@dataclass
class ResumeState:
    """What a resumed merge keeps and what it redoes.

    ``completed``: ``{shard filename: sha256}`` verified on disk (pass to ``StreamingWriter``);
    ``redo``: ``{shard filename: reason}`` of shards the manifest called complete but that do
    not match any more; ``fresh``: True when there was nothing to resume.
    """

    completed: dict[str, str | None] = field(default_factory=dict)
    redo: dict[str, str] = field(default_factory=dict)
    fresh: bool = True

    def summary(self, total: int) -> str:
        if self.fresh:
            return "nothing to resume: starting a new merge"
        parts = [f"resuming: {len(self.completed)} of {total} shards verified and kept"]
        parts += [f"{name} is merged again ({why})" for name, why in self.redo.items()]
        return "; ".join(parts)


def check_resume(out_dir: Path, shards: ShardPlan, fingerprint: str | Fingerprint, *,
                 quiet: bool = True) -> ResumeState:
    """Decide what a resumed merge into ``out_dir`` keeps (reads and hashes completed shards,
    with a progress bar on a terminal unless ``quiet``).

    Raises ``ResumeError`` when ``out_dir`` holds files but no mergecore manifest, or a
    manifest of another merge (different fingerprint).
    """
    out_dir = Path(out_dir)
    doc = read_manifest(out_dir) if out_dir.is_dir() else None
    if doc is None:
        if out_dir.is_dir() and any(out_dir.iterdir()):
            raise ResumeError(f"cannot resume into {str(out_dir)!r}: it is not empty and has no "
                              f"{MANIFEST_NAME} (not an interrupted mergecore merge); pass "
                              "--overwrite to replace it")
        return ResumeState()
    recorded = doc.get(FINGERPRINT_KEY)
    if recorded != fingerprint:
        changed = describe_changes(doc.get(FINGERPRINT_PARTS_KEY),
                                   getattr(fingerprint, "parts", None))
        what = (f"what changed: {changed}" if changed else
                "the config, the input files or the options changed")
        raise ResumeError(
            f"cannot resume into {str(out_dir)!r}: it holds the output of a different merge "
            f"(plan fingerprint {str(recorded)[:12]} there, {fingerprint[:12]} now; {what}); "
            "rerun with the options of the interrupted run to resume it, or pass --overwrite "
            "to start over")
    planned = {spec.filename: spec for spec in shards.shards}
    state = ResumeState(fresh=False)
    to_hash: dict[str, str] = {}
    for entry in doc["shards"]:
        if not isinstance(entry, dict) or not entry.get("done"):
            continue
        name = entry.get("file")
        if not isinstance(name, str) or name not in planned:
            continue
        path = out_dir / name
        if not path.is_file():
            state.redo[name] = "the file is missing"
        elif path.stat().st_size != entry.get("bytes"):
            state.redo[name] = (f"size {path.stat().st_size} differs from the recorded "
                                f"{entry.get('bytes')}")
        elif entry.get("sha256") is None:
            state.completed[name] = None
        else:
            to_hash[name] = str(entry["sha256"])
    digests = dict(zip(to_hash, hash_files([out_dir / n for n in to_hash],
                                           label="checking kept shards", quiet=quiet)))
    for name in sorted(to_hash, key=list(planned).index):
        if digests[name] == to_hash[name]:
            state.completed[name] = to_hash[name]
        elif digests[name] is None:
            state.redo[name] = "it cannot be read"
        else:
            state.redo[name] = "its sha256 differs from the manifest"
    return state


def prepare_resume_dir(out_dir: Path, shards: ShardPlan, state: ResumeState) -> None:
    """Remove what a resumed run rewrites: temporary files, shards to redo and the index,
    also when every shard is kept (the run writes the side files again and the index last,
    so the directory never looks complete while it is not, even if stopped meanwhile)."""
    for p in out_dir.glob(".*.partial"):
        p.unlink(missing_ok=True)
    for spec in shards.shards:
        if spec.filename not in state.completed:
            (out_dir / spec.filename).unlink(missing_ok=True)
    if shards.index_filename:
        (out_dir / shards.index_filename).unlink(missing_ok=True)


def kept_progress(out_dir: str | os.PathLike) -> tuple[int, int] | None:
    """``(complete shards, planned shards)`` recorded in ``out_dir``'s manifest, or None."""
    try:
        doc = read_manifest(Path(out_dir))
    except ResumeError:
        return None
    if doc is None:
        return None
    shards = doc["shards"]
    return sum(1 for s in shards if isinstance(s, dict) and s.get("done")), len(shards)


def resume_hint(out_dir: str | os.PathLike) -> str:
    """One sentence on what an interrupted or failed merge left in ``out_dir``."""
    progress = kept_progress(out_dir)
    if progress is None:
        return "no output was written"
    done, total = progress
    return (f"{done} of {total} output shards are complete and kept in {str(out_dir)!r}; run "
            "the same command with --resume to finish (or --overwrite to start over)")
