"""Bad input gets a clear error naming the file, tensor or key, and leaves no output.

Covers what is checked before any tensor data is read (config, output directory, free disk
space, all problems at once), inputs that are truncated or corrupted (before the merge and
while it runs), NaN/Inf, and that the bytes written do not depend on threads or batching.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergecore.cli import main
from mergecore.config import load_merge
from mergecore.io import SafetensorsError, StreamingWriter, TensorReader, plan_shards
from mergecore.io.safetensors_format import read_header
from mergecore.merge import MergeOptions, run_plan
from mergecore.pipeline import MergePipeline, PipelineOptions

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("keep_thread_settings")


def _ties(base: str, ft1: str, ft2: str, **global_params) -> dict:
    cfg = {"merge_method": "ties", "base_model": base,
           "models": [{"model": ft1, "parameters": {"weight": 1.0, "density": 0.5}},
                      {"model": ft2, "parameters": {"weight": 0.5, "density": 0.5}}]}
    if global_params:
        cfg["parameters"] = global_params
    return cfg


def _write(path: Path, cfg: dict | str) -> Path:
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return path


def _copy_model(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ----- checked before any tensor data is read --------------------------------------------------


def test_config_and_output_problems_are_listed_together(tmp_path, small_family, capsys):
    base, ft1, _ = small_family
    cfg = _write(tmp_path / "c.yml", {"merge_method": "ties", "base_model": base,
                                      "models": [{"model": ft1},
                                                 {"model": str(tmp_path / "nope")}],
                                      "paramters": {}})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(cfg), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "nope" in err and "paramters" in err and "is not empty" in err
    assert _files(out) == {"keep.txt": b"mine"}


def test_output_holding_an_input_is_refused_even_with_overwrite(tmp_path, small_family, capsys):
    base, ft1, ft2 = small_family
    parent = tmp_path / "models"
    parent.mkdir()
    own_base = _copy_model(base, parent / "base")
    before = _files(Path(own_base))
    cfg = _write(tmp_path / "c.yml", _ties(own_base, ft1, ft2))
    for out in (parent, Path(own_base)):
        assert main(["merge", str(cfg), str(out), "--quiet", "--overwrite"]) == 1
        assert "holds the input model" in capsys.readouterr().err
    assert _files(Path(own_base)) == before


def test_dry_run_prints_the_plan_and_reports_output_problems(tmp_path, small_family, capsys):
    cfg = _write(tmp_path / "c.yml", _ties(*small_family))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(cfg), str(out), "--dry-run"]) == 1
    captured = capsys.readouterr()
    assert "output tensors: 39" in captured.out and "is not empty" in captured.err
    # --overwrite replaces only an earlier merge output; a dry run deletes nothing either way
    assert main(["merge", str(cfg), str(out), "--dry-run", "--overwrite"]) == 1
    assert "keep.txt" in capsys.readouterr().err
    (out / "keep.txt").unlink()
    (out / "model.safetensors").write_bytes(b"earlier")
    assert main(["merge", str(cfg), str(out), "--dry-run", "--overwrite"]) == 0
    assert _files(out) == {"model.safetensors": b"earlier"}


def test_output_path_that_is_a_file(tmp_path, small_family, capsys):
    cfg = _write(tmp_path / "c.yml", _ties(*small_family))
    (tmp_path / "out").write_text("x")
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 1
    assert "exists and is not a directory" in capsys.readouterr().err


def _device_error(flag: list[str]) -> str:
    """The error a device flag this machine cannot honour should produce."""
    import torch

    if flag == ["--device", "gpu"]:
        return "not a device"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return "CUDA device(s)"  # cuda:99 beyond the GPUs present


@pytest.mark.parametrize("flag", [["--cuda"], ["--gpu-rich"], ["--multi-gpu"],
                                  ["--device", "cuda:99"], ["--device", "gpu"]],
                         ids=["cuda", "gpu-rich", "multi-gpu", "cuda99", "gpu"])
def test_unusable_device_is_refused_before_the_output_is_emptied(tmp_path, small_family, capsys,
                                                                 flag):
    import torch

    if len(flag) == 1 and torch.cuda.is_available():
        pytest.skip(f"this machine has a GPU: {flag[0]} is usable here")
    cfg = _write(tmp_path / "c.yml", _ties(*small_family))
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier-result.txt").write_text("keep me")
    assert main(["merge", str(cfg), str(out), "--overwrite", "--quiet", *flag]) == 1
    err = capsys.readouterr().err
    assert _device_error(flag) in err and flag[-1].removeprefix("--") in err
    assert err.startswith(f"mergecore: error: {' '.join(flag)}: "), err  # the flag as typed
    if len(flag) == 1:  # a switch that means cuda: the advice names it
        assert f"drop {flag[0]}" in err and "--device" not in err
    assert _files(out) == {"earlier-result.txt": b"keep me"}


_SMALL_DISK = """
mount -t tmpfs -o size=256k tmpfs "$MNT" || exit 77
"$PY" -m mergecore merge "$CFG" "$MNT/out" --quiet
echo "RC=$?"
ls -A "$MNT"
"""


def test_not_enough_disk_space_is_found_before_reading(tmp_path, small_family):
    """A real 256 KiB tmpfs (private mount namespace; root only) for a ~420 KB output."""
    cfg = _write(tmp_path / "c.yml", _ties(*small_family))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, MNT=str(mnt), PY=sys.executable, CFG=str(cfg),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(["unshare", "-m", "sh", "-c", _SMALL_DISK], env=env, text=True,
                              capture_output=True, check=False, timeout=120)
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    if proc.returncode == 77 or proc.stderr.startswith("unshare"):
        pytest.skip(f"cannot mount a private tmpfs here: {proc.stderr.strip()[:200]}")
    assert "RC=1" in proc.stdout, proc.stderr
    assert "not enough free space for the output" in proc.stderr
    assert "are free" in proc.stderr and "bytes" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "RC=1"  # nothing was created in the mount


def test_the_space_check_counts_the_exact_size_of_every_shard_file(tmp_path, small_family):
    """The free-space check's shard sizes (headers included) are those of the files the
    merge then writes, byte for byte."""
    from mergecore.preflight import shard_file_bytes

    cfg = _write(tmp_path / "c.yml", _ties(*small_family))
    plan = load_merge(cfg)
    shards = plan_shards([(t.name, t.out_dtype, tuple(t.shape)) for t in plan.tensors], 100_000)
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--quiet", "--out-shard-size", "100000"]) == 0
    assert shard_file_bytes(shards) == {name: (out / name).stat().st_size
                                        for name in shards.weight_map.values()}


@pytest.mark.parametrize(("text", "expected"), [
    ("merge_method: ties\nmodels: [ {model: a\n", "yaml"),
    ({"merge_method": "tiez"}, "tiez"),
    ({"merge_method": "ties", "parameters": {"lambda": "x"}}, "parameters.lambda"),
    ({"merge_method": "ties", "slices": [{"sources": [{"model": "BASE",
                                                       "layer_range": [0, 99]}]}]},
     "layer_range"),
])
def test_malformed_configs_are_named_and_write_nothing(tmp_path, small_family, capsys, text,
                                                      expected):
    base, ft1, ft2 = small_family
    if isinstance(text, dict):
        cfg = dict(text)
        if "slices" not in cfg:
            cfg.update(base_model=base, models=[{"model": ft1, "parameters": {"weight": 1.0}},
                                                {"model": ft2, "parameters": {"weight": 1.0}}])
        else:
            cfg["slices"][0]["sources"][0]["model"] = base
            cfg["base_model"] = base
        text = yaml.safe_dump(cfg)
    path = _write(tmp_path / "c.yml", text)
    assert main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert expected in err.lower() and str(path) in err
    assert not (tmp_path / "out").exists()


def _retype(model_dir: str, dtypes: dict[str, object]) -> None:
    """Rewrite ``model_dir``'s weights with the named tensors converted to other dtypes."""
    from safetensors.torch import load_file, save_file

    path = Path(model_dir) / "model.safetensors"
    state = load_file(path)
    for name, dtype in dtypes.items():
        state[name] = state[name].to(dtype)
    save_file(state, path, metadata={"format": "pt"})


