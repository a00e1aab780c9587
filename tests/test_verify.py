"""`mergecore verify OUT_DIR`: a real merged output passes; each kind of damage is found."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mergecore.cli import main
from mergecore.faults import ENV_VAR
from mergecore.io.writer import MANIFEST_NAME, plan_shards
from mergecore.resume import ResumeError, check_resume
from mergecore.verify import verify_output

INDEX = "model.safetensors.index.json"
SHARD2 = "model-00002-of-00003.safetensors"


@pytest.fixture(scope="module")
def merged(tmp_path_factory, small_family):
    root = tmp_path_factory.mktemp("verify")
    base, ft1, ft2 = small_family
    cfg = {"merge_method": "ties", "base_model": base,
           "models": [{"model": ft1, "parameters": {"weight": 1.0, "density": 0.5}},
                      {"model": ft2, "parameters": {"weight": 0.5, "density": 0.5}}]}
    (root / "c.yml").write_text(yaml.safe_dump(cfg))
    out = root / "out"
    assert main(["merge", str(root / "c.yml"), str(out), "--quiet",
                 "--out-shard-size", "160K"]) == 0
    assert (out / SHARD2).is_file() and not (out / "model-00001-of-00004.safetensors").exists()
    return out


@pytest.fixture
def copy(merged, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(merged, out)
    return out


def test_a_merged_output_verifies(merged, capsys):
    assert main(["verify", str(merged)]) == 0
    text = capsys.readouterr().out
    assert text.count("sha256 matches the manifest") == 4  # 3 shards and the index
    assert ("side files: sha256 and size match the manifest (README.md, config.json, "
            "generation_config.json, mergekit_config.yml, tokenizer.json, "
            "tokenizer_config.json)") in text
    assert "read by transformers (LlamaConfig)" in text and text.rstrip().endswith(": OK")


def test_a_changed_byte_fails_the_checksum(copy, capsys):
    data = bytearray((copy / SHARD2).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / SHARD2).write_bytes(bytes(data))
    assert main(["verify", str(copy), "-q"]) == 1
    text = capsys.readouterr().out
    assert f"FAIL  {SHARD2}: sha256 differs from the manifest" in text
    assert text.rstrip().endswith(": 1 problem")
    assert main(["verify", str(copy), "--no-checksums"]) == 0  # headers and index still hold


def test_a_truncated_shard_fails_its_header_check(copy):
    data = (copy / SHARD2).read_bytes()
    (copy / SHARD2).write_bytes(data[:-100])
    problems = verify_output(copy).problems
    assert any(p.startswith(f"{SHARD2}: bad safetensors header") for p in problems)
    assert any(p.startswith(f"{SHARD2}: ") and "bytes, the manifest records" in p
               for p in problems)


def test_index_errors_are_found(copy):
    index = json.loads((copy / INDEX).read_text())
    name = next(n for n, f in index["weight_map"].items() if f == SHARD2)
    index["weight_map"][name] = "model-00001-of-00003.safetensors"
    index["metadata"]["total_size"] += 1
    (copy / INDEX).write_text(json.dumps(index))
    problems = verify_output(copy).problems
    assert any("not in it" in p and "model-00001" in p for p in problems)
    assert any("not in the index" in p and SHARD2 in p for p in problems)
    assert any("metadata.total_size" in p for p in problems)


def test_the_manifest_records_every_file_the_merge_wrote(merged):
    """Each file of the output is a shard, the index, the manifest or a recorded side file,
    recorded with its real size and sha256."""
    import hashlib

    doc = json.loads((merged / MANIFEST_NAME).read_text())
    recorded = {e["file"]: e for e in doc["side_files"]}
    shards = {e["file"] for e in doc["shards"]}
    on_disk = {p.name for p in merged.iterdir()}
    assert on_disk == shards | set(recorded) | {INDEX, MANIFEST_NAME}
    for name, entry in recorded.items():
        data = (merged / name).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert doc["index_sha256"] == hashlib.sha256((merged / INDEX).read_bytes()).hexdigest()


def test_edited_or_damaged_side_files_are_found(copy, capsys):
    """A valid but edited config.json passes transformers; the manifest still tells."""
    config = json.loads((copy / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (copy / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok = bytearray((copy / "tokenizer.json").read_bytes())
    tok[len(tok) // 2] ^= 0x20  # same size, other bytes
    (copy / "tokenizer.json").write_bytes(bytes(tok))
    (copy / "README.md").unlink()
    index = json.loads((copy / INDEX).read_text())
    (copy / INDEX).write_text(json.dumps(index))  # same content, other bytes
    assert main(["verify", str(copy), "-q"]) == 1
    text = capsys.readouterr().out
    assert "FAIL  config.json: sha256 differs from the manifest" in text \
        or "FAIL  config.json: " in text and "bytes, the manifest records" in text
    assert "FAIL  tokenizer.json: sha256 differs from the manifest" in text
    assert "FAIL  README.md: written by the merge, but missing" in text
    assert f"FAIL  {INDEX}: sha256 differs from the manifest" in text
    assert text.rstrip().endswith(": 4 problems")
    # without checksums only sizes count: the same-size tokenizer change is not seen
    problems = verify_output(copy, checksums=False).problems
    assert not any(p.startswith("tokenizer.json") for p in problems)
    assert any(p.startswith("README.md") for p in problems)


@pytest.mark.parametrize("stray", ["model-00004-of-00003.safetensors", "model.safetensors",
                                   "pytorch_model.bin"])
def test_a_weights_file_the_index_does_not_name_fails(copy, stray):
    shutil.copyfile(copy / SHARD2, copy / stray)
    problems = verify_output(copy).problems
    assert problems == [(f"{stray}: a weights file that is not part of this output (the index "
                        "does not name it); a loader may pick it up: remove it")]


def test_other_files_the_merge_did_not_write_are_noted(copy):
    (copy / "notes.txt").write_text("mine")
    (copy / ".gitattributes").write_text("*.safetensors filter=lfs")
    report = verify_output(copy)
    assert report.ok
    assert ("note", "not written by the merge: .gitattributes, notes.txt") in report.lines


def test_a_manifest_without_side_file_records_is_noted(copy):
    """Outputs of mergecore versions that did not record side files still verify."""
    doc = json.loads((copy / MANIFEST_NAME).read_text())
    del doc["side_files"], doc["index_sha256"], doc["finalized"]
    (copy / MANIFEST_NAME).write_text(json.dumps(doc))
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    report = verify_output(copy)
    assert report.ok
    assert any(kind == "note" and "records no side files" in m for kind, m in report.lines)


def test_missing_shard_and_leftover_temporary_file(copy):
    (copy / SHARD2).rename(copy / f".{SHARD2}.partial")
    problems = verify_output(copy).problems
    assert any("temporary files of an unfinished merge" in p for p in problems)
    assert any(p.startswith(f"{SHARD2}: named by") for p in problems)


@pytest.mark.parametrize("content", [None, "{not json", '{"model_type": "no-such-arch"}'])
def test_config_json_must_load_in_transformers(copy, content):
    if content is None:
        (copy / "config.json").unlink()
    else:
        (copy / "config.json").write_text(content)
    problems = verify_output(copy).problems
    assert problems and all(p.startswith("config.json") for p in problems), problems
    assert any("transformers cannot read it" in p or "is missing" in p for p in problems)
    if content is not None:  # a changed file also differs from the manifest's record
        assert "config.json: sha256 differs" in "\n".join(problems) or any(
            "bytes, the manifest records" in p for p in problems)


def test_output_without_manifest_is_checked_without_checksums(copy, capsys):
    (copy / MANIFEST_NAME).unlink()
    assert main(["verify", str(copy)]) == 0
    assert "checksums not checked" in capsys.readouterr().out


def test_bytes_after_the_last_tensor_fail_also_without_a_manifest(copy, capsys):
    """A mergekit output has no manifest (no sizes, no checksums): bytes appended to a shard
    are still found, as safetensors refuses such a file."""
    (copy / MANIFEST_NAME).unlink()
    shard = sorted(copy.glob("model-*.safetensors"))[1]
    with open(shard, "ab") as fh:
        fh.write(b"xyz")
    assert main(["verify", str(copy)]) == 1
    assert f"{shard.name}: 3 byte(s) after the last tensor's data" in capsys.readouterr().out


def test_incomplete_manifest_and_missing_directory(copy, tmp_path):
    doc = json.loads((copy / MANIFEST_NAME).read_text())
    doc["shards"][0]["done"] = False
    (copy / MANIFEST_NAME).write_text(json.dumps(doc))
    assert verify_output(copy).problems == [
        "model-00001-of-00003.safetensors: the manifest does not record it as complete"]
    assert verify_output(tmp_path / "nothing").problems == ["does not exist"]
    (tmp_path / "a_file").write_text("x")
    assert verify_output(tmp_path / "a_file").problems == ["not a directory"]


def test_a_missing_path_is_said_not_to_exist(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "bad" / "nonexist")]) == 1
    text = capsys.readouterr().out
    assert "FAIL  does not exist" in text and "not a directory" not in text


def _done_of(out: Path) -> tuple[int, int]:
    shards = json.loads((out / MANIFEST_NAME).read_text())["shards"]
    return sum(1 for e in shards if e["done"]), len(shards)


def test_an_interrupted_merge_gets_a_resume_hint(merged, tmp_path, monkeypatch, capsys):
    """A merge stopped by an injected write error leaves complete shards and the manifest,
    no index and no config.json; verify says how far it got and how to finish it."""
    out = tmp_path / "out"
    monkeypatch.setenv(ENV_VAR, "after=30,errno=EIO")
    assert main(["merge", str(merged.parent / "c.yml"), str(out), "--quiet",
                 "--out-shard-size", "160K"]) == 1
    monkeypatch.delenv(ENV_VAR)
    assert not (out / INDEX).exists() and not (out / "config.json").exists()
    done, total = _done_of(out)
    assert total == 3 and done < total
    capsys.readouterr()
    assert main(["verify", str(out), "-q"]) == 1
    text = capsys.readouterr().out
    assert f"hint  the manifest shows {done} of {total} shards done: this merge was " \
           "interrupted; run the same `mergecore merge ... --resume` to finish it" in text
    assert "FAIL  no weights" in text
    report = verify_output(out)
    assert len(report.problems) == 2  # the hint is not counted as a problem
    # while a merge holds the output's lock (is writing it), verify says so instead
    from mergecore.out_lock import OutputLock

    with OutputLock(out) as lock:
        assert lock.acquire()
        held = subprocess.run([sys.executable, "-m", "mergecore", "verify", str(out), "-q"],
                              capture_output=True, text=True, check=False, timeout=120)
    assert "a mergecore merge is writing this output right now" in held.stdout
    assert "--resume" not in held.stdout


def test_hint_for_shards_done_but_index_missing_and_none_for_finished_output(copy, merged):
    assert not any(kind == "hint" for kind, _ in verify_output(merged).lines)
    (copy / INDEX).unlink()  # every shard complete, stopped before the index
    hints = [m for kind, m in verify_output(copy).lines if kind == "hint"]
    assert hints and hints[0].startswith("the manifest shows 3 of 3 shards done")


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 1 << 40) | st.text(max_size=40)
    | st.sampled_from([SHARD2, "model-00001-of-00003.safetensors", "../x", "done", "sha256",
                       "config.json", INDEX, ""]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["file", "done", "bytes", "sha256", "shards", "format",
                                       "weight_map", "metadata", "total_size",
                                       "plan_fingerprint", "side_files", "index",
                                       "index_sha256"]), inner, max_size=5),
    max_leaves=20)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=_json, manifest=_json, shards=st.lists(_json, max_size=3))
@example(index={"weight_map": {}}, manifest={}, shards=[])  # once reported as fine
def test_damaged_index_and_manifest_are_reported_never_raised(merged, tmp_path_factory, index,
                                                              manifest, shards):
    """``verify_output`` reports any JSON in the index and the manifest; ``check_resume``
    raises only ``ResumeError`` for it (or resumes nothing)."""
    out = tmp_path_factory.mktemp("fuzz")
    for name in ("model-00001-of-00003.safetensors", SHARD2, "config.json"):
        (out / name).symlink_to(merged / name)
    (out / INDEX).write_text(json.dumps(index))
    if isinstance(manifest, dict):
        manifest = {**manifest, "format": "mergecore-manifest", "shards": shards,
                    "plan_fingerprint": "f"}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    report = verify_output(out, checksums=True)
    assert not report.ok
    plan = plan_shards([("a", "F32", (2,)), ("b", "F32", (2,))], 8)
    try:
        state = check_resume(out, plan, "f")
    except ResumeError:
        return
    assert set(state.completed) <= {"model-00001-of-00002.safetensors"}


def test_config_check_without_transformers(copy, monkeypatch):
    """With transformers missing (import blocked), config.json is checked as JSON."""
    monkeypatch.setitem(sys.modules, "transformers", None)
    report = verify_output(copy)
    assert report.ok and any("transformers is not installed" in m for _, m in report.lines)
    (copy / "config.json").write_text('{"hidden_size": 8}')
    assert verify_output(copy).problems[-1] == "config.json: no model_type"


def test_checksums_show_progress_on_a_terminal_and_not_with_quiet(merged, run_in_terminal):
    """Hashing a large output takes minutes: on a terminal a bar says how far it is."""
    shown = run_in_terminal(["verify", str(merged)])
    assert "verifying checksums" in shown and "B/s" in shown, shown
    assert ": OK" in shown
    quiet = run_in_terminal(["verify", str(merged), "--quiet"])
    assert "verifying checksums" not in quiet, quiet


def test_hash_files_matches_hashlib_and_marks_unreadable_files(merged, tmp_path):
    import hashlib

    from mergecore.checksums import hash_files

    files = sorted(merged.glob("*.safetensors"))
    missing = tmp_path / "gone.safetensors"
    digests = hash_files([*files, missing])
    assert digests[:-1] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert digests[-1] is None


def test_hashing_stops_soon_after_an_interrupt(tmp_path, monkeypatch):
    """Ctrl-C while shards are hashed (verify, --resume) does not wait for every file: the
    workers stop after their current chunk. Sparse files: no disk space, hashed at memory
    speed; the interrupted run must read far less than the whole set."""
    import _thread
    import threading

    from mergecore import checksums

    files = []
    for i in range(12):
        path = tmp_path / f"shard{i}.bin"
        with open(path, "wb") as fh:
            fh.truncate(256 << 20)
        files.append(path)
    read = []
    real = checksums.file_sha256

    def counting(path, on_bytes):
        return real(path, lambda n: (read.append(n), on_bytes(n)))

    monkeypatch.setattr(checksums, "file_sha256", counting)
    timer = threading.Timer(0.05, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        checksums.hash_files(files)
        time.sleep(10)  # hashed before the interrupt came: let it land here
    assert sum(read) < sum(f.stat().st_size for f in files) / 2, sum(read)
