"""`mergecore demo`: both seed recipes run end to end on generated models and load."""

from __future__ import annotations

import subprocess
import sys

from safetensors import safe_open


def test_demo_runs_both_seed_recipes_and_the_outputs_load(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mergecore", "demo", str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("lzlv", "stheno"):
        out = tmp_path / f"merged-{name}"
        assert f"-> {out}" in proc.stdout
        assert (out / "mergekit_config.yml").read_text().count("---") >= 2  # the whole recipe
        with safe_open(str(out / "model.safetensors"), "pt") as merged, \
                safe_open(str(tmp_path / "models" / "ft2" / "model.safetensors"), "pt") as ft2:
            name0 = "model.layers.0.self_attn.q_proj.weight"
            assert merged.get_tensor(name0).shape == ft2.get_tensor(name0).shape
            assert not merged.get_tensor(name0).equal(ft2.get_tensor(name0))
    assert "yes (max |logit|" in proc.stdout and "LoRA adapters" in proc.stdout
