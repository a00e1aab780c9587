"""`mergecore bench`: the quick run end to end, the projection, the up-front checks, and the
pytest-benchmark suites in bench/ in their quick mode (their numbers are not checked)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergecore.benchmark import e2e, kernels, projection
from mergecore.benchmark.shapes import model_bytes
from mergecore.cli import main

REPO = Path(__file__).resolve().parents[1]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _bench(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergecore", "bench", *args],
                          capture_output=True, text=True, timeout=300, check=False, **kw)


def test_quick_bench_vs_mergekit_writes_table_json_and_chart(tmp_path):
    out = tmp_path / "r.json"
    proc = _bench([str(tmp_path / "work"), "--quick", "--vs", "mergekit", "--json", str(out),
                   "--kernel-methods", "linear,ties,dare_ties"])
    assert proc.returncode == 0, proc.stderr
    for heading in ("Roofs", "Kernels", "End to end: ties", "whole command"):
        assert heading in proc.stdout
    result = json.loads(out.read_text())
    assert result["meta"]["shape"] == "tiny" and result["meta"]["device"] == "cpu"
    roofs = result["roofs"]
    for key in ("memcpy_gbps", "file_write_gbps", "file_read_cold_gbps", "file_read_warm_gbps"):
        assert _positive(roofs[key]), key
    for key in ("file_read_cold_cached_share", "file_read_warm_cached_share"):
        assert roofs[key] is None or 0.0 <= roofs[key] <= 1.0
    rows = result["kernels"]
    assert {(r["op"], r["impl"]) for r in rows} >= {
        ("ties", "mergecore-cpu"), ("ties", "torch-eager"), ("ties", "mergekit"),
        ("dare_ties", "mergecore-cpu")}
    assert {r["tensor"] for r in rows} == {"mlp", "attn"}
    for r in rows:
        assert _positive(r["gbps"]) and _positive(r["roof_share"])
        for key in ("speedup_vs_torch_eager", "speedup_vs_mergekit"):
            if key in r:
                assert _positive(r[key]), (r, key)
    (run,) = result["e2e"]
    assert list(run["stages"]) == ["read", "compute", "write"]
    for st in run["stages"].values():
        assert _positive(st["seconds"]) and _positive(st["bytes"]) and _positive(st["gbps"])
        assert _positive(st["roof_gbps"])
    assert run["input_bytes"] == run["stages"]["read"]["bytes"]
    assert _positive(run["input_gbps"]) and run["bound_stage"] in run["stages"]
    assert 0.0 <= run["overlap_share"] < 1.0
    vs = run["vs_mergekit"]
    assert _positive(vs["speedup_vs_mergekit"]) and _positive(vs["mergekit_seconds"])
    assert _positive(vs["mergecore_peak_rss_bytes"])
    if importlib.util.find_spec("matplotlib"):
        assert Path(result["meta"]["chart"]).stat().st_size > 1000
    # the generated family and its YAML are removed (not --keep), the JSON stays
    assert not list((tmp_path / "work").glob("family-*"))
    assert not list((tmp_path / "work").glob("bench-*.yml"))
    assert run["models"] == 3 and run["pipeline_stats"]["finish"] > 0
    assert run["stages"]["write"]["seconds"] == pytest.approx(
        run["pipeline_stats"]["write_busy"] + run["pipeline_stats"]["finish"])


def test_direct_file_roofs_rewrite_and_read_the_file_through_o_direct(tmp_path):
    """The direct roofs move the file's bytes (the rewritten file holds the block's bytes, read
    back intact through the same path); the stage table takes the faster of the two roofs."""
    from mergecore.benchmark.e2e import stage_table
    from mergecore.benchmark.roofs import direct_file_roofs

    path = tmp_path / "roof.bin"
    path.write_bytes(bytes(3 * 8192 + 100))  # the tail past the last 4096 boundary stays
    block = torch.randint(0, 256, (8192,), dtype=torch.uint8)
    found = direct_file_roofs(path, block)
    if not found:
        pytest.skip("no O_DIRECT here (platform, file system or build)")
    assert _positive(found["file_write_direct_gbps"]) and _positive(found["file_read_direct_gbps"])
    data = path.read_bytes()
    assert len(data) == 3 * 8192 + 100
    assert data[:3 * 8192] == bytes(block.numpy()) * 3 and data[3 * 8192:] == bytes(100)
    stats = {"read_busy": 1.0, "bytes_read": 1e9, "compute_busy": 1.0, "bytes_written": 1e9,
             "write_busy": 1.0, "wall": 1.5}
    roofs = {"memcpy_gbps": 20.0, "file_read_cold_gbps": 1.5, "file_read_cold_cached_share": 0.0,
             "file_read_direct_gbps": 2.5, "file_write_gbps": 0.4, "file_write_direct_gbps": 0.3}
    stages = stage_table(stats, roofs, "cpu")["stages"]
    assert stages["read"]["roof_gbps"] == 2.5 and stages["write"]["roof_gbps"] == 0.4


def test_projection_check_runs_two_depths(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["bench", str(tmp_path), "--quick", "--project", "--project-layers", "8",
                 "--skip", "roofs,kernels", "--json", str(out), "--no-chart", "--quiet"]) == 0
    assert "Projected full merge: 8 layers" in capsys.readouterr().out
    result = json.loads(out.read_text())
    small, large = result["e2e"]
    assert (small["layers"], large["layers"]) == (2, 4)
    assert large["input_bytes"] > small["input_bytes"]
    chk = result["projection"]["check"]
    assert math.isfinite(chk["wall_relative_error"])
    assert chk["measured_wall_seconds"] == large["wall_seconds"]
    full = result["projection"]["full"]
    assert full["target_layers"] == 8 and full["from_layers"] == 4
    assert full["bound_stage"] in large["stages"] and _positive(full["wall_seconds"])


def _run(wall: float, read: float, compute: float, write: float, shape: str, layers: int) -> dict:
    b = model_bytes(shape, layers)
    stages = {"read": (read, 3 * b), "compute": (compute, 4 * b), "write": (write, b)}
    return {"wall_seconds": wall, "input_bytes": 3 * b, "bound_stage": "read",
            "stages": {n: {"seconds": t, "bytes": n_b, "gbps": n_b / t / 1e9}
                       for n, (t, n_b) in stages.items()}}


def test_projection_scales_stage_times_and_the_non_overlapped_time_not_fill_drain():
    shape = "llama-70b"
    run = _run(30.0, read=20.0, compute=12.0, write=6.0, shape=shape, layers=2)
    got = projection.project(run, shape, 2, 80)
    factor = model_bytes(shape, 80) / model_bytes(shape, 2)
    assert got["bytes_factor"] == pytest.approx(factor)
    assert got["stages"]["compute"]["seconds"] == pytest.approx(12.0 * factor)
    assert got["bound_stage"] == "read"
    # fill: read the 3 models' embeddings, merge them (3 in + 1 out); drain: merge the heads,
    # write one head; each at the run's stage rate
    b = model_bytes(shape, 2)
    emb = 32000 * 8192 * 2
    fill = 3 * emb / (3 * b / 20.0) + 4 * emb / (4 * b / 12.0)
    drain = 4 * emb / (4 * b / 12.0) + emb / (b / 6.0)
    assert got["fill_drain_seconds"] == pytest.approx(fill + drain)
    rest = 30.0 - 20.0 - (fill + drain)
    assert got["wall_seconds"] == pytest.approx(20.0 * factor + fill + drain + rest * factor)
    # a run whose stages overlapped perfectly projects to its slowest stage + fill/drain
    tight = _run(20.0 + fill + drain, read=20.0, compute=12.0, write=6.0, shape=shape, layers=2)
    assert projection.project(tight, shape, 2, 80)["wall_seconds"] == pytest.approx(
        20.0 * factor + fill + drain)
    # the check of a run against its own projection has no error
    large = dict(run, wall_seconds=projection.project(run, shape, 2, 4)["wall_seconds"])
    chk = projection.check(run, large, shape, 2, 4)
    assert chk["growth_relative_error"] == pytest.approx(0.0, abs=1e-12)


def test_disk_need_is_checked_before_anything_is_written(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "w"), "--shape", "llama-70b", "--layers", "100000",
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "not enough disk space" in err and str(tmp_path / "w") in err
    assert not (tmp_path / "w").exists()  # made for the run, removed with nothing in it
    (tmp_path / "given").mkdir()
    assert main(["bench", str(tmp_path / "given"), "--shape", "llama-70b", "--layers", "100000",
                 "--quiet"]) == 1
    assert not any((tmp_path / "given").iterdir())  # a DIR that existed stays


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", str(tmp_path), "--quick", "--device", "cuda", "--quiet"]) == 1
    assert "no CUDA device is available" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@requires_cuda
def test_quick_bench_on_cuda_has_transfer_roofs_and_stage(tmp_path):
    out = tmp_path / "c.json"
    proc = _bench([str(tmp_path), "--quick", "--device", "cuda", "--json", str(out),
                   "--kernel-methods", "ties"])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    for key in ("h2d_pinned_gbps", "d2h_pinned_gbps", "d2d_copy_gbps"):
        assert _positive(result["roofs"][key])
    stages = result["e2e"][0]["stages"]
    assert list(stages) == ["read", "transfer", "compute", "write"]
    assert _positive(stages["transfer"]["seconds"]) and _positive(stages["transfer"]["roof_gbps"])


def test_benchmark_suites_run_in_quick_mode(tmp_path):
    env = dict(os.environ, MERGECORE_BENCH_QUICK="1", MERGECORE_BENCH_RESULTS=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider",
                           "--benchmark-only"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for suite in ("kernels-suite", "e2e-suite"):
        rows = [json.loads(line) for line in (tmp_path / f"{suite}.jsonl").read_text().splitlines()]
        assert rows
        for row in rows:
            assert {"op", "backend", "shape", "dtype", "device", "commit", "date"} <= set(row)
            assert _positive(row["seconds"]) and _positive(row["gbps"])


@pytest.mark.parametrize("skip, bad", [("roof", "roof"), ("roofs,kernels,e2e,foo", "foo")])
def test_unknown_skip_part_is_a_usage_error_listing_the_parts(tmp_path, capsys, skip, bad):
    with pytest.raises(SystemExit) as exc:
        main(["bench", str(tmp_path), "--quick", "--skip", skip, "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"'{bad}'" in err and "roofs, kernels, e2e" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("mode", [["--quick"], []])
def test_unknown_shape_is_a_usage_error_in_every_mode(tmp_path, capsys, mode):
    with pytest.raises(SystemExit) as exc:
        main(["bench", str(tmp_path), "--shape", "llama-8b", *mode, "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'llama-8b'" in err and "llama-1b, llama-7b, llama-13b, llama-70b, tiny" in err
    assert not any(tmp_path.iterdir())


def test_no_chart_says_why_and_suggests_matplotlib_only_when_the_import_fails(
        tmp_path, capsys, monkeypatch):
    from mergecore.benchmark import report

    assert main(["bench", str(tmp_path), "--quick", "--skip", "roofs,kernels,e2e",
                 "--json", str(tmp_path / "r.json"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "(no chart: nothing measured end to end" in out and "pip install" not in out
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(report.NoChart, match="pip install matplotlib"):
        report.draw_chart({"e2e": [{"stages": {}}]}, tmp_path / "c.png")


def test_kernel_and_stage_tables_show_the_share_of_roof_as_the_same_percentage():
    from mergecore.benchmark import report

    meta = {"device_name": "cpu", "device": "cpu", "commit": "x", "torch": "2", "date": "d",
            "dir": "/w", "shape": "tiny", "dtype": "bfloat16"}
    kernel = {"tensor": "mlp", "op": "ties", "impl": "mergecore-cpu", "seconds": 1e-3,
              "gbps": 0.266, "roof_share": 0.0266}
    stage = {"seconds": 1.0, "bytes": 1e9, "gbps": 0.266, "roof": "memcpy", "roof_gbps": 10.0,
             "roof_share": 0.0266}
    run = {"method": "ties", "models": 3, "layers": 2, "input_bytes": 3e9, "output_bytes": 1e9,
           "stages": {"compute": stage}, "wall_seconds": 1.0, "stage_seconds_sum": 1.0,
           "overlapped_seconds": 0.0, "overlap_share": 0.0, "bound_stage": "compute",
           "input_gbps": 3.0}
    text = report.render({"meta": meta, "kernel_roof": "memcpy 10.0 GB/s", "kernels": [kernel],
                          "e2e": [run]})
    kernel_line = next(line for line in text.splitlines() if "mergecore-cpu" in line)
    stage_line = next(line for line in text.splitlines() if line.startswith("compute"))
    assert "2.7%" in kernel_line and "2.7%" in stage_line
    assert "0.0266" not in text and kernel["roof_share"] == 0.0266


@pytest.mark.parametrize("method", e2e.METHODS)
def test_every_end_to_end_method_config_merges(method, tmp_path, small_family):
    """`mergecore bench --method M` and bench/e2e.py merge the YAML ``merge_config`` writes;
    each one is a valid config of its method that merges every tensor."""
    import yaml

    cfg = e2e.merge_config(method, *small_family)
    assert cfg["merge_method"] == method
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("method", kernels.METHODS)
def test_torch_eager_baselines_compute_the_method(method):
    """The benchmark's torch-eager rows time a real implementation of each method: on
    continuous random data (no ties at the thresholds) it agrees with mergecore's kernel
    (DARE, whose mask comes from torch.rand, agrees in expectation: its mean over the
    tensor)."""
    base, xs = kernels.make_inputs((4099,), torch.float32, "cpu")
    eager = kernels.eager_fn(method, base, xs)
    assert eager is not None
    fn = kernels.mergecore_fn(method, base, xs, "cpu")
    fn()
    out = fn.output
    want = eager().reshape(out.shape)
    if method.startswith("dare"):
        delta_got, delta_want = (out - base).abs().mean(), (want - base).abs().mean()
        assert abs(float(delta_got / delta_want) - 1) < 0.15
    else:
        torch.testing.assert_close(want, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--io-size", "0"], "argument --io-size: a size must be positive"),
    (["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (["--project-layers", "-5"], "argument --project-layers: must be at least 1, got -5"),
    (["--dtype", "foo"], "argument --dtype: unknown dtype 'foo'"),
    (["--backends", "foo"], "--backends: unknown backend 'foo'"),
    (["--backends", "triton"], "--backends triton runs on a GPU"),
    (["--project", "--skip", "e2e"], "--project needs the end-to-end merges"),
    (["--project-layers", "9"], "--project-layers needs --project"),
    (["--project"], "the tiny preset's depth (2) is not deeper than the 4-layer run"),
    (["--json", "."], "is a directory; name a file"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_flags_that_would_be_ignored_or_fail_late_are_errors_before_any_work(
        tmp_path, capsys, args, message):
    work = tmp_path / "w"
    try:
        code = main(["bench", str(work), "--quick", "--quiet", *args])
    except SystemExit as exc:  # a usage error from argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err
    assert not work.exists() or not any(work.iterdir())


def test_a_file_as_dir_is_named(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert main(["bench", str(tmp_path / "f"), "--quick", "--quiet"]) == 1
    assert f"DIR {str(tmp_path / 'f')!r} is not a directory" in capsys.readouterr().err


def test_an_interrupted_generation_or_removal_never_leaves_a_family_that_looks_complete(
        tmp_path, monkeypatch):
    from mergecore import synthetic

    def partial(path, **kw):
        Path(path, "base").mkdir(parents=True)
        Path(path, "base", "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "make_bench_family", partial)
    with pytest.raises(KeyboardInterrupt):
        e2e.ensure_family(tmp_path, "tiny", 1)
    assert not e2e.family_dir(tmp_path, "tiny", 1).exists()

    family = e2e.family_dir(tmp_path, "tiny", 2)
    (family / "base").mkdir(parents=True)
    (family / "COMPLETE").write_text("")

    def stopped(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(e2e.shutil, "rmtree", stopped)
    with pytest.raises(KeyboardInterrupt):
        e2e.remove_family(family)
    assert not e2e.family_ready(family)  # the next run regenerates it


def test_the_json_is_written_even_when_the_chart_cannot_be(tmp_path):
    out = tmp_path / "r.json"
    proc = _bench([str(tmp_path / "w"), "--quick", "--skip", "roofs,kernels", "--json",
                   str(out), "--quiet"], env=dict(os.environ, MPLBACKEND="no-such-backend"))
    assert proc.returncode == 0, proc.stderr
    assert "(no chart:" in proc.stdout
    result = json.loads(out.read_text())
    assert result["meta"]["chart"] is None and result["e2e"][0]["models"] == 3


def test_progress_steps_count_only_the_parts_that_run():
    import argparse

    from mergecore.benchmark.command import _step_count, add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--quick", "--skip", "kernels,roofs", "--project",
                              "--project-layers", "8"])
    assert _step_count(args) == 4  # generate + merge, at two depths
    args = parser.parse_args(["bench", "--quick", "--skip", "e2e", "--kernel-methods", "linear"])
    assert _step_count(args) == 1 + 2  # roofs + one method at the two kernel shapes


@pytest.mark.parametrize("method,count", [("linear", 2), ("slerp", 2), ("ties", 3)])
def test_the_models_a_method_reads_are_counted(method, count, tmp_path):
    dirs = [tmp_path / n for n in e2e.MODEL_NAMES]
    assert e2e.models_read(method, dirs) == count
