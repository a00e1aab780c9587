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
    # an earlier merge output (as mergekit writes it: .bin weights, config, card), and the
    # temporary files of an interrupted mergecore merge
    for name in ("pytorch_model.bin", "config.json", "README.md", "tokenizer.json",
                 ".config.json.partial", ".model-00001-of-00002.safetensors.partial"):
        (out / name).write_text("earlier")
    assert main(["merge", str(cfg), str(out), "--quiet"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (out / "pytorch_model.bin").exists()
    assert main(["merge", str(cfg), str(out), "--quiet", "--overwrite"]) == 0
    assert (out / "model.safetensors").exists() and not (out / "pytorch_model.bin").exists()


def test_overwrite_never_deletes_what_no_merge_writes(tmp_path, family, capsys):
    cfg = _config(tmp_path, _ties(*family))
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "todo.txt").write_text("user data")
    (out / "keep.txt").write_text("user data")
    (out / "model.safetensors").write_text("an earlier merge")
    assert main(["merge", str(cfg), str(out), "--quiet", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "also holds 2 entries no merge writes (keep.txt, notes/)" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "model.safetensors", "notes"]
    assert (out / "notes" / "todo.txt").read_text() == "user data"


def test_a_config_inside_the_output_directory_is_not_deleted(tmp_path, family, capsys):
    out = tmp_path / "out"
    out.mkdir()
    cfg = _config(out, _ties(*family))
    assert main(["merge", str(cfg), str(out), "--quiet", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert f"the config file {str(cfg)!r} is inside the output directory" in err
    assert cfg.exists()
    # re-running a merge from the YAML it saved in its output is fine: it writes it back
    assert main(["merge", str(cfg), str(tmp_path / "first"), "--quiet"]) == 0
    saved = tmp_path / "first" / "mergekit_config.yml"
    text = saved.read_text()
    assert main(["merge", str(saved), str(tmp_path / "first"), "--quiet", "--overwrite"]) == 0
    assert saved.read_text() == text


def test_config_errors_are_all_listed_before_any_output(tmp_path, family, capsys, monkeypatch):
    """...and before any tensor data is read: the reader refuses to read in this test."""
    from mergecore.io.reader import TensorReader

    def no_reading(*_args, **_kwargs):
        raise AssertionError("tensor data was read before the config was checked")

    monkeypatch.setattr(TensorReader, "read_into", no_reading)
    monkeypatch.setattr(TensorReader, "read_tensor", no_reading)
    base, ft1, _ = family
    cfg = _config(tmp_path, {"merge_method": "ties", "base_model": base,
                             "slices": [{"sources": [
                                 {"model": base, "layer_range": [0, 2]},
                                 {"model": ft1, "layer_range": [0, 99],
                                  "parameters": {"density": 0.5}},
                                 {"model": str(tmp_path / "missing-model"),
                                  "layer_range": [0, 2]}]}],
                             "paramters": {}})
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "paramters" in err and "missing-model" in err and "weight" in err
    assert "layer_range spans 2, 99, 2" in err, err
    assert "missing-model' does not exist" in err, err
    assert "tensor data was read" not in err
    assert not (tmp_path / "out").exists()


def test_yaml_problems_and_header_problems_come_in_one_error(tmp_path, family, capsys):
    """A typo in the YAML does not hide what the headers show (other shapes, a layer_range
    past the end): one run lists both, still before any output exists."""
    base, ft1, _ = family
    other = make_family(tmp_path / "wide", n_models=1, hidden=96, layers=2)[0]
    cfg = _config(tmp_path, {"merge_method": "ties", "base_model": base,
                             "models": [{"model": ft1, "parameters": {"weight": 1.0,
                                                                      "density": 0.5}},
                                        {"model": str(other),
                                         "parameters": {"weight": 1.0, "density": 0.5}}],
                             "dtpye": "bfloat16"})
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "dtpye" in err, err
    assert "shapes differ between the reference model" in err and "96" in err, err
    assert not (tmp_path / "out").exists()

    cfg = _config(tmp_path, {"merge_method": "slerp", "base_model": base,
                             "slices": [{"sources": [{"model": base, "layer_range": [0, 3]},
                                                     {"model": ft1, "layer_range": [0, 3]}]}],
                             "parameters": {"t": 0.5}, "tokenizer_sorce": "base"})
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "tokenizer_sorce" in err, err
    assert "slices[0].sources[0].layer_range: [0, 3) is out of bounds" in err, err
    assert "slices[0].sources[1].layer_range: [0, 3) is out of bounds" in err, err


@pytest.mark.parametrize("flag,value", [("--max-memory", "0"), ("--max-memory", "-5"),
                                        ("--max-memory", "2XB"), ("--out-shard-size", "-5"),
                                        ("--out-shard-size", "lots"), ("-j", "0"),
                                        ("--num-threads", "-2"), ("-j", "two")])
def test_a_bad_size_or_count_is_a_usage_error_naming_the_flag(tmp_path, family, capsys, flag,
                                                              value):
    cfg = _config(tmp_path, _ties(*family))
    with pytest.raises(SystemExit) as stop:
        main(["merge", str(cfg), str(tmp_path / "out"), flag, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "parse_size" not in err
    assert not (tmp_path / "out").exists()


def test_version(capsys):
    import mergecore

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == (
        f"mergecore {mergecore.__version__}")


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_a_config_path_that_is_not_a_file_is_named(tmp_path, capsys, what):
    path = tmp_path / "c.yml"
    if what == "directory":
        path.mkdir()
    assert main(["merge", str(path), str(tmp_path / "out")]) == 1
    expected = "does not exist" if what == "missing" else "is a directory"
    assert f"config file {str(path)!r} {expected}" in capsys.readouterr().err


def test_ignored_parameter_is_warned_once_with_a_suggestion(tmp_path, family, capsys):
    cfg = _ties(*family)
    cfg["models"][0]["parameters"] = {"weight": 1.0, "densty": 0.5}
    path = _config(tmp_path, cfg)
    assert main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("has no parameter 'densty'") == 1 and "did you mean 'density'?" in err
    assert main(["merge", str(path), str(tmp_path / "dry"), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("has no parameter 'densty'") == 1


def test_a_budget_below_one_tensor_is_warned_before_the_merge(tmp_path, family, capsys):
    cfg = _config(tmp_path, _ties(*family))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet", "--max-memory", "10KB"]) == 0
    assert "--max-memory 9.8 KiB is below the" in capsys.readouterr().err
    assert main(["merge", str(cfg), str(tmp_path / "ok"), "--quiet", "--max-memory", "1GiB"]) == 0
    assert "below" not in capsys.readouterr().err


def test_verbose_dry_run_shows_each_tensor_resolved_parameters(tmp_path, family, capsys):
    base, ft1, _ = family
    cfg = {"merge_method": "slerp", "base_model": base,
           "slices": [{"sources": [{"model": base, "layer_range": [0, 2]},
                                   {"model": ft1, "layer_range": [0, 2]}]}],
           "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5]},
                                {"value": 0.3}]}}
    path = _config(tmp_path, cfg)
    assert main(["merge", str(path), str(tmp_path / "out"), "--dry-run", "-v"]) == 0
    lines = capsys.readouterr().out.splitlines()

    def line(name):
        return next(x for x in lines if x.strip().startswith(name + " "))

    assert "<- slerp[t=0](" in line("model.layers.0.self_attn.q_proj.weight")
    assert "<- slerp[t=0.5](" in line("model.layers.1.self_attn.q_proj.weight")
    assert "<- slerp[t=0.3](" in line("model.layers.1.mlp.up_proj.weight")


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


def test_out_shard_size_zero_means_one_shard_as_in_mergekit(tmp_path, family):
    cfg = _config(tmp_path, _ties(*family))
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--out-shard-size", "0", "--quiet"]) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    # and a small size cuts, so the zero above was not a no-op
    assert main(["merge", str(cfg), str(tmp_path / "cut"), "--out-shard-size", "1", "-q"]) == 0
    assert len(list((tmp_path / "cut").glob("*.safetensors"))) > 1


@pytest.mark.parametrize("flags,expected", [
    ([], ("cpu", None)),
    (["--cuda"], ("cuda", "--cuda")),
    (["--gpu-rich"], ("cuda", "--gpu-rich")),
    (["--multi-gpu"], ("cuda", "--multi-gpu")),
    (["--cuda", "--device", "cpu"], ("cpu", None)),  # --device wins, as in mergekit
    (["--gpu-rich", "--device", "cuda:1"], ("cuda:1", None)),
    (["--cuda", "--no-cuda"], ("cpu", None)),
    (["--device", "auto"], None),
])
def test_device_flags_resolve_as_in_mergekit(flags, expected):
    import torch

    from mergecore.cli import build_parser
    from mergecore.devices import resolve_device

    args = build_parser(bench=False).parse_args(["merge", "c.yml", "out", *flags])
    got = resolve_device(device=args.device, cuda=args.cuda, gpu_rich=args.gpu_rich,
                         multi_gpu=args.multi_gpu)
    if expected is None:  # auto: the GPU when torch sees one
        expected = ("cuda" if torch.cuda.is_available() else "cpu", "--device auto")
    assert got == expected


def test_cuda_with_device_cpu_merges_on_the_cpu(tmp_path, family):
    cfg = _config(tmp_path, _ties(*family))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--cuda", "--device", "cpu",
                 "--quiet"]) == 0
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


def test_resuming_a_complete_output_says_so(tmp_path, family, capsys):
    cfg = _config(tmp_path, _ties(*family))
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["merge", str(cfg), str(out), "--resume"]) == 0
    assert "nothing left to merge" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys\n"
        "from mergecore.cli import main\n"
        "for argv in (['--version'], ['--help'], ['merge', '--help'], ['verify', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as stop:\n"
        "        assert stop.code == 0, (argv, stop.code)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
    assert "bench" in out and "measure roofs" in out  # the command list still shows bench


def test_model_card_states_the_merge_and_no_write_model_card_omits_it(tmp_path, family):
    base, ft1, ft2 = family
    cfg = _config(tmp_path, _ties(base, ft1, ft2))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 0
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "- Method: **ties**" in card and f"- Base model: `{base}`" in card
    assert f"`{ft1}`" in card and f"`{ft2}`" in card
    assert cfg.read_text() in card  # the YAML as the user wrote it
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == cfg.read_text()
    assert main(["merge", str(cfg), str(tmp_path / "plain"), "--quiet",
                 "--no-write-model-card"]) == 0
    assert not (tmp_path / "plain" / "README.md").exists()
    assert (tmp_path / "plain" / "mergekit_config.yml").exists()


def test_merge_progress_bar_on_a_terminal_only(tmp_path, family, run_in_terminal):
    """On a terminal the merge shows a bar with bytes, GB/s and ETA; --quiet hides it; with
    output to a pipe or file there are no bar redraws in the log."""
    cfg = _config(tmp_path, _ties(*family))
    shown = run_in_terminal(["merge", str(cfg), str(tmp_path / "a")])
    assert "merging" in shown and "B/s" in shown and "100%" in shown, shown
    quiet = run_in_terminal(["merge", str(cfg), str(tmp_path / "b"), "--quiet"])
    assert "merging" not in quiet and "B/s" not in quiet, quiet
    piped = subprocess.run([sys.executable, "-m", "mergecore", "merge", str(cfg),
                            str(tmp_path / "c")], capture_output=True, text=True, check=True)
    assert "\r" not in piped.stderr + piped.stdout and "merging:" not in piped.stderr
