"""BlockMerge_Gradient documents through ``mergecore merge``, against a direct implementation
of the rule in docs/semantics.md written here: per operation, the names in state_dict order are
filtered, given linspace ratios section by section, and blended one operation after the
other, in float64; lm_head / embed_tokens keep model 1's vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mergecore.config import ConfigError, load_merge, parse_documents, stage_dependencies
from mergecore.config.blockmerge import BlockMergeOperation, operation_ratios
from mergecore.merge import MergeOptions, run_merge
from mergecore.synthetic import make_family
from mergecore.testing.mergekit_harness import load_state, ulp_diff

transformers = pytest.importorskip("transformers")

OPERATIONS = [
    {"operation": "attn", "filter": "self_attn", "gradient_values": [0.8, 0.2, 0.5]},
    {"operation": "mlp", "filter": "mlp", "gradient_values": [0.3, 0.7], "layer_only": True},
    {"operation": "layers", "gradient_values": [0.1, 0.9, 0.4, 0.6], "layer_only": True},
    {"operation": "rest", "gradient_values": [0.25], "no_layers": True},
    {"operation": "unused", "filter": "no_such_tensor", "gradient_values": [1.0]},
]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    """base (vocab 136), ft1 (128), ft2 (144): model 1 larger, then model 2 larger."""
    root = tmp_path_factory.mktemp("blockmerge")
    return make_family(root, n_models=3, layers=3, hidden=32, vocab_sizes=[136, 128, 144],
                       dtype="float32", seed=11)


def state_dict_order(model_dir: Path) -> list[str]:
    config = transformers.AutoConfig.from_pretrained(model_dir)
    return list(transformers.LlamaForCausalLM(config).state_dict())


def direct_ratios(op: dict, order: list[str]) -> list[tuple[str, float]]:
    """The rule for one operation: ``(name, share of model 2)`` for the names it selects."""
    keys = order
    if op.get("layer_only"):
        keys = [k for k in keys if "layer" in k]
    elif op.get("no_layers"):
        keys = [k for k in keys if "layer" not in k]
    if op.get("filter"):
        keys = [k for k in keys if op["filter"] in k]
    g = op["gradient_values"]
    g = g * 2 if len(g) == 1 else g
    per = len(keys) // (len(g) - 1)
    ratios = [r for j in range(len(g) - 1) for r in np.linspace(g[j], g[j + 1], per)]
    ratios += [g[-1]] * (len(keys) - len(ratios))
    return list(zip(keys, ratios))


def direct_blend(model1: Path, model2: Path, operations: list[dict]) -> dict[str, torch.Tensor]:
    """The rule, written out: float64, one operation after the other."""
    state = {k: v.double() for k, v in load_state(model1).items()}
    other = {k: v.double() for k, v in load_state(model2).items()}
    order = state_dict_order(model1)
    for op in operations:
        for key, r in direct_ratios(op, order):
            a, b = state[key], other[key]
            if key in ("lm_head.weight", "model.embed_tokens.weight"):
                n = min(a.shape[0], b.shape[0])
                new = a.clone()
                new[:n] = (1 - r) * a[:n] + r * b[:n]
                state[key] = new
            else:
                state[key] = (1 - r) * a + r * b
    return state


def _merge(doc: dict, tmp_path: Path, out: str) -> Path:
    path = tmp_path / f"{out}.yml"
    path.write_text(yaml.safe_dump(doc))
    run_merge(path, tmp_path / out, MergeOptions(quiet=True))
    return tmp_path / out


@pytest.mark.parametrize("pair", [(0, 1), (1, 2)], ids=["model1-larger-vocab",
                                                        "model2-larger-vocab"])
def test_blockmerge_output_matches_the_rule(family, tmp_path, pair):
    m1, m2 = family[pair[0]], family[pair[1]]
    doc = {"model_path1": str(m1), "model_path2": str(m2), "output_model_path": "unused",
           "out_dtype": "float32", "operations": OPERATIONS}
    out = load_state(_merge(doc, tmp_path, "out"))
    expect = direct_blend(m1, m2, OPERATIONS)
    s1, s2 = load_state(m1), load_state(m2)
    assert out.keys() == expect.keys()
    for name, exact in expect.items():
        ours = out[name]
        assert ours.shape == exact.shape and ours.dtype == torch.float32, name
        # fp32 arithmetic on fp32 inputs: within the fp32 error bound of the operands
        a = s1[name].double()
        b = torch.zeros_like(a)
        n = min(a.shape[0], s2[name].shape[0])
        b[:n] = s2[name][:n].double()
        bound = 3 * 2.0 ** -22 * (a.abs() + b.abs())
        assert bool(((ours.double() - exact).abs() <= bound).all()), name
        if n < a.shape[0]:  # model 1's extra rows are kept as they are
            assert torch.equal(ours[n:], s1[name][n:]), name
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["vocab_size"] == load_state(m1)["lm_head.weight"].shape[0]


def test_blockmerge_defaults_to_float16_like_the_script(family, tmp_path):
    doc = {"model_path1": str(family[0]), "model_path2": str(family[1]),
           "operations": OPERATIONS[:1]}
    out = load_state(_merge(doc, tmp_path, "out"))
    expect = direct_blend(family[0], family[1], OPERATIONS[:1])
    for name, exact in expect.items():
        assert out[name].dtype == torch.float16
        assert int(ulp_diff(out[name], exact.half()).max()) <= 1, name


def test_planned_weight_of_every_tensor_is_the_composed_ratio(family, tmp_path):
    doc = {"model_path1": str(family[0]), "model_path2": str(family[1]),
           "operations": OPERATIONS}
    path = tmp_path / "bm.yml"
    path.write_text(yaml.safe_dump(doc))
    plan = load_merge(path)
    order = state_dict_order(family[0])
    keep1 = dict.fromkeys(order, 1.0)  # blending r after r leaves prod(1 - r) of model 1
    for op in OPERATIONS:
        for name, r in direct_ratios(op, order):
            keep1[name] *= 1.0 - r
    share2 = {name: 1.0 - k for name, k in keep1.items()}
    for t in plan.tensors:
        assert t.method == "linear"
        w1, w2 = t.input_params["weight"]
        assert w2 == pytest.approx(share2[t.name], abs=1e-12), t.name
        assert w1 + w2 == pytest.approx(1.0, abs=1e-12)
    assert len({round(share2[n], 9) for n in order if "mlp" in n}) > 3  # gradients vary


def test_ratio_sections_remainder_and_single_value():
    names = [f"t{i}" for i in range(7)]
    op = BlockMergeOperation("x", (0.0, 1.0, 0.0))
    # 2 sections of 7 // 2 = 3 tensors, then the last value for the remainder
    assert list(operation_ratios(op, names).values()) == [0.0, 0.5, 1.0, 1.0, 0.5, 0.0, 0.0]
    assert set(operation_ratios(BlockMergeOperation("x", (0.3,)), names).values()) == {0.3}
    # more sections than tensors: every tensor gets the last value
    assert list(operation_ratios(BlockMergeOperation("x", (0.1, 0.2, 0.3, 0.9)),
                                 names[:2]).values()) == [0.9, 0.9]
    assert operation_ratios(BlockMergeOperation("x", (0.5,), filter="zzz"), names) == {}


def test_bad_blockmerge_documents_list_every_problem(family):
    text = yaml.safe_dump({
        "model_path1": str(family[0]), "max_shard_size": "2000MiB", "colour": "red",
        "operations": [{"operation": "a", "filter": "mlp"},
                       {"operation": "b", "gradient_values": [0.5], "layer_only": True,
                        "no_layers": True},
                       {"operation": "c", "gradient_values": ["x"], "fliter": "mlp"}]})
    with pytest.raises(ConfigError) as info:
        parse_documents(text)
    probs = "\n".join(info.value.problems)
    for needle in ("model_path2: missing", "colour: unknown key",
                   "operations[0].gradient_values", "operations[1]: layer_only and no_layers",
                   "operations[2].gradient_values", "operations[2].fliter"):
        assert needle in probs


def test_blockmerge_document_can_be_a_stage_of_a_recipe(family):
    text = "\n---\n".join([
        yaml.safe_dump({"name": "p1", "merge_method": "linear", "models": [
            {"model": str(family[0]), "parameters": {"weight": 0.5}},
            {"model": str(family[1]), "parameters": {"weight": 0.5}}]}),
        yaml.safe_dump({"model_path1": "p1", "model_path2": str(family[2]),
                        "operations": OPERATIONS[:1]}),
    ])
    docs = parse_documents(text)
    assert docs[1].merge_method == "linear" and docs[1].blockmerge is not None
    assert stage_dependencies(docs) == {"p1": [], None: ["p1"]}