def test_float8_next_to_other_float_dtypes_is_a_named_problem(tmp_path, small_family, capsys):
    """A float8 input where the other models hold bf16 has no promoted output dtype: every
    such tensor is a problem naming it and the models' dtypes, all listed before anything
    is read (it was torch's unnamed promotion error), and ``dtype:`` resolves it."""
    import torch

    base, ft1, ft2 = small_family
    odd = _copy_model(ft2, tmp_path / "ft2")
    _retype(odd, {"model.norm.weight": torch.float8_e4m3fn,
                  "model.layers.1.mlp.up_proj.weight": torch.float8_e5m2})
    cfg = _ties(base, ft1, odd)
    path = _write(tmp_path / "c.yml", cfg)
    assert main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    for name, code in (("model.norm.weight", "F8_E4M3"),
                       ("model.layers.1.mlp.up_proj.weight", "F8_E5M2")):
        assert f"tensor {name!r}" in err and f"{odd!r}: {code}" in err
    assert "dtype" in err and "Promotion" not in err
    assert not (tmp_path / "out").exists()
    cfg["dtype"] = "bfloat16"
    assert main(["merge", str(_write(path, cfg)), str(tmp_path / "out"), "--quiet"]) == 0


def test_float8_models_merge_in_float32_and_need_an_output_dtype(tmp_path, small_family, capsys):
    """Every model holding a tensor in float8: without dtype/out_dtype the merge would write
    float8, which it does not (a named problem before anything is read); with ``out_dtype``
    the float8 values are merged as float32 (the result is the float64 formula of the float8
    values, rounded once)."""
    import torch
    from safetensors.torch import load_file

    name = "model.layers.0.mlp.down_proj.weight"
    dirs = [_copy_model(m, tmp_path / f"m{k}") for k, m in enumerate(small_family)]
    for d in dirs:
        _retype(d, {name: torch.float8_e4m3fn})
    cfg = _ties(*dirs)
    path = _write(tmp_path / "c.yml", cfg)
    assert main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"tensor {name!r}" in err and "float8 inputs (F8_E4M3)" in err
    assert not (tmp_path / "out").exists()
    cfg["out_dtype"] = "float32"
    cfg["merge_method"] = "task_arithmetic"
    for m in cfg["models"]:
        m["parameters"].pop("density")
    assert main(["merge", str(_write(path, cfg)), str(tmp_path / "out"), "--quiet"]) == 0
    got = load_file(tmp_path / "out" / "model.safetensors")[name]
    base, *fts = (load_file(Path(d) / "model.safetensors")[name].double() for d in dirs)
    weights = [m["parameters"]["weight"] for m in cfg["models"] if m["model"] != dirs[0]]
    want = base + sum(w * (x - base) for w, x in zip(weights, fts))
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6)


