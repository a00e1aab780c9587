"""Every script in bench/ still imports and parses its arguments (they are not run in CI)."""

from __future__ import annotations

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
