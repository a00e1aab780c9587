"""Multi-stage recipes: the fused one-pass run against the stages run one by one (mergecore),
against mergekit-multi 0.1.5, and its checks (errors before any read, bytes read once).

The families are fp32 and the stages write bf16 (``dtype: float32, out_dtype: bfloat16``),
as in test_merge_vs_mergekit.py: every tool computes in fp32 and rounds once per stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergecore.cli import main as mergecore_main
from mergecore.config.errors import ConfigError
from mergecore.io import open_checkpoint
from mergecore.merge import MergeOptions, run_merge
from mergecore.recipes import load_recipe
from mergecore.synthetic import make_family
from mergecore.testing.mergekit_harness import (
    compare_outputs,
    load_state,
    run_mergekit_multi_batch,
)
from mergecore.testing.stages import stage_by_stage, write_recipe
from mergecore.verify import verify_output

LAYERS = 4
DTYPES = {"dtype": "float32", "out_dtype": "bfloat16"}


def lzlv_recipe(a: str, b: str, c: str, adapter: str | None = None) -> list[dict]:
    """The lzlv_70B shape: SLERP gradients A x B and B x C, then SLERP of the two."""
    def component(name, x, y, t):
        return {"name": name, "merge_method": "slerp", "base_model": x, **DTYPES,
                "slices": [{"sources": [{"model": x, "layer_range": [0, LAYERS]},
                                        {"model": y, "layer_range": [0, LAYERS]}]}],
                "parameters": {"t": t}}
    return [component("comp1", a, b, [0.25, 0.3, 0.5]),
            component("comp2", b, c, [0.4, 0.3, 0.25]),
            {"merge_method": "slerp", "base_model": "comp1", **DTYPES,
             "models": [{"model": "comp1"}, {"model": "comp2"}], "parameters": {"t": 0.5}}]


def ties_slerp_recipe(base: str, ft1: str, ft2: str, adapter: str | None = None) -> list[dict]:
    """A TIES stage and a task-arithmetic stage over the same inputs, blended by a SLERP
    gradient with per-module filters; the final document comes first in the file."""
    return [
        {"merge_method": "slerp", "base_model": "p1", **DTYPES,
         "slices": [{"sources": [{"model": "p1", "layer_range": [0, LAYERS]},
                                 {"model": "p2", "layer_range": [0, LAYERS]}]}],
         "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]},
                              {"value": 0.3}]}},
        {"name": "p1", "merge_method": "ties", "base_model": base, **DTYPES,
         "models": [{"model": ft1, "parameters": {"weight": 0.7, "density": 0.5}},
                    {"model": ft2, "parameters": {"weight": 0.4, "density": 0.3}}]},
        {"name": "p2", "merge_method": "task_arithmetic", "base_model": base, **DTYPES,
         "models": [{"model": ft1, "parameters": {"weight": 0.3}},
                    {"model": ft2, "parameters": {"weight": 0.6}}],
         "parameters": {"lambda": 0.9}},
    ]


def dare_slices_recipe(base: str, ft1: str, ft2: str, adapter: str | None = None
                       ) -> list[dict]:
    """A seeded DARE stage, then a passthrough that restacks its layers (slices over a stage)
    and a linear stage that uses the first one again (a stage tensor used twice)."""
    return [
        {"name": "d", "merge_method": "dare_ties", "base_model": base, **DTYPES,
         "random_seed": 7,
         "models": [{"model": ft1, "parameters": {"weight": 1.0, "density": 0.5}},
                    {"model": ft2, "parameters": {"weight": 0.5, "density": 0.6}}]},
        {"name": "stack", "merge_method": "passthrough", **DTYPES,
         "slices": [{"sources": [{"model": "d", "layer_range": [0, 3]}]},
                    {"sources": [{"model": base, "layer_range": [1, LAYERS]}]}]},
        {"merge_method": "linear", **DTYPES,
         "slices": [{"sources": [{"model": "stack", "layer_range": [0, LAYERS]},
                                 {"model": "d", "layer_range": [0, LAYERS]},
                                 {"model": ft2, "layer_range": [0, LAYERS]}]}],
         "parameters": {"weight": [0.5, 0.2]}},
    ]


def lora_blockmerge_recipe(base: str, ft1: str, ft2: str, adapter: str) -> list[dict]:
    """The Stheno shape: a TIES stage with a LoRA input, then a BlockMerge_Gradient of the
    stage and a plain model (documents recognized by their keys)."""
    return [
        {"name": "p1", "merge_method": "ties", "base_model": base, **DTYPES,
         "models": [{"model": f"{ft1}+{adapter}", "parameters": {"weight": 1.0, "density": 0.5}},
                    {"model": ft2, "parameters": {"weight": 0.5, "density": 0.7}}]},
        {"model_path1": "p1", "model_path2": ft2, "output_model_path": "unused",
         "operations": [{"operation": "attn", "filter": "self_attn",
                         "gradient_values": [0.8, 0.2]},
                        {"operation": "mlp", "filter": "mlp", "gradient_values": [0.3, 0.7],
                         "layer_only": True}]},
    ]


RECIPES = {"lzlv": lzlv_recipe, "ties_slerp": ties_slerp_recipe,
           "dare_slices": dare_slices_recipe, "lora_blockmerge": lora_blockmerge_recipe}
MERGEKIT_SHARE = {"lzlv": 0.999, "ties_slerp": 0.95}  # docs/semantics.md: slerp / ties


def merge(config: Path, out: Path, *extra: str) -> None:
    assert mergecore_main(["merge", str(config), str(out), "--quiet", *extra]) == 0


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("recipes")
    return [str(p) for p in make_family(root / "llama", arch="llama", n_models=3, hidden=64,
                                         layers=LAYERS, vocab=256, extra_int_tensor=True,
                                         dtype=torch.float32)]


@pytest.fixture(scope="module")
def runs(family, tmp_path_factory) -> dict[str, dict]:
    """Per recipe: the fused output (with intermediates kept), the stage-by-stage outputs."""
    from mergecore.synthetic import make_lora_adapter

    adapter = str(make_lora_adapter(family[0], tmp_path_factory.mktemp("lora") / "adapter"))
    out = {}
    for key, make in RECIPES.items():
        work = tmp_path_factory.mktemp(key)
        docs = make(*family, adapter)
        recipe = write_recipe(work / "recipe.yml", docs)
        merge(recipe, work / "fused", "--keep-intermediates", str(work / "kept"))
        merge(recipe, work / "fused-plain")
        out[key] = {"docs": docs, "recipe": recipe, "work": work,
                    "stages": stage_by_stage(docs, work)}
    return out


@pytest.mark.parametrize("key", list(RECIPES))
def test_fused_is_bit_identical_to_stage_by_stage(runs, key):
    r = runs[key]
    fused, alone = load_state(r["work"] / "fused-plain"), load_state(r["stages"][None])
    assert set(fused) == set(alone)
    for name in alone:
        assert fused[name].dtype == alone[name].dtype, name
        assert torch.equal(fused[name], alone[name]), name
    ours = json.loads((r["work"] / "fused-plain" / "config.json").read_text())
    theirs = json.loads((r["stages"][None] / "config.json").read_text())
    assert ours == theirs
    assert (r["work"] / "fused-plain" / "mergekit_config.yml").read_text() == r["recipe"].read_text()
    assert (r["work"] / "fused-plain" / "tokenizer.json").exists()


@pytest.mark.parametrize("key", list(RECIPES))
def test_kept_intermediates_equal_the_stage_outputs(runs, key):
    r = runs[key]
    assert load_state(r["work"] / "fused").keys() == load_state(r["work"] / "fused-plain").keys()
    for name, path in r["stages"].items():
        if name is None:
            continue
        kept, alone = load_state(r["work"] / "kept" / name), load_state(path)
        assert kept.keys() == alone.keys()
        assert all(torch.equal(kept[t], alone[t]) for t in alone), name
        assert (json.loads((r["work"] / "kept" / name / "config.json").read_text())
                == json.loads((path / "config.json").read_text()))
        report = verify_output(r["work"] / "kept" / name)  # side files recorded there too
        assert report.ok and any("side files:" in m for _, m in report.lines), report.text()
    assert not (r["work"] / "kept" / "final").exists()
    assert verify_output(r["work"] / "fused").ok


@pytest.fixture(scope="module")
def mergekit_multi(runs) -> dict[str, Path]:
    """mergekit-multi's output for each recipe of MERGEKIT_SHARE (one subprocess for all)."""
    jobs = [(runs[k]["docs"], runs[k]["work"] / "mk", runs[k]["work"] / "mk-inter")
            for k in MERGEKIT_SHARE]
    return dict(zip(MERGEKIT_SHARE, run_mergekit_multi_batch(jobs)))


