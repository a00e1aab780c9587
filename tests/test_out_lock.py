"""One merge at a time per output directory (mergecore.out_lock).

A real ``python -m mergecore merge`` subprocess, slowed down by the fault hook's delay, holds
its output directory while a second merge into the same directory (``--overwrite`` or
``--resume``) is started in-process: the second stops before touching anything, and the
first one's output comes out whole.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mergecore.cli import main
from mergecore.faults import ENV_VAR
from mergecore.io.writer import MANIFEST_NAME
from mergecore.out_lock import OutputLock, empty_directory
from mergecore.verify import verify_output

pytestmark = pytest.mark.usefixtures("keep_thread_settings")


@pytest.fixture(scope="module")
def config(tmp_path_factory, small_family) -> Path:
    base, ft1, ft2 = small_family
    path = tmp_path_factory.mktemp("lock") / "c.yml"
    path.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": base,
        "models": [{"model": ft1, "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": ft2, "parameters": {"weight": 0.5, "density": 0.7}}]}))
    return path


def _args(config: Path, out: Path) -> list[str]:
    return ["merge", str(config), str(out), "--quiet", "--out-shard-size", "100K"]


def _weights(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("model*"))}


def test_lock_is_exclusive_and_released(tmp_path):
    target = tmp_path / "out"
    first, second = OutputLock(target), OutputLock(target)
    assert not first.acquire() and not first.busy()  # nothing to lock yet
    target.mkdir()
    assert first.acquire() and first.held
    assert second.busy() and not second.held
    first.release()
    assert not second.busy() and second.held
    second.release()


def test_a_second_merge_into_a_directory_being_written_stops(config, tmp_path, capsys):
    out, clean = tmp_path / "out", tmp_path / "clean"
    assert main(_args(config, clean)) == 0
    env = dict(os.environ, **{ENV_VAR: "delay=0.05"})  # ~2 s of writing
    proc = subprocess.Popen([sys.executable, "-m", "mergecore", *_args(config, out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / MANIFEST_NAME).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (out / MANIFEST_NAME).exists()
        capsys.readouterr()
        for flag in ("--overwrite", "--resume"):
            assert main(_args(config, out) + [flag]) == 1
            err = capsys.readouterr().err
            assert "being written by another mergecore merge" in err, err
        assert proc.poll() is None, "the first merge finished before the check: slow it more"
    finally:
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert verify_output(out).ok
    assert _weights(out) == _weights(clean)
    # the lock went with the process: now --overwrite replaces the output
    inode = out.stat().st_ino
    assert main(_args(config, out) + ["--overwrite"]) == 0
    assert out.stat().st_ino == inode  # emptied in place, not replaced
    assert verify_output(out).ok


def test_empty_directory_keeps_the_directory(tmp_path):
    d = tmp_path / "d"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "sub" / "deeper" / "f").write_text("x")
    (d / "g").write_text("y")
    os.symlink(tmp_path, d / "link")  # a link is removed, not followed
    (tmp_path / "keep").write_text("z")
    empty_directory(d)
    assert d.is_dir() and not list(d.iterdir())
    assert (tmp_path / "keep").read_text() == "z"
