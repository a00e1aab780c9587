"""Interrupted multi-stage recipes resume: real SIGKILL / SIGTERM / ENOSPC, then --resume.

A three-document recipe (a seeded DARE-TIES stage, a SLERP stage, and a final SLERP gradient
of the two: every tensor of the output is a graph over all three inputs) runs in a real
``python -m mergecore merge`` subprocess (or in-process for the injected OS error) into
five shards. After the fault: nothing looks complete, and ``--resume`` gives files equal
byte for byte to an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mergecore.checksums import file_sha256
from mergecore.cli import main
from mergecore.faults import ENV_VAR
from mergecore.io.writer import MANIFEST_NAME
from mergecore.verify import verify_output

SHARD_SIZE = "100K"  # five shards for this family
pytestmark = pytest.mark.usefixtures("keep_thread_settings")


def recipe_docs(base: str, ft1: str, ft2: str, *, weight: float = 1.0) -> list[dict]:
    return [
        {"name": "d", "merge_method": "dare_ties", "base_model": base, "random_seed": 5,
         "models": [{"model": ft1, "parameters": {"weight": weight, "density": 0.5}},
                    {"model": ft2, "parameters": {"weight": 0.5, "density": 0.6}}]},
        {"name": "s", "merge_method": "slerp", "base_model": ft1,
         "models": [{"model": ft1}, {"model": ft2}], "parameters": {"t": 0.4}},
        {"merge_method": "slerp", "base_model": "d",
         "slices": [{"sources": [{"model": "d", "layer_range": [0, 4]},
                                 {"model": "s", "layer_range": [0, 4]}]}],
         "parameters": {"t": [0.2, 0.8]}},
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_family):
    """The recipe file and the output of an uninterrupted run (the reference)."""
    root = tmp_path_factory.mktemp("recipe_faults")
    recipe = root / "recipe.yml"
    recipe.write_text(yaml.safe_dump_all(recipe_docs(*small_family), sort_keys=False))
    clean = root / "clean" / "out"
    assert main(_args(recipe, clean)) == 0
    assert len(list(clean.glob("model-*.safetensors"))) == 5
    return recipe, clean


def _args(recipe: Path, out: Path) -> list[str]:
    return ["merge", str(recipe), str(out), "--quiet", "--out-shard-size", SHARD_SIZE]


def _run(recipe: Path, out: Path, fault: str, *extra: str, cwd: Path | None = None
         ) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{ENV_VAR: fault}) if fault else dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "mergecore", *_args(recipe, out), *extra],
                          env=env, capture_output=True, text=True, timeout=180, cwd=cwd,
                          check=False)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _assert_nothing_looks_complete(out: Path) -> list[str]:
    """No index or config.json; every shard the manifest calls done matches its sha256.
    Returns the shards recorded as done."""
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors.index.json" not in names and "config.json" not in names
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    done = [e["file"] for e in manifest["shards"] if e["done"]]
    for entry in manifest["shards"]:
        if entry["done"]:
            assert file_sha256(out / entry["file"]) == entry["sha256"], entry["file"]
    assert not verify_output(out).ok
    return done


def test_sigkill_mid_recipe_then_resume_from_another_directory_is_bit_identical(
        setup, tmp_path):
    """Killed mid-shard; resumed from another working directory (the fingerprint names
    stages, not paths made up relative to the cwd)."""
    recipe, clean = setup
    out = tmp_path / "out"
    proc = _run(recipe, out, "after=30,signal=KILL,delay=0.02")  # delay: finisher keeps up
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    done = _assert_nothing_looks_complete(out)
    assert 1 <= len(done) < 5
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _run(recipe, out, "", "--resume", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert _files(out) == _files(clean)
    assert verify_output(out).ok


def test_sigterm_keeps_shards_and_says_how_to_resume(setup, tmp_path):
    recipe, clean = setup
    out = tmp_path / "out"
    proc = _run(recipe, out, "after=17,signal=TERM,delay=0.02")
    assert proc.returncode == 143, proc.stderr
    assert "--resume" in proc.stderr and "output shards are complete" in proc.stderr
    done = _assert_nothing_looks_complete(out)
    assert not list(out.glob(".*.partial")), "a clean stop leaves no temporary file"
    assert f"{len(done)} of 5 output shards are complete" in proc.stderr
    assert main(_args(recipe, out) + ["--resume"]) == 0
    assert _files(out) == _files(clean)


def test_disk_full_then_resume_merges_only_the_missing_shards(setup, tmp_path, monkeypatch,
                                                               capsys):
    recipe, clean = setup
    out = tmp_path / "out"
    monkeypatch.setenv(ENV_VAR, "after=30,errno=ENOSPC")
    assert main(_args(recipe, out)) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err
    done = _assert_nothing_looks_complete(out)
    assert done
    kept = {name: (out / name).stat().st_mtime_ns for name in done}
    monkeypatch.delenv(ENV_VAR)
    assert main(["merge", str(recipe), str(out), "--out-shard-size", SHARD_SIZE,
                 "--resume"]) == 0
    assert f"resuming: {len(done)} of 5 shards verified and kept" in capsys.readouterr().err
    assert {name: (out / name).stat().st_mtime_ns for name in done} == kept  # not rewritten
    assert _files(out) == _files(clean)


def test_resume_refuses_a_changed_stage(setup, small_family, tmp_path, monkeypatch, capsys):
    """A parameter of an intermediate stage changed: --resume refuses the directory."""
    recipe, _ = setup
    out = tmp_path / "out"
    monkeypatch.setenv(ENV_VAR, "after=30,errno=ENOSPC")
    assert main(_args(recipe, out)) == 1
    monkeypatch.delenv(ENV_VAR)
    before = _files(out)
    changed = tmp_path / "changed.yml"
    changed.write_text(yaml.safe_dump_all(recipe_docs(*small_family, weight=0.9),
                                          sort_keys=False))
    capsys.readouterr()
    assert main(_args(changed, out) + ["--resume"]) == 1
    err = capsys.readouterr().err
    assert "different merge" in err and "--overwrite" in err
    assert _files(out) == before


def test_resume_and_keep_intermediates_exclude_each_other(setup, tmp_path, capsys):
    recipe, _ = setup
    assert main(_args(recipe, tmp_path / "out") + ["--resume", "--keep-intermediates",
                                                   str(tmp_path / "kept")]) != 0
    assert "--keep-intermediates" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "kept").exists()