@pytest.mark.parametrize("key", list(MERGEKIT_SHARE))
def test_matches_mergekit_multi(runs, mergekit_multi, key):
    r = runs[key]
    ours, theirs = load_state(r["work"] / "fused-plain"), load_state(mergekit_multi[key])
    # mergekit drops the int64 buffer its architecture table does not name; mergecore keeps it
    ours = {k: v for k, v in ours.items() if k in theirs or v.is_floating_point()}
    compare_outputs(ours, theirs, min_within_1ulp=MERGEKIT_SHARE[key])


def _tensor_bytes(model_dir: str, floats_only: bool) -> int:
    return sum(info.nbytes for info in open_checkpoint(model_dir).tensors.values()
               if info.is_float or not floats_only)


def test_each_input_tensor_is_read_once_and_the_budget_holds(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", lzlv_recipe(*family))
    budget = 640 << 10  # twice the largest fused item (the embeddings, 288 KiB), < 1/4 model
    result = run_merge(recipe, tmp_path / "out", MergeOptions(quiet=True, max_memory=budget))
    stats = result.stats
    # every float tensor of the three models once; the int64 buffer is copied from comp1's base
    base, ft1, ft2 = family
    assert stats.bytes_read == (_tensor_bytes(base, False) + _tensor_bytes(ft1, True)
                                + _tensor_bytes(ft2, True))
    assert stats.bytes_written == sum(t.out_nbytes for t in result.plan.final.plan.tensors)
    assert 0 < stats.peak_budget_bytes <= budget
    assert stats.tensors == len(result.plan.final.plan.tensors)


def test_dry_run_shows_the_stages_and_writes_nothing(family, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yml", lzlv_recipe(*family))
    merge(recipe, tmp_path / "out", "--dry-run", "-v", "--max-memory", "64MiB")
    text = capsys.readouterr().out
    assert "3 stages" in text and "stage comp1" in text and "stage comp2" in text
    assert "memory budget: 64.0 MiB (--max-memory)" in text
    assert "slerp[final](slerp[comp1](base, ft1), slerp[comp2](ft1, ft2))" in text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("inside", ["out/stages", "out"])
def test_intermediates_inside_the_output_are_refused_before_anything_is_written(
        family, tmp_path, capsys, inside):
    recipe = write_recipe(tmp_path / "r.yml", lzlv_recipe(*family))
    out = tmp_path / "out"
    assert mergecore_main(["merge", str(recipe), str(out), "--quiet",
                           "--keep-intermediates", str(tmp_path / inside)]) == 1
    err = capsys.readouterr().err
    assert f"--keep-intermediates {str(tmp_path / inside)!r} is inside the output" in err
    assert not out.exists()


def test_stage_gradient_resolves_over_the_stage_own_layers(family, tmp_path):
    """comp1's t gradient [0.25, 0.3, 0.5] at layer idx of 4 is np.interp(idx / 3, ...)."""
    import numpy as np

    plan = load_recipe(write_recipe(tmp_path / "r.yml", lzlv_recipe(*family)))
    comp1 = plan.stages[0].plan
    for idx in range(LAYERS):
        t = comp1.tensor(f"model.layers.{idx}.mlp.up_proj.weight").global_params["t"]
        assert t == pytest.approx(float(np.interp(idx / (LAYERS - 1), [0, 0.5, 1],
                                                  [0.25, 0.3, 0.5])))
    item = plan.tensors[[t.name for t in plan.tensors].index("model.layers.2.mlp.up_proj.weight")]
    assert len(item.inputs) == 3 and len(item.nodes) == 3  # ft1 read once for both stages


def test_problems_name_the_document_before_anything_is_read(family, tmp_path):
    base, ft1, ft2 = family
    docs = lzlv_recipe(base, ft1, ft2)
    docs[1]["slices"][0]["sources"][1]["model"] = "comp9"  # no such stage or directory
    docs[0]["slices"][0]["sources"][1]["model"] = f"{ft1}+{tmp_path / 'no-adapter'}"
    recipe = write_recipe(tmp_path / "bad.yml", docs)
    with pytest.raises(ConfigError) as info:
        run_merge(recipe, tmp_path / "out", MergeOptions(quiet=True))
    msg = str(info.value)
    assert "document 2 (name: comp2)" in msg and "comp9" in msg and "stages: comp1, comp2" in msg
    assert "document 1 (name: comp1)" in msg and "no-adapter" in msg
    assert str(recipe) in msg
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_across_stages_is_reported(family, tmp_path):
    base, ft1, _ = family
    docs = [{"name": "short", "merge_method": "passthrough", **DTYPES,
             "slices": [{"sources": [{"model": base, "layer_range": [0, 2]}]}]},
            {"merge_method": "linear", **DTYPES,
             "models": [{"model": ft1, "parameters": {"weight": 1.0}},
                        {"model": "short", "parameters": {"weight": 1.0}}]}]
    with pytest.raises(ConfigError) as info:
        load_recipe(write_recipe(tmp_path / "r.yml", docs))
    msg = str(info.value)
    assert "document 2 (final)" in msg and "'short'" in msg and "2 layers" in msg


@pytest.mark.parametrize("yaml_problem", [False, True])
def test_a_stage_missing_a_parameter_still_checks_the_documents_that_use_it(
        family, tmp_path, yaml_problem):
    """The stage's output is known without its weights, so the final document's layer_range
    beyond that output comes in the same error (with and without a YAML problem elsewhere,
    which the lenient check handles)."""
    base, ft1, _ = family
    docs = [{"name": "mix", "merge_method": "linear", **DTYPES,
             "models": [{"model": base, "parameters": {"weight": 0.5}}, {"model": ft1}]},
            {"merge_method": "passthrough", **DTYPES,
             "slices": [{"sources": [{"model": "mix", "layer_range": [0, LAYERS + 3]}]}]}]
    if yaml_problem:
        docs[1]["bogus_key"] = 1
    with pytest.raises(ConfigError) as info:
        load_recipe(write_recipe(tmp_path / "r.yml", docs))
    msg = str(info.value)
    assert "document 1 (name: mix)" in msg and "weight" in msg
    assert "document 2 (final)" in msg and f"{LAYERS + 3}" in msg and f"{LAYERS} layers" in msg
    assert ("bogus_key" in msg) == yaml_problem
    docs[0]["models"][1]["parameters"] = {"weight": 0.5}  # the stage fixed: the same problem
    docs[1].pop("bogus_key", None)
    with pytest.raises(ConfigError) as fixed:
        load_recipe(write_recipe(tmp_path / "r.yml", docs))
    assert "document 1" not in str(fixed.value)
    assert [p for p in fixed.value.problems if "layer_range" in p] == [
        p for p in info.value.problems if "layer_range" in p]


def test_an_adapter_on_a_model_an_earlier_stage_opened_is_still_checked(family, tmp_path):
    """The second document adds an adapter to the model the first one already opened: the
    adapter is checked against that model (an adapter trained for another hidden size was
    let through, and failed only mid-merge)."""
    from mergecore.synthetic import make_lora_adapter

    base, _, _ = family
    (other,) = make_family(tmp_path / "wide", n_models=1, hidden=96, layers=LAYERS, vocab=256,
                           dtype=torch.float32)
    wrong = make_lora_adapter(other, tmp_path / "wrong", r=4, alpha=8)
    docs = [{"name": "s1", "merge_method": "linear", **DTYPES,
             "models": [{"model": base, "parameters": {"weight": 1.0}}]},
            {"merge_method": "linear", **DTYPES,
             "models": [{"model": "s1", "parameters": {"weight": 0.5}},
                        {"model": f"{base}+{wrong}", "parameters": {"weight": 0.5}}]}]
    with pytest.raises(ConfigError) as info:
        load_recipe(write_recipe(tmp_path / "r.yml", docs))
    msg = str(info.value)
    assert "document 2 (final)" in msg and str(wrong) in msg and "q_proj" in msg


def test_cycle_and_lora_on_a_stage_are_refused(family, tmp_path):
    base, ft1, _ = family
    cyc = [{"name": "x", "merge_method": "linear", "models": [
               {"model": "y", "parameters": {"weight": 1.0}}]},
           {"name": "y", "merge_method": "linear", "models": [
               {"model": "x", "parameters": {"weight": 1.0}}]},
           {"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1.0}}]}]
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(write_recipe(tmp_path / "c.yml", cyc))
    lora = [{"name": "x", "merge_method": "linear", "models": [
                {"model": base, "parameters": {"weight": 1.0}}]},
            {"merge_method": "linear", "models": [
                {"model": f"x+{ft1}", "parameters": {"weight": 1.0}}]}]
    with pytest.raises(ConfigError, match="LoRA adapter on the intermediate stage 'x'"):
        load_recipe(write_recipe(tmp_path / "l.yml", lora))


def test_unused_stage_is_a_warning_and_all_named_means_last_is_final(family, tmp_path):
    base, ft1, ft2 = family
    docs = lzlv_recipe(base, ft1, ft2)
    docs[2]["name"] = "final"
    docs.append({"name": "spare", "merge_method": "linear", **DTYPES,
                 "models": [{"model": base, "parameters": {"weight": 1.0}}]})
    plan = load_recipe(write_recipe(tmp_path / "r.yml", docs))
    assert plan.final.name == "spare"
    docs[2].pop("name")
    plan = load_recipe(write_recipe(tmp_path / "r.yml", docs))
    assert [s.name for s in plan.stages] == ["comp1", "comp2", None]
    assert any("spare" in w and "not used" in w for w in plan.warnings)


# (hidden, LoRA rank, vocabularies of the adapter's model, the middle and the small model, seed)
VOCAB_LORA_CASES = [(64, 8, (300, 280, 264), 11), (96, 16, (777, 640, 513), 14)]


@pytest.mark.parametrize("hidden,r,vocabs,seed", VOCAB_LORA_CASES)
def test_lora_on_a_larger_vocabulary_is_bit_identical_fused_and_stage_by_stage(
        tmp_path, hidden, r, vocabs, seed):
    """An adapter on embed_tokens and lm_head of the model with the largest vocabulary, used by
    two stages that cut it to different common vocabularies: a fused run computes its update
    on the same rows as the stage run on its own (fp32 throughout, so no rounding hides a
    difference)."""
    from mergecore.synthetic import make_lora_adapter

    big, mid, small = (str(p) for p in make_family(
        tmp_path / "fam", n_models=3, layers=2, hidden=hidden, vocab_sizes=list(vocabs),
        dtype=torch.float32, seed=seed))
    adapter = make_lora_adapter(big, tmp_path / "ad", r=r, alpha=2 * r, seed=seed,
                                target_modules=("q_proj", "embed_tokens", "lm_head"))
    lora = f"{big}+{adapter}"
    fp32 = {"dtype": "float32", "out_dtype": "float32"}
    docs = [{"name": "wide", "merge_method": "linear", **fp32, "tokenizer_source": mid,
             "models": [{"model": lora, "parameters": {"weight": 0.6}},
                        {"model": mid, "parameters": {"weight": 0.4}}]},
            {"merge_method": "linear", **fp32, "tokenizer_source": small,
             "models": [{"model": "wide", "parameters": {"weight": 0.5}},
                        {"model": lora, "parameters": {"weight": 0.3}},
                        {"model": small, "parameters": {"weight": 0.2}}]}]
    recipe = write_recipe(tmp_path / "recipe.yml", docs)
    merge(recipe, tmp_path / "fused", "--keep-intermediates", str(tmp_path / "kept"))
    stages = stage_by_stage(docs, tmp_path)
    fused, alone = load_state(tmp_path / "fused"), load_state(stages[None])
    assert fused.keys() == alone.keys()
    assert fused["lm_head.weight"].shape[0] == vocabs[2]
    differ = [n for n in alone if not torch.equal(fused[n], alone[n])]
    kept, wide = load_state(tmp_path / "kept" / "wide"), load_state(stages["wide"])
    assert kept["model.embed_tokens.weight"].shape[0] == vocabs[1]
    differ += [f"wide: {n}" for n in wide if not torch.equal(kept[n], wide[n])]
    assert not differ, differ
