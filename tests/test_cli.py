"""The `mergecore` command: dry runs, refusal to clobber, errors listed before any read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mergecore.cli import main
from mergecore.synthetic import make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return [str(p) for p in make_family(root / "m", n_models=3, hidden=64, layers=2)]


def _config(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _ties(base, ft1, ft2):
    return {"merge_method": "ties", "base_model": base,
            "models": [{"model": ft1, "parameters": {"weight": 1.0, "density": 0.5}},
                       {"model": ft2, "parameters": {"weight": 0.5, "density": 0.5}}]}


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, family, capsys):
    cfg = _config(tmp_path, _ties(*family))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--dry-run",
                 "--out-shard-size", "200K"]) == 0
    text = capsys.readouterr().out
    assert "output tensors: 21" in text and "model-00001-of-" in text
    assert not (tmp_path / "out").exists()


def test_non_empty_output_directory_is_refused_without_overwrite(tmp_path, family, capsys):
    cfg = _config(tmp_path, _ties(*family))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["merge", str(cfg), str(out), "--quiet"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").exists()
    assert main(["merge", str(cfg), str(out), "--quiet", "--overwrite"]) == 0
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()


def test_config_errors_are_all_listed_before_any_output(tmp_path, family, capsys):
    base, ft1, _ = family
    cfg = _config(tmp_path, {"merge_method": "ties", "base_model": base,
                             "models": [{"model": ft1, "parameters": {"density": 0.5}},
                                        {"model": str(tmp_path / "missing-model")}],
                             "paramters": {}})
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "paramters" in err and "missing-model" in err and "weight" in err
    assert not (tmp_path / "out").exists()


def test_python_dash_m_entry_point(tmp_path, family):
    cfg = _config(tmp_path, _ties(*family))
    proc = subprocess.run([sys.executable, "-m", "mergecore", "merge", str(cfg),
                           str(tmp_path / "out"), "--quiet", "-j", "1"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "config.json").exists()
