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


@pytest.mark.parametrize("size", ["0", "-5", "2XB"])
def test_a_bad_max_memory_is_a_usage_error_naming_the_flag(tmp_path, family, capsys, size):
    cfg = _config(tmp_path, _ties(*family))
    with pytest.raises(SystemExit) as stop:
        main(["merge", str(cfg), str(tmp_path / "out"), "--max-memory", size])
    assert stop.value.code == 2
    assert "--max-memory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_verbose_merge_reports_the_budget(tmp_path, family, capsys):
    cfg = _config(tmp_path, _ties(*family))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "-v", "--max-memory", "3MiB"]) == 0
    assert "of a 3.0 MiB budget" in capsys.readouterr().out


def _mergekit_command_lines():
    """Every option of mergekit-yaml (read from its click command), each as the argument list
    a user would type: switches and their --no- forms alone, options with a value."""
    click = pytest.importorskip("click")
    run_yaml = pytest.importorskip("mergekit.scripts.run_yaml")
    values = {click.INT: "2", click.STRING: "x"}
    lines = []
    for param in run_yaml.main.params:
        if not isinstance(param, click.Option):
            continue
        if param.is_flag or param.count:
            lines += [[opt] for opt in param.opts + param.secondary_opts]
        else:
            lines += [[opt, values.get(param.type, "1B")] for opt in param.opts]
    return lines


def test_every_mergekit_yaml_option_is_accepted(tmp_path, family):
    """A mergekit-yaml command line works unchanged with `mergecore merge`: every option
    mergekit 0.1.5 defines parses (no usage error)."""
    from mergecore.cli import build_parser

    lines = _mergekit_command_lines()
    assert len(lines) > 30
    parser = build_parser()
    for extra in lines:
        args = parser.parse_args(["merge", "c.yml", "out", *extra])
        assert args.command == "merge", extra


def test_a_typical_mergekit_command_line_merges(tmp_path, family):
    cfg = _config(tmp_path, _ties(*family))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--lazy-unpickle", "--allow-crimes",
                 "--out-shard-size", "1B", "--copy-tokenizer", "--low-cpu-memory",
                 "--write-threads", "2", "--no-cuda", "--quiet"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_no_safe_serialization_is_refused_before_anything_is_written(tmp_path, family, capsys):
    cfg = _config(tmp_path, _ties(*family))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--no-safe-serialization"]) == 1
    assert "safetensors only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_python_dash_m_entry_point(tmp_path, family):
    cfg = _config(tmp_path, _ties(*family))
    proc = subprocess.run([sys.executable, "-m", "mergecore", "merge", str(cfg),
                           str(tmp_path / "out"), "--quiet", "-j", "1"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "config.json").exists()