# ----- truncated and corrupted inputs ------------------------------------------------------------


def test_truncated_input_is_named_before_the_merge(tmp_path, small_family, capsys):
    base, ft1, ft2 = small_family
    broken = _copy_model(ft1, tmp_path / "ft1")
    weights = Path(broken) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    cfg = _write(tmp_path / "c.yml", _ties(base, broken, ft2))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert str(weights) in err
    assert not (tmp_path / "out").exists()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0.0, 0.999), which=st.sampled_from(["base", "ft1"]))
def test_input_truncated_during_the_merge_is_named(small_family, fraction, which):
    """The file is cut after the plan was made (a short read while merging): the error
    names file and tensor, and every file of the output is removed."""
    base, ft1, ft2 = small_family
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        own = {"base": base, "ft1": ft1}
        own[which] = _copy_model(own[which], tmp / which)
        plan = load_merge(_write(tmp / "c.yml", _ties(own["base"], own["ft1"], ft2)))
        weights = Path(own[which]) / "model.safetensors"
        infos, _ = read_header(weights)
        first = min(i.data_start for i in infos.values())
        cut = first + int(fraction * (weights.stat().st_size - first))
        os.truncate(weights, cut)
        hit = [i.name for i in infos.values() if i.data_start + i.nbytes > cut]
        out = tmp / "out"
        out.mkdir()
        with pytest.raises(SafetensorsError) as err:
            run_plan(plan, out, MergeOptions(quiet=True, out_shard_size=100_000))
        message = str(err.value)
        assert str(weights) in message and "truncated" in message
        assert any(repr(name) in message for name in hit)
        assert list(out.iterdir()) == []


