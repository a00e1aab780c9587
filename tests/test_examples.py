"""The example recipes in examples/: with their `/path/to/...` placeholders replaced by small
generated checkpoints (and LoRA adapters), they parse, plan and run end to end; the lzlv
output loads with transformers."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mergecore.cli import main as mergecore_main
from mergecore.config import load_merge, parse_documents
from mergecore.recipes import load_recipe
from mergecore.synthetic import make_family, make_lora_adapter
from mergecore.testing.mergekit_harness import load_state

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PLACEHOLDER = re.compile(r"/path/to/[A-Za-z0-9._-]+")


def substitute(text: str, paths: dict[str, str]) -> str:
    """Replace every placeholder by its generated path; a placeholder left unmapped fails."""
    found = set(PLACEHOLDER.findall(text))
    assert found == set(paths), f"placeholders {sorted(found)} != mapped {sorted(paths)}"
    return PLACEHOLDER.sub(lambda m: paths[m.group(0)], text)


def test_lzlv_example_runs_end_to_end(tmp_path):
    models = make_family(tmp_path / "fam", n_models=3, hidden=64, layers=4, vocab=256,
                         dtype=torch.float16)
    names = ["Mythospice-70b", "Xwin-LM-70B-V0.1", "Nous-Hermes-Llama2-70b"]
    text = substitute((EXAMPLES / "lzlv-70b.yml").read_text(),
                      {f"/path/to/{n}": str(m) for n, m in zip(names, models)})
    recipe = tmp_path / "lzlv.yml"
    recipe.write_text(text)
    plan = load_recipe(recipe)
    assert [s.name for s in plan.stages] == ["component-1", "component-2", None]
    comp1 = plan.stages[0].plan
    assert comp1.tensor("model.layers.0.mlp.up_proj.weight").global_params["t"] == 0.25
    assert comp1.tensor("model.layers.3.mlp.up_proj.weight").global_params["t"] == 0.5
    assert mergecore_main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 0
    out = load_state(tmp_path / "out")
    assert set(out) == set(load_state(models[0])) and out["lm_head.weight"].dtype == torch.float16

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(8)[None]).logits).all()


def test_stheno_example_parses_and_plans(tmp_path):
    names = ["Llama-2-13b-hf", "chronos-13b-v2", "airoboros-l2-13b-2.1",
             "Nous-Hermes-Llama2-13b", "13B-Legerdemain-L2",
             "WizardLM-1.0-Uncensored-Llama2-13b", "spring-dragon"]
    models = make_family(tmp_path / "fam", n_models=len(names), hidden=64, layers=4,
                         vocab=256, dtype=torch.float16)
    paths = {f"/path/to/{n}": str(m) for n, m in zip(names, models)}
    for adapter, seed in (("Kimiko-v2-13B", 1), ("limarp-llama2-v2", 2)):
        paths[f"/path/to/{adapter}"] = str(make_lora_adapter(models[0], tmp_path / adapter,
                                                             seed=seed))
    text = substitute((EXAMPLES / "stheno-l2-13b.yml").read_text(), paths)
    recipe = tmp_path / "stheno.yml"
    recipe.write_text(text)
    docs = text.split("\n---\n")
    assert len(docs) == 3 and "model_path1: stheno-p1" in docs[2]
    # the two TIES stages plan on their own, LoRA references included
    for k, doc in enumerate(docs[:2]):
        (tmp_path / f"p{k}.yml").write_text(doc)
        plan = load_merge(tmp_path / f"p{k}.yml")
        adapters = {i.adapter for t in plan.tensors for i in t.inputs if i.adapter}
        assert adapters == {paths["/path/to/Kimiko-v2-13B" if k == 0 else
                                  "/path/to/limarp-llama2-v2"]}
    parse_documents(text)
    plan = load_recipe(recipe)
    assert [s.name for s in plan.stages] == ["stheno-p1", "stheno-p2", None]
    assert mergecore_main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 0
    assert set(load_state(tmp_path / "out")) == set(load_state(models[0]))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(8)[None]).logits).all()
