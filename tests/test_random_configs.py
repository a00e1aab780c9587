"""Random YAML configurations, merged end to end three ways: mergecore's C++ backend, its
float64 reference backend, and mergekit 0.1.5.

The configs (``mergecore.testing.random_configs``) mix every method with gradients, filter
conditionals, slices, per-model and top-level parameters, dtypes, out_dtypes and LoRA
inputs (``model+adapter``, two generated PEFT adapters), so the
whole path (planner, batching, fused CPU kernels, output dtypes, writer) is exercised on
combinations no hand-written test lists.

- C++ against the reference: the contract of docs/semantics.md, elementwise. bf16/fp16
  outputs: at least 99.9% of each tensor's elements within 1 ulp; every element (also of
  fp32 outputs, which carry the error of several fp32 roundings) within 1 ulp plus the
  fp32 error bound, scaled by the largest amplification the generator can draw, of the
  largest input magnitude of that tensor. A wrong kept entry or a wrong parameter is off
  by a share of a delta: far more.
- Against mergekit (not DARE: its random stream is mergekit's own): a check for gross
  errors only, in the coarser of the compute and output dtypes (fp32 read as bf16):
  mergekit rounds to bf16 after every operation and breaks TIES ties otherwise, so per
  tensor at least 50% and overall at least 90% of elements within 1 ulp. A misread
  parameter (a filter, a gradient, precedence) is off on most elements of its tensors.
- Against ``mergecore mergekit-yaml`` (mergekit's own YAML reading and planning, mergecore's
  kernels): per tensor at least 99% within 1 ulp in that coarser dtype, which finds a
  parameter read even slightly differently from mergekit.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mergecore.cli import main
from mergecore.numerics import ulp_diff
from mergecore.synthetic import make_family, make_lora_adapter
from mergecore.testing.mergekit_harness import compare_outputs, load_state, run_mergekit_batch
from mergecore.testing.random_configs import METHODS, random_config, random_recipe
from mergecore.testing.stages import stage_by_stage, write_recipe
from mergecore.verify import verify_output

LAYERS = 5
#: A longer sweep: MERGECORE_RANDOM_CONFIGS=200 MERGECORE_RANDOM_SEED=7 pytest this file.
N_CONFIGS = int(os.environ.get("MERGECORE_RANDOM_CONFIGS", str(2 * len(METHODS))))
SEED = int(os.environ.get("MERGECORE_RANDOM_SEED", "20261207"))
#: The largest |result| / |input| ratio random_config can draw: lambda 1.5 x (3 weights of at
#: most 1.2) / (a normalizing sum of at least 0.1), plus the base.
AMPLIFICATION = 1.5 * 3 * 1.2 / 0.1 + 1
FP32_ROUNDING = 3 * 2.0**-22


def _layer_free(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``mlp.up_proj.weight`` (slices move layers)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[i + 1:])
    return name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("random-configs")
    family = [str(p) for p in make_family(root / "family", n_models=4, hidden=48,
                                           layers=LAYERS, vocab=128, dtype="bfloat16")]
    adapters = [str(make_lora_adapter(family[0], root / "lora-qv")),
                str(make_lora_adapter(family[0], root / "lora-mlp", r=2, alpha=4, seed=1,
                                      target_modules=("gate_proj", "down_proj")))]
    rng = random.Random(SEED)
    cases = []
    for i in range(N_CONFIGS):
        cfg = random_config(rng, family[0], family[1:], LAYERS, method=METHODS[i % len(METHODS)],
                            adapters=adapters)
        work = root / f"case{i}"
        work.mkdir()
        (work / "config.yml").write_text(yaml.safe_dump(cfg))
        cases.append({"cfg": cfg, "work": work})
    magnitude: dict[str, float] = {}  # largest |input| per layer-free tensor name
    for model in family:  # a LoRA product adds ~1e-3: small next to the weights
        for name, t in load_state(model).items():
            key = _layer_free(name)
            magnitude[key] = max(magnitude.get(key, 0.0), float(t.float().abs().max()))
    run_mergekit_batch([(c["cfg"], c["work"] / "mergekit") for c in cases
                        if not c["cfg"]["merge_method"].startswith("dare")],
                       extra_args=["--lora-merge-cache", str(root / "mergekit-lora-cache")])
    for c in cases:
        c["magnitude"] = magnitude
    return cases


def _merge(case: dict, out: str, backend: str, monkeypatch) -> dict[str, torch.Tensor]:
    with monkeypatch.context() as patch:
        patch.setenv("MERGECORE_BACKEND", backend)
        assert main(["merge", str(case["work"] / "config.yml"), str(case["work"] / out),
                     "--quiet"]) == 0, case["cfg"]
    return load_state(case["work"] / out)


@pytest.mark.parametrize("i", range(N_CONFIGS))
def test_random_config_cpu_equals_reference_and_agrees_with_mergekit(runs, i, monkeypatch):
    case = runs[i]
    cfg = case["cfg"]
    cpu = _merge(case, "cpu", "cpu", monkeypatch)
    ref = _merge(case, "reference", "reference", monkeypatch)
    assert cpu.keys() == ref.keys()
    for name, r in ref.items():
        c = cpu[name]
        assert c.dtype == r.dtype and c.shape == r.shape, name
        if not r.is_floating_point():
            assert torch.equal(c, r), name
            continue
        if r.dtype != torch.float32:  # fp32: several roundings of fp32 arithmetic, bound only
            share = float((ulp_diff(c, r) <= 1).double().mean())
            assert share >= 0.999, (name, share, cfg)
        one_ulp = r.double().abs() * torch.finfo(r.dtype).eps
        bound = one_ulp + FP32_ROUNDING * AMPLIFICATION * case["magnitude"][_layer_free(name)]
        err = (c.double() - r.double()).abs()
        assert bool((err <= bound).all()), (name, float((err - bound).max()), cfg)
    if cfg["merge_method"].startswith("dare"):
        return
    mk = load_state(case["work"] / "mergekit")
    dtypes = {cfg.get("dtype", "bfloat16"), cfg.get("out_dtype", cfg.get("dtype", "bfloat16"))}
    coarse = torch.float16 if dtypes <= {"float16", "float32"} and "float16" in dtypes \
        else torch.bfloat16
    ours = {k: v.to(coarse) if v.is_floating_point() else v for k, v in cpu.items()}
    theirs = {k: v.to(coarse) if v.is_floating_point() else v for k, v in mk.items()}
    report = compare_outputs(ours, theirs, min_within_1ulp=0.5, check=False)
    assert report.ok and report.overall_within_1ulp >= 0.9, (report.format(3), cfg)
    # mergekit's own YAML handling (parameter resolution, filters, gradients, slices, LoRA)
    # with mergecore's kernels: the same arithmetic as ours, so a much tighter check of how
    # the YAML was read
    out = case["work"] / "mergekit-mergecore"
    assert main(["mergekit-yaml", str(case["work"] / "config.yml"), str(out),
                 "--lora-merge-cache", str(case["work"].parent / "mergekit-lora-cache")]) == 0
    planned = {k: v.to(coarse) if v.is_floating_point() else v
               for k, v in load_state(out).items()}
    compare_outputs({k: v for k, v in ours.items() if k in planned}, planned,
                    min_within_1ulp=0.99)


def _walk(node):
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_the_generator_covers_the_yaml_forms():
    """Forms the differential test relies on actually occur in its configs."""
    rng = random.Random(20261207)
    cfgs = [random_config(rng, "b", ["f1", "f2", "f3"], LAYERS, method=METHODS[i % len(METHODS)])
            for i in range(N_CONFIGS)]
    nodes = [n for c in cfgs for n in _walk(c)]
    assert {c["merge_method"] for c in cfgs} == set(METHODS)
    assert any("slices" in c for c in cfgs) and any("models" in c for c in cfgs)
    assert any("out_dtype" in c for c in cfgs) and any("dtype" not in c for c in cfgs)
    gradients = [n for n in nodes if isinstance(n, list) and n
                 and all(isinstance(x, float) for x in n)]
    filters = [n for n in nodes if isinstance(n, dict) and "filter" in n]
    assert gradients and filters
    assert any(isinstance(n, dict) and "layer_range" in n and "parameters" in n for n in nodes)


N_RECIPES = int(os.environ.get("MERGECORE_RANDOM_RECIPES", "8"))


@pytest.fixture(scope="module")
def recipe_family(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    root = tmp_path_factory.mktemp("random-recipes")
    family = [str(p) for p in make_family(root / "family", n_models=4, hidden=32,
                                           layers=LAYERS, vocab=96, dtype="bfloat16")]
    adapters = [str(make_lora_adapter(family[0], root / "lora", target_modules=("q_proj",)))]
    return root, family, adapters


@pytest.mark.parametrize("i", range(N_RECIPES))
def test_random_recipe_fused_equals_stage_by_stage(recipe_family, i):
    """One fused pass over a random recipe gives the bits of merging its stages one by one
    with the intermediates on disk."""
    root, family, adapters = recipe_family
    rng = random.Random(SEED * 1000 + i)
    docs = random_recipe(rng, family[0], family[1:], LAYERS, adapters=adapters)
    work = root / f"recipe{i}"
    work.mkdir()
    recipe = write_recipe(work / "recipe.yml", docs)
    assert main(["merge", str(recipe), str(work / "fused"), "--quiet"]) == 0, docs
    alone = stage_by_stage(docs, work)[None]
    fused, expected = load_state(work / "fused"), load_state(alone)
    assert fused.keys() == expected.keys(), docs
    for name, t in expected.items():
        assert fused[name].dtype == t.dtype and torch.equal(fused[name], t), (name, docs)


N_FAULTS = int(os.environ.get("MERGECORE_RANDOM_FAULTS", "3"))
FAULTS = ("signal=KILL", "signal=TERM", "signal=INT", "errno=ENOSPC")


@pytest.mark.parametrize("i", range(N_FAULTS))
def test_random_merge_stopped_at_a_random_tensor_resumes_to_the_same_bytes(recipe_family, i):
    """A random config or recipe, stopped after a random output tensor by a random fault
    (SIGKILL, SIGTERM, SIGINT, a full disk), then run again with --resume: every file equals
    an uninterrupted run's, and verify passes."""
    root, family, adapters = recipe_family
    rng = random.Random(SEED * 7919 + i)
    docs = (random_recipe(rng, family[0], family[1:], LAYERS, adapters=adapters)
            if rng.random() < 0.4 else
            [random_config(rng, family[0], family[1:], LAYERS, adapters=adapters)])
    work = root / f"fault{i}"
    work.mkdir()
    config = write_recipe(work / "config.yml", docs)
    clean, stopped = work / "clean" / "out", work / "stopped" / "out"  # same name: same card
    args = ["merge", str(config), "--quiet", "--out-shard-size", "20K"]
    assert main(args[:2] + [str(clean)] + args[2:]) == 0, docs
    after = rng.randint(1, len(load_state(clean)) - 1)
    fault = f"after={after},{rng.choice(FAULTS)}"
    proc = subprocess.run([sys.executable, "-m", "mergecore", *args[:2], str(stopped), *args[2:]],
                          env=dict(os.environ, MERGECORE_FAULT=fault), capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode != 0, (fault, proc.stderr)
    assert main(args[:2] + [str(stopped)] + args[2:] + ["--resume"]) == 0, (fault, docs)
    files = sorted(p.name for p in clean.iterdir())
    assert sorted(p.name for p in stopped.iterdir()) == files
    for name in files:
        assert (stopped / name).read_bytes() == (clean / name).read_bytes(), (name, fault, docs)
    assert verify_output(stopped).ok