def test_corrupted_input_bytes_are_named(tmp_path, small_family, capsys):
    """Bytes overwritten with 0xFF (bf16 NaN) inside one tensor of a fine-tune, merged by
    task arithmetic (the NaN reaches the output, which is checked)."""
    base, ft1, ft2 = small_family
    broken = _copy_model(ft1, tmp_path / "ft1")
    weights = Path(broken) / "model.safetensors"
    info = read_header(weights)[0]["model.layers.1.self_attn.k_proj.weight"]
    with open(weights, "r+b") as fh:
        fh.seek(info.data_start + 64)
        fh.write(b"\xff" * 32)
    cfg = _write(tmp_path / "c.yml", {
        "merge_method": "task_arithmetic", "base_model": base,
        "models": [{"model": broken, "parameters": {"weight": 1.0}},
                   {"model": ft2, "parameters": {"weight": 0.5}}]})
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "model.layers.1.self_attn.k_proj.weight" in err
    assert f"input {broken!r} has 16 NaN/Inf value(s) out of {info.numel}" in err, err
    assert str(weights) in err
    assert list((tmp_path / "out").iterdir()) == []


def test_non_finite_result_from_finite_inputs_is_named(tmp_path, small_family, capsys):
    base, ft1, ft2 = small_family
    cfg = {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
           "parameters": {"lambda": 1.0e39},
           "models": [{"model": ft1, "parameters": {"weight": 1.0}},
                      {"model": ft2, "parameters": {"weight": 0.5}}]}
    path = _write(tmp_path / "c.yml", cfg)
    assert main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "tensor 'model.embed_tokens.weight'" in err and "from finite inputs" in err
    assert list((tmp_path / "out").iterdir()) == []


# ----- determinism -------------------------------------------------------------------------------


def test_output_bytes_do_not_depend_on_threads_or_batching(tmp_path, small_family):
    base, ft1, ft2 = small_family
    cfg = {"merge_method": "dare_ties", "base_model": base,
           "models": [{"model": ft1, "parameters": {"weight": 1.0, "density": 0.4}},
                      {"model": ft2, "parameters": {"weight": 0.7, "density": 0.6}}]}
    path = _write(tmp_path / "c.yml", cfg)
    outs = []
    for threads in ("1", "2"):
        out = tmp_path / f"j{threads}" / "out"
        assert main(["merge", str(path), str(out), "--quiet", "-j", threads,
                     "--out-shard-size", "150K", "--random-seed", "5"]) == 0
        outs.append(_files(out))
    assert outs[0] == outs[1]
    # one tensor per kernel call instead of batches of up to 64, with a tight memory budget
    plan = load_merge(path)
    entries = [(t.name, t.out_dtype, tuple(t.shape)) for t in plan.tensors]
    shards = plan_shards(entries, 150_000)
    unbatched = tmp_path / "unbatched"
    with TensorReader() as reader:
        writer = StreamingWriter(unbatched, shards)
        MergePipeline(plan, reader, writer, PipelineOptions(
            random_seed=5, batch_tensors=1, max_memory=1 << 20)).run()
        writer.finalize()
    for spec in shards.shards:
        assert (unbatched / spec.filename).read_bytes() == outs[0][spec.filename]
