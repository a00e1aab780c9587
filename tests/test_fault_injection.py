"""Interrupted merges lose nothing: real SIGKILL / SIGTERM / SIGINT / ENOSPC, then --resume.

Each fault hits a real ``python -m mergecore merge`` subprocess (or, for the injected OS
error, an in-process run) writing a DARE-TIES merge of generated checkpoints into five
shards. The test then checks what was left (no file that looks complete, no temporary
file after a clean stop, completed shards matching their recorded checksums), resumes with
``--resume`` and compares every output file byte for byte with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mergecore.checksums import file_sha256
from mergecore.cli import main
from mergecore.faults import ENV_VAR
from mergecore.io.writer import MANIFEST_NAME
from mergecore.units import parse_size
from mergecore.verify import verify_output

SHARD_SIZE = "100K"  # five shards for this family
SEED = "3"
pytestmark = pytest.mark.usefixtures("keep_thread_settings")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_family):
    """Inputs, the config and the output of an uninterrupted run (the reference)."""
    root = tmp_path_factory.mktemp("faults")
    base, ft1, ft2 = small_family
    cfg = {"merge_method": "dare_ties", "base_model": base,
           "models": [{"model": ft1, "parameters": {"weight": 1.0, "density": 0.5}},
                      {"model": ft2, "parameters": {"weight": 0.5, "density": 0.5}}]}
    config = root / "c.yml"
    config.write_text(yaml.safe_dump(cfg))
    clean = root / "clean" / "out"
    assert main(_args(config, clean) + ["-j", "2"]) == 0
    return config, clean


def _args(config: Path, out: Path) -> list[str]:
    return ["merge", str(config), str(out), "--quiet", "--out-shard-size", SHARD_SIZE,
            "--random-seed", SEED]


def _start(config: Path, out: Path, fault: str) -> subprocess.Popen:
    env = dict(os.environ, **{ENV_VAR: fault})
    return subprocess.Popen([sys.executable, "-m", "mergecore", *_args(config, out), "-j", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _assert_nothing_looks_complete(out: Path) -> dict:
    """After a stop: no index, no config.json; every shard the manifest calls complete is on
    disk with its recorded sha256. Returns the manifest."""
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors.index.json" not in names and "config.json" not in names
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for entry in manifest["shards"]:
        if entry["done"]:
            assert file_sha256(out / entry["file"]) == entry["sha256"], entry["file"]
    assert not verify_output(out).ok
    return manifest


def _resume_and_compare(config: Path, out: Path, clean: Path) -> None:
    assert main(_args(config, out) + ["--resume"]) == 0
    assert _files(out) == _files(clean)
    assert verify_output(out).ok


def test_sigkill_at_random_points_then_resume_is_bit_identical(setup, tmp_path):
    config, clean = setup
    points = sorted(random.Random(7).sample(range(2, 39), 3))  # 39 output tensors
    for k, after in enumerate(points):
        out = tmp_path / f"run{k}" / "out"
        proc = _start(config, out, f"after={after},signal=KILL")
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, err
        _assert_nothing_looks_complete(out)
        _resume_and_compare(config, out, clean)


def test_sigkill_from_outside_at_a_random_moment(setup, tmp_path):
    """The parent kills the merge at a random time while it writes (slowed down to ~1 s)."""
    config, clean = setup
    out = tmp_path / "out"
    proc = _start(config, out, "delay=0.03")
    deadline = time.monotonic() + 60
    while not (out / MANIFEST_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(11).uniform(0.1, 0.8))
    proc.kill()
    proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the merge finished before the kill")
    _assert_nothing_looks_complete(out)
    _resume_and_compare(config, out, clean)


@pytest.mark.parametrize(("name", "status"), [("TERM", 143), ("INT", 130)])
def test_sigterm_and_sigint_stop_cleanly_and_resume(setup, tmp_path, name, status):
    config, clean = setup
    out = tmp_path / "out"
    proc = _start(config, out, f"after=17,signal={name},delay=0.02")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert "interrupted" in err and "--resume" in err and "output shards are complete" in err
    manifest = _assert_nothing_looks_complete(out)
    assert not list(out.glob(".*.partial")), "a clean stop leaves no temporary file"
    done = [e["file"] for e in manifest["shards"] if e["done"]]
    assert 1 <= len(done) < 5  # stopped mid-merge, after the first shards were complete
    assert f"{len(done)} of 5 output shards are complete" in err
    _resume_and_compare(config, out, clean)


def test_disk_full_midway_keeps_completed_shards(setup, tmp_path, monkeypatch, capsys):
    config, clean = setup
    out = tmp_path / "out"
    monkeypatch.setenv(ENV_VAR, "after=30,errno=ENOSPC")
    assert main(_args(config, out)) == 1
    err = capsys.readouterr().err
    # a real ENOSPC from the kernel (/dev/full) in the writer's own pwrite
    assert "No space left on device" in err and "model.layers.3" in err
    assert "model-00004-of-00005.safetensors" in err
    assert "--resume" in err
    manifest = _assert_nothing_looks_complete(out)
    assert not list(out.glob(".*.partial"))
    assert any(e["done"] for e in manifest["shards"])
    monkeypatch.delenv(ENV_VAR)
    _resume_and_compare(config, out, clean)


def test_resume_redoes_a_shard_whose_bytes_changed(setup, tmp_path, capsys):
    config, clean = setup
    out = tmp_path / "out"
    assert main(_args(config, out)) == 0
    shard = out / "model-00002-of-00005.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert not verify_output(out).ok
    capsys.readouterr()
    assert main(["merge", str(config), str(out), "--out-shard-size", SHARD_SIZE,
                 "--random-seed", SEED, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "model-00002-of-00005.safetensors is merged again" in err
    assert _files(out) == _files(clean)


def test_resume_refuses_the_output_of_another_merge(setup, tmp_path, capsys):
    config, _ = setup
    out = tmp_path / "out"
    assert main(_args(config, out)) == 0
    before = _files(out)
    other = tmp_path / "other.yml"
    cfg = yaml.safe_load(config.read_text())
    cfg["models"][0]["parameters"]["weight"] = 0.9
    other.write_text(yaml.safe_dump(cfg))
    assert main(_args(other, out) + ["--resume"]) == 1
    err = capsys.readouterr().err
    assert "different merge" in err and "--overwrite" in err
    # the refusal says what differs from the interrupted run
    assert "what changed: the output tensors, their inputs, methods and parameters changed" in err
    assert main(["merge", str(config), str(out), "--quiet", "--out-shard-size", "200K",
                 "--random-seed", SEED, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "different merge" in err
    assert f"--out-shard-size was {parse_size(SHARD_SIZE)}, now 200000" in err
    assert _files(out) == before
    # an input file modified since
    model_file = next(Path(cfg["models"][0]["model"]).glob("*.safetensors"))
    times = (model_file.stat().st_atime_ns, model_file.stat().st_mtime_ns)
    os.utime(model_file, ns=(times[0], times[1] + 10**9))
    try:
        assert main(_args(config, out) + ["--resume"]) == 1
    finally:
        os.utime(model_file, ns=times)  # the family is shared with the other tests
    assert f"input {str(model_file.resolve())!r} was modified since" in capsys.readouterr().err


def test_resume_refuses_a_directory_without_manifest_and_starts_an_empty_one(setup, tmp_path,
                                                                           capsys):
    config, clean = setup
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(_args(config, foreign) + ["--resume"]) == 1
    assert "no .mergecore-manifest.json" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    fresh = tmp_path / "fresh" / "out"
    assert main(_args(config, fresh) + ["--resume"]) == 0
    assert _files(fresh) == _files(clean)


def test_overwrite_and_resume_exclude_each_other(setup, tmp_path, capsys):
    config, _ = setup
    with pytest.raises(SystemExit):
        main(_args(config, tmp_path / "out") + ["--resume", "--overwrite"])
    assert "not allowed with" in capsys.readouterr().err


def test_lora_input_disk_full_then_resume(small_family, tmp_path, monkeypatch):
    """A model given as ``path+adapter``: resumed output equals a clean run; touching the
    adapter afterwards makes --resume refuse the directory (the adapter is fingerprinted)."""
    from mergecore.synthetic import make_lora_adapter

    base, ft1, ft2 = small_family
    adapter = make_lora_adapter(base, tmp_path / "adapter", seed=5)
    cfg = {"merge_method": "task_arithmetic", "base_model": base,
           "models": [{"model": f"{ft1}+{adapter}", "parameters": {"weight": 1.0}},
                      {"model": ft2, "parameters": {"weight": 0.5}}]}
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(cfg))
    clean, out = tmp_path / "a" / "out", tmp_path / "b" / "out"
    assert main(_args(config, clean)) == 0
    monkeypatch.setenv(ENV_VAR, "after=20,errno=ENOSPC")
    assert main(_args(config, out)) == 1
    monkeypatch.delenv(ENV_VAR)
    _assert_nothing_looks_complete(out)
    weights = adapter / "adapter_model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert main(_args(config, out) + ["--resume"]) == 1
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _resume_and_compare(config, out, clean)


def _fail_on_rename_to(monkeypatch, target: str, fault: BaseException) -> None:
    """``os.replace`` onto a file named ``target`` raises ``fault`` (its temporary file has
    been written in full: a stop or a full disk right before the rename)."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == target:
            raise fault
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _fail_copying(monkeypatch, target: str, fault: BaseException) -> None:
    """Copying a file named ``target`` writes half of it, then raises ``fault``."""
    import shutil

    real = shutil.copyfileobj

    def copyfileobj(src, dst, *args, **kwargs):
        if Path(src.name).name == target:
            data = src.read()
            dst.write(data[: len(data) // 2])
            dst.flush()
            raise fault
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfileobj", copyfileobj)


ENOSPC_ERROR = OSError(28, "No space left on device")


@pytest.mark.parametrize(("inject", "target", "fault", "status"), [
    (_fail_copying, "tokenizer.json", ENOSPC_ERROR, 1),
    (_fail_copying, "tokenizer_config.json", KeyboardInterrupt(), 130),
    (_fail_on_rename_to, "config.json", KeyboardInterrupt(), 130),
    (_fail_on_rename_to, "README.md", ENOSPC_ERROR, 1),
    (_fail_on_rename_to, "model.safetensors.index.json", KeyboardInterrupt(), 130),
    (_fail_on_rename_to, "model.safetensors.index.json", ENOSPC_ERROR, 1),
], ids=["tokenizer-enospc", "tokenizer-sigint", "config-sigint", "card-enospc",
        "index-sigint", "index-enospc"])
def test_a_stop_while_the_side_files_are_written_keeps_only_the_shards(
        setup, tmp_path, monkeypatch, capsys, inject, target, fault, status):
    """A full disk or Ctrl-C after the last shard, while config.json, the tokenizer, the
    card or the index are written: no truncated file under a final name, no temporary file,
    nothing but the completed shards and the manifest; --resume then finishes the output."""
    config, clean = setup
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        inject(patch, target, fault)
        assert main(_args(config, out)) == status
    err = capsys.readouterr().err
    assert "5 of 5 output shards are complete" in err
    manifest = _assert_nothing_looks_complete(out)
    kept = {e["file"] for e in manifest["shards"]} | {MANIFEST_NAME}
    assert {p.name for p in out.iterdir()} == kept
    _resume_and_compare(config, out, clean)


def test_a_stop_while_the_chat_template_is_written_keeps_only_the_shards(
        setup, tmp_path, monkeypatch):
    """The config's chat template is written into the copied tokenizer through temporary
    names too: a full disk there leaves nothing but the shards and the manifest."""
    config, _ = setup
    cfg = yaml.safe_load(config.read_text())
    cfg["chat_template"] = "chatml"
    templated = tmp_path / "c.yml"
    templated.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _fail_on_rename_to(patch, "chat_template.jinja", ENOSPC_ERROR)
        assert main(_args(templated, out)) == 1
    manifest = _assert_nothing_looks_complete(out)
    assert {p.name for p in out.iterdir()} == {e["file"] for e in manifest["shards"]} | {
        MANIFEST_NAME}


def test_an_interruption_while_waiting_for_the_writer_stops_every_stage_thread(
        setup, tmp_path):
    """Ctrl-C (or SIGTERM) raised while the main thread waits for the writer stage: the
    stages are stopped and joined before the interruption propagates. A worker left running
    as a daemon thread inside a C++ call aborted the process at exit ('terminate called
    without an active exception', exit -6 instead of 143)."""
    import threading

    from mergecore.config import load_merge
    from mergecore.io import StreamingWriter, TensorReader, plan_shards
    from mergecore.pipeline import MergePipeline, PipelineOptions

    config, _ = setup
    plan = load_merge(config)
    shards = plan_shards([(t.name, t.out_dtype, tuple(t.shape)) for t in plan.tensors], 1 << 30)
    main_id = threading.main_thread().ident

    class WaitingWriter:
        """Interrupts the main thread once it waits in Thread.join, then keeps writing."""

        def __init__(self, inner):
            self.inner, self.fired, self.calls_done = inner, False, 0

        def write(self, name, data):
            if not self.fired:
                self.fired = True
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    frame = sys._current_frames().get(main_id)
                    names = set()
                    while frame is not None:
                        names.add(frame.f_code.co_name)
                        frame = frame.f_back
                    if "_join_stages" in names or "join" in names:
                        break
                    time.sleep(0.005)
                signal.pthread_kill(main_id, signal.SIGINT)  # wakes the blocked wait
                time.sleep(1.0)  # still busy when the interruption arrives
            self.inner.write(name, data)
            self.calls_done += 1

    with TensorReader() as reader:
        writer = StreamingWriter(tmp_path / "out", shards)
        waiting = WaitingWriter(writer)
        with pytest.raises(KeyboardInterrupt):
            MergePipeline(plan, reader, waiting, PipelineOptions()).run()
        # the writer stage got to the end of its work before the interruption came out (its
        # thread cannot be asked: Python 3.11 marks a thread whose join was interrupted as
        # stopped); the stage was told to stop, so it wrote less than the whole plan
        finished = waiting.calls_done
        writer.abort()
    assert 1 <= finished < len(plan.tensors)


def test_a_second_interruption_ends_the_wait_for_a_stuck_stage(setup, tmp_path):
    """A stage that does not stop (here a writer blocked on an event) cannot hold the run:
    the second Ctrl-C ends the wait and the first interruption propagates."""
    import threading

    from mergecore.config import load_merge
    from mergecore.io import StreamingWriter, TensorReader, plan_shards
    from mergecore.pipeline import MergePipeline, PipelineOptions

    config, _ = setup
    plan = load_merge(config)
    shards = plan_shards([(t.name, t.out_dtype, tuple(t.shape)) for t in plan.tensors], 1 << 30)
    main_id = threading.main_thread().ident
    release = threading.Event()

    class StuckWriter:
        def __init__(self, inner):
            self.inner, self.fired = inner, False

        def write(self, name, data):
            if not self.fired:
                self.fired = True
                for _ in range(2):  # two Ctrl-C, the second while the run waits for us
                    time.sleep(0.3)
                    signal.pthread_kill(main_id, signal.SIGINT)
                release.wait(60)
            self.inner.write(name, data)

    with TensorReader() as reader:
        writer = StreamingWriter(tmp_path / "out", shards)
        start = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                MergePipeline(plan, reader, StuckWriter(writer), PipelineOptions()).run()
            assert time.monotonic() - start < 20
        finally:
            release.set()
            time.sleep(0.2)
            writer.abort()


def test_verify_fails_a_one_shard_output_stopped_before_it_was_finalized(
        setup, tmp_path, monkeypatch, capsys):
    """One shard (most models up to a few GB): a stop after the shard is complete and before
    the side files are recorded left an output that verify passed, since the only shard
    existed; the manifest now says whether the output was finalized."""
    from mergecore import output_files

    config, _ = setup
    out = tmp_path / "out"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(output_files, "write_model_card", stopped)
        assert main(["merge", str(config), str(out), "--quiet", "--out-shard-size", "0",
                     "--random-seed", SEED]) == 130
    capsys.readouterr()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True and manifest["finalized"] is False
    report = verify_output(out)
    assert not report.ok
    assert any("not finalized" in p for p in report.problems)
    assert any("--resume" in text for kind, text in report.lines if kind == "hint")
    assert main(["merge", str(config), str(out), "--quiet", "--out-shard-size", "0",
                 "--random-seed", SEED, "--resume"]) == 0
    report = verify_output(out)
    assert report.ok, report.problems
    assert json.loads((out / MANIFEST_NAME).read_text())["finalized"] is True
