"""``mergecore verify OUT_DIR``: does a merged output hold together?

Checks, each reported as one line:

- no temporary ``.*.partial`` files are left (an unfinished or interrupted run);
- the weights: ``model.safetensors.index.json`` parses, every file it names exists, every
  shard's header parses (``read_header``: valid JSON, known dtypes, sizes = shape x dtype,
  offsets inside the file, no overlaps), every tensor of the weight map is in the shard the
  map names and every tensor of a shard is in the map, and ``metadata.total_size`` is the
  sum of the tensors' sizes; without an index, ``model.safetensors`` alone;
- the manifest (when the output was written by mergecore): it lists the same shard files,
  marks them all complete, and each file's size and sha256 equal the recorded ones; the
  side files it records (config.json, the tokenizer files, the chat template, the YAML, the
  model card) and the index are present with the recorded sha256, so an edited config or a
  damaged tokenizer.json is found (manifests of mergecore versions that recorded no side
  files: a note says they were not checked);
- no weights file the output does not use (a ``*.safetensors`` or ``*.bin`` that the index
  does not name: a loader may pick it up); other files the merge did not write are listed
  in a note;
- ``config.json`` is read by ``transformers.AutoConfig`` (when transformers is not
  installed: it is valid JSON with a ``model_type``, and a note says it was not loaded);
- the tokenizer, when there is one whose size its files state (``mergecore.tokenizer``),
  uses no token id at or past ``config.json``'s ``vocab_size``.

When the manifest shows an unfinished merge (shards not complete, or the final index or
weights file not written yet), a ``hint`` line says how many shards are done and that
``mergecore merge ... --resume`` finishes it; hints are shown even with ``--quiet``.

An output written by mergekit (no manifest) is checked for everything but the checksums.
``VerifyReport.ok`` is False when any check failed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergecore.checksums import hash_files
from mergecore.config.layout import config_vocab_size
from mergecore.io.errors import SafetensorsError
from mergecore.io.safetensors_format import read_header
from mergecore.io.writer import MANIFEST_NAME
from mergecore.resume import ResumeError, read_manifest
from mergecore.tokenizer import token_count

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


@dataclass
class VerifyReport:
    """The result of ``verify_output``: ``(passed, message)`` lines in check order."""

    out_dir: Path
    lines: list[tuple[str, str]] = field(default_factory=list)

    def passed(self, message: str) -> None:
        self.lines.append(("ok", message))

    def failed(self, message: str) -> None:
        self.lines.append(("FAIL", message))

    def note(self, message: str) -> None:
        self.lines.append(("note", message))

    def hint(self, message: str) -> None:
        """Advice on what to do about the problems (shown even when quiet; not a problem)."""
        self.lines.append(("hint", message))

    @property
    def ok(self) -> bool:
        return not any(kind == "FAIL" for kind, _ in self.lines)

    @property
    def problems(self) -> list[str]:
        return [m for kind, m in self.lines if kind == "FAIL"]

    def text(self, quiet: bool = False) -> str:
        shown = [(k, m) for k, m in self.lines if not quiet or k in ("FAIL", "hint")]
        body = [f"{k:>4}  {m}" for k, m in shown]
        verdict = (f"{str(self.out_dir)!r}: OK" if self.ok else
                   f"{str(self.out_dir)!r}: {len(self.problems)} "
                   f"problem{'' if len(self.problems) == 1 else 's'}")
        return "\n".join(body + [verdict])


def _check_weights(out_dir: Path, report: VerifyReport) -> list[str]:
    """Index and shard headers; returns the shard file names in use."""
    index_path = out_dir / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise TypeError("weight_map is not a mapping of names to file names")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            report.failed(f"{INDEX_NAME}: unreadable ({type(exc).__name__}: {exc})")
            return []
        if not weight_map:
            report.failed(f"{INDEX_NAME}: weight_map lists no tensors")
            return []
        files = sorted(set(weight_map.values()))
        metadata = index.get("metadata")
        total_size = metadata.get("total_size") if isinstance(metadata, dict) else None
    elif (out_dir / SINGLE_NAME).is_file():
        weight_map, files, total_size = None, [SINGLE_NAME], None
    else:
        report.failed(f"no weights: neither {INDEX_NAME} nor {SINGLE_NAME} exists")
        return []
    data_bytes = 0
    tensors_seen = 0
    for name in files:
        path = out_dir / name
        if os.sep in name or name.startswith(".") or not path.is_file():
            report.failed(f"{name}: named by {INDEX_NAME} but not a file in the directory")
            continue
        try:
            infos, _ = read_header(path)
        except (SafetensorsError, OSError) as exc:
            report.failed(f"{name}: bad safetensors header: {exc}")
            continue
        if infos:  # the data section ends where the last tensor does (safetensors refuses
            end = max(i.data_start + i.nbytes for i in infos.values())  # trailing bytes)
            size = path.stat().st_size
            if size != end:
                report.failed(f"{name}: {size - end} byte(s) after the last tensor's data "
                              "(safetensors refuses to load the file)")
        tensors_seen += len(infos)
        data_bytes += sum(i.nbytes for i in infos.values())
        if weight_map is not None:
            listed = {t for t, f in weight_map.items() if f == name}
            missing = sorted(listed - set(infos))
            unlisted = sorted(set(infos) - listed)
            if missing:
                report.failed(f"{name}: {len(missing)} tensor(s) of the index are not in it, "
                              f"e.g. {missing[0]!r}")
            if unlisted:
                report.failed(f"{name}: {len(unlisted)} tensor(s) in it are not in the index "
                              f"(or the index names another file), e.g. {unlisted[0]!r}")
            if missing or unlisted:
                continue
        report.passed(f"{name}: header valid, {len(infos)} tensors")
    if total_size is not None and total_size != data_bytes:
        report.failed(f"{INDEX_NAME}: metadata.total_size is {total_size}, the shards hold "
                      f"{data_bytes} bytes of tensor data")
    elif weight_map is not None:
        report.passed(f"{INDEX_NAME}: {len(weight_map)} tensors in {len(files)} shards")
    return files


def _read_manifest(out_dir: Path, report: VerifyReport) -> dict[str, Any] | None:
    try:
        doc = read_manifest(out_dir)
    except ResumeError as exc:
        report.failed(str(exc))
        return None
    if doc is None:
        report.note(f"no {MANIFEST_NAME} (not written by mergecore): checksums not checked")
    return doc


def _compare_with_records(out_dir: Path, records: dict[str, dict[str, Any]],
                          report: VerifyReport, checksums: bool, quiet: bool) -> list[str]:
    """Compare files of ``out_dir`` (present) with their manifest records: the size (when
    recorded), then, with ``checksums``, the sha256 (hashed four at a time, with a progress
    bar on a terminal unless ``quiet``). Mismatches are reported; returns the names that
    match."""
    matching: list[str] = []
    to_hash: list[str] = []
    for name, entry in sorted(records.items()):
        size = (out_dir / name).stat().st_size
        if entry.get("bytes") is not None and size != entry["bytes"]:
            report.failed(f"{name}: {size} bytes, the manifest records {entry['bytes']}")
        elif not checksums:
            matching.append(name)
        elif entry.get("sha256") is None:
            report.note(f"{name}: no checksum recorded")
        else:
            to_hash.append(name)
    digests = hash_files([out_dir / n for n in to_hash], label="verifying checksums",
                         quiet=quiet)
    for name, digest in zip(to_hash, digests):
        if digest is None:
            report.failed(f"{name}: cannot be read")
        elif digest != records[name]["sha256"]:
            report.failed(f"{name}: sha256 differs from the manifest (the file was changed "
                          "or corrupted)")
        else:
            matching.append(name)
    return matching


def _check_manifest(out_dir: Path, doc: dict[str, Any], files: list[str],
                    report: VerifyReport, checksums: bool, quiet: bool = True) -> None:
    entries = {e["file"]: e for e in doc["shards"]
               if isinstance(e, dict) and isinstance(e.get("file"), str)}
    if set(entries) != set(files):
        report.failed(f"{MANIFEST_NAME} lists shards {sorted(map(str, entries))}, the "
                      f"weights use {files}")
    complete = {}
    for name in sorted(set(entries) & set(files)):
        if not entries[name].get("done"):
            report.failed(f"{name}: the manifest does not record it as complete")
        elif (out_dir / name).is_file():  # a missing one: reported by the weights check
            complete[name] = entries[name]
    for name in _compare_with_records(out_dir, complete, report, checksums, quiet):
        if checksums:
            report.passed(f"{name}: sha256 matches the manifest")


def _recorded_side_files(doc: dict[str, Any] | None) -> dict[str, dict[str, Any]] | None:
    """``{name: record}`` of the side files the manifest records; None when it records none
    (no manifest, or one written before mergecore recorded them)."""
    if doc is None or not isinstance(doc.get("side_files"), list):
        return None
    return {e["file"]: e for e in doc["side_files"]
            if isinstance(e, dict) and isinstance(e.get("file"), str)}


def _check_side_files(out_dir: Path, doc: dict[str, Any], report: VerifyReport,
                      checksums: bool, quiet: bool = True) -> None:
    """Every side file the manifest records (config.json, tokenizer, card, YAML) and the
    index: present, and of the recorded size and sha256."""
    recorded = _recorded_side_files(doc)
    if recorded is None and doc.get("finalized") is False:
        report.failed(f"{MANIFEST_NAME} shows a merge that was not finalized (its side files "
                      "and index were never recorded)")
        return
    if recorded is None:
        report.note(f"{MANIFEST_NAME} records no side files (written by an older mergecore): "
                    "config.json, the tokenizer and the index not checked against it")
        return
    present = {}
    for name, entry in recorded.items():
        if os.sep not in name and (out_dir / name).is_file():
            present[name] = entry
        elif name != "config.json":  # _check_config reports a missing config.json
            report.failed(f"{name}: written by the merge, but missing")
    index, index_sha = doc.get("index"), doc.get("index_sha256")
    if (checksums and isinstance(index, str) and isinstance(index_sha, str)
            and os.sep not in index and (out_dir / index).is_file()
            and _compare_with_records(out_dir, {index: {"sha256": index_sha}}, report, True,
                                      True)):
        report.passed(f"{index}: sha256 matches the manifest")
    good = _compare_with_records(out_dir, present, report, checksums, quiet)
    if good:
        what = "sha256 and size match" if checksums else "sizes match"
        report.passed(f"side files: {what} the manifest ({', '.join(good)})")


def _check_unknown_files(out_dir: Path, files: list[str], doc: dict[str, Any] | None,
                         report: VerifyReport) -> None:
    """Files in ``out_dir`` that the merge did not write. A weights file (``*.safetensors``,
    ``*.bin`` ...) that the index does not name is a problem: tools that look for weights by
    name or pattern may load it (transformers prefers a ``model.safetensors`` to an index).
    Other files are listed in a note when the manifest records the side files."""
    known = set(files) | {INDEX_NAME, MANIFEST_NAME}
    recorded = _recorded_side_files(doc)
    if recorded is not None:
        known |= set(recorded)
    unknown = sorted(p.name for p in out_dir.iterdir()
                     if p.name not in known and not p.name.endswith(".partial"))
    weights = [n for n in unknown if n.endswith(WEIGHT_SUFFIXES)]
    for name in weights:
        report.failed(f"{name}: a weights file that is not part of this output (the index "
                      "does not name it); a loader may pick it up: remove it")
    others = [n for n in unknown if n not in weights]
    if others and recorded is not None:
        shown = ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8
                                         else "")
        report.note(f"not written by the merge: {shown}")


def _check_config(out_dir: Path, report: VerifyReport) -> None:
    if not (out_dir / "config.json").is_file():
        report.failed("config.json is missing")
        return
    try:
        from transformers import AutoConfig
    except ImportError:
        try:
            doc = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            report.failed(f"config.json: not valid JSON ({exc})")
            return
        if not isinstance(doc, dict) or not isinstance(doc.get("model_type"), str):
            report.failed("config.json: no model_type")
            return
        report.note("config.json: valid JSON with a model_type; transformers is not installed, "
                    "so it was not loaded")
        return
    try:
        config = AutoConfig.from_pretrained(str(out_dir))
    except Exception as exc:  # noqa: BLE001 - any failure of transformers is the finding
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        report.failed(f"config.json: transformers cannot read it ({type(exc).__name__}: "
                      f"{first})")
        return
    report.passed(f"config.json: read by transformers ({type(config).__name__})")


def _check_tokenizer(out_dir: Path, report: VerifyReport) -> None:
    count = token_count(out_dir)
    try:
        config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return  # _check_config reports it
    vocab = config_vocab_size(config)
    if count is None or vocab is None:
        return
    if count > vocab:
        report.failed(f"tokenizer: {count} tokens, but config.json's vocab_size is {vocab} "
                      f"(token ids {vocab}..{count - 1} have no embedding row)")
    else:
        report.passed(f"tokenizer: {count} tokens, within vocab_size {vocab}")


def _unfinished_progress(out_dir: Path) -> tuple[int, int] | None:
    """``(complete shards, planned shards)`` when the manifest of ``out_dir`` shows a merge
    that did not finish: the file it ends with (the index it names, or its only shard when it
    names none) is absent, or the manifest says it was not finalized. None for a finished
    output, or with no readable manifest."""
    try:
        doc = read_manifest(out_dir)
    except ResumeError:
        return None
    if doc is None or not doc["shards"]:
        return None
    entries = [e for e in doc["shards"] if isinstance(e, dict)]
    if doc.get("finalized") is False:  # stopped after its last shard, before the side files
        return sum(1 for e in entries if e.get("done") is True), len(doc["shards"])
    index = doc.get("index")
    if isinstance(index, str) and index:
        last = index
    elif len(entries) == 1 and isinstance(entries[0].get("file"), str):
        last = entries[0]["file"]
    else:
        return None
    if os.sep in last or (out_dir / last).is_file():
        return None
    return sum(1 for e in entries if e.get("done") is True), len(doc["shards"])


def _hint_if_interrupted(out_dir: Path, report: VerifyReport) -> None:
    """A hint line when the manifest shows an interrupted merge that --resume can finish,
    or that a merge is writing the output right now (it holds the output's lock)."""
    from mergecore.out_lock import OutputLock

    progress = _unfinished_progress(out_dir)
    if progress is None:
        return
    with OutputLock(out_dir) as lock:
        if lock.busy():
            report.hint("a mergecore merge is writing this output right now: verify it "
                        "again once that merge has finished")
            return
    done, total = progress
    report.hint(f"the manifest shows {done} of {total} shards done: this merge was "
                "interrupted; run the same `mergecore merge ... --resume` to finish it")


def verify_output(out_dir: str | os.PathLike, *, checksums: bool = True,
                  quiet: bool = True) -> VerifyReport:
    """Check a merged model directory (see the module docstring); never raises for a
    problem in the output, reports it. Unless ``quiet``, hashing the shards shows a progress
    bar on a terminal."""
    out_dir = Path(out_dir)
    report = VerifyReport(out_dir)
    if not out_dir.exists():
        report.failed("does not exist")
        return report
    if not out_dir.is_dir():
        report.failed("not a directory")
        return report
    leftovers = sorted(p.name for p in out_dir.glob(".*.partial"))
    if leftovers:
        report.failed(f"temporary files of an unfinished merge are present: "
                      f"{', '.join(leftovers)} (finish it with mergecore merge ... --resume)")
    files = _check_weights(out_dir, report)
    doc = _read_manifest(out_dir, report) if files else None
    if doc is not None:
        _check_manifest(out_dir, doc, files, report, checksums, quiet)
        _check_side_files(out_dir, doc, report, checksums, quiet)
    if files:
        _check_unknown_files(out_dir, files, doc, report)
    _check_config(out_dir, report)
    _check_tokenizer(out_dir, report)
    _hint_if_interrupted(out_dir, report)
    return report
