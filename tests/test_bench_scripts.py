"""Every script in bench/ still imports and parses its arguments; the history plot draws."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "bench").glob("*.py")
                 if not p.stem.startswith(("_", "test_", "conftest", "common")))


def test_the_list_of_scripts_is_not_empty():
    assert {"kernels", "e2e", "recipes", "integrations"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_help(script):
    proc = subprocess.run([sys.executable, "-m", f"bench.{script}", "--help"], cwd=ROOT,
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_plot_history_draws_script_and_suite_rows(tmp_path):
    """Rows of the bench scripts (method/impl, no date) and of the pytest-benchmark suites
    (op/backend/shape/dtype/device/date) both become series; quick rows are left out."""
    pytest.importorskip("matplotlib")
    from bench import plot_history

    script = [{"commit": c, "device": "cpu", "impl": "mergecore", "method": "ties",
               "params": "1b", "seconds": s} for c, s in (("aaa", 9.0), ("bbb", 8.0))]
    suite = [{"commit": "ccc", "date": "2026-11-23T10:00:00", "op": "linear", "backend": "cpu",
              "shape": [64], "dtype": "bfloat16", "device": "cpu", "gbps": g, "seconds": 1.0,
              "quick": q} for g, q in ((20.0, False), (99.0, True))]
    (tmp_path / "e2e-cpu.jsonl").write_text("\n".join(map(json.dumps, script)) + "\n")
    (tmp_path / "kernels-suite.jsonl").write_text("\n".join(map(json.dumps, suite)) + "\n")
    rows = plot_history.load(tmp_path, None)
    assert len(rows) == 3 and all(r["gbps"] != 99.0 for r in rows if "gbps" in r)
    lines = plot_history.series(rows, None, None)
    assert set(lines) == {("ties", "mergecore", "1b", "-", "cpu"),
                          ("linear", "cpu", "[64]", "bfloat16", "cpu")}
    out = tmp_path / "h.png"
    assert plot_history.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
