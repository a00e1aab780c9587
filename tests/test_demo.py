"""`mergecore demo`: both seed recipes run end to end on generated models and load."""

from __future__ import annotations

import subprocess
import sys

from safetensors import safe_open


def test_demo_runs_both_seed_recipes_and_the_outputs_load(tmp_path):
    # a relative DIR: the recipes it writes name the models by absolute paths
    proc = subprocess.run([sys.executable, "-m", "mergecore", "demo", "demo"], cwd=tmp_path,
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tmp_path = tmp_path / "demo"
    assert f"model: {tmp_path / 'models'}" in (tmp_path / "lzlv.yml").read_text()
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


def test_demo_refuses_a_directory_it_did_not_make_before_writing(tmp_path):
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "base" / "precious.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "mergecore", "demo", str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "is not empty and was not made by `mergecore demo`" in proc.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["base", "models", "precious.txt"]
