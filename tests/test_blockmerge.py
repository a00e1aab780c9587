"""BlockMerge_Gradient documents through ``mergecore merge``, against a direct implementation
of the rule in docs/semantics.md written here: per operation, the names in state_dict order are
filtered, given linspace ratios section by section, and blended one operation after the
other, in float64; lm_head / embed_tokens keep model 1's vocabulary."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mergecore.config import ConfigError, load_merge, parse_documents, stage_dependencies
from mergecore.config.blockmerge import (
    BlockMergeOperation,
    architecture_order,
    operation_ratios,
)
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
    return list(getattr(transformers, config.architectures[0])(config).state_dict())


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
            if key not in state:  # in state_dict() but not in the files: a tied lm_head
                continue
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


# ----- tensor names the architecture's order does not hold ---------------------------------------


def _rewrite_tensors(model_dir: Path, out: Path, edit) -> Path:
    """A copy of ``model_dir`` whose ``model.safetensors`` holds ``edit(tensors)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    tensors = edit(load_file(str(out / "model.safetensors")))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _composed_shares(order: list[str], operations: list[dict]) -> dict[str, float]:
    keep1 = dict.fromkeys(order, 1.0)  # blending r after r leaves prod(1 - r) of model 1
    for op in operations:
        for name, r in direct_ratios(op, order):
            keep1[name] *= 1.0 - r
    return {name: 1.0 - k for name, k in keep1.items()}


RENAMED = ("model.layers.1.mlp.up_proj.weight", "model.layers.1.block_sparse_moe.w3.weight")


def test_tensor_missing_from_the_architecture_order_is_an_error(family, tmp_path):
    """A checkpoint tensor that the installed transformers' state_dict() does not name (here
    one renamed consistently in both models) has no known position: the merge stops before
    reading any tensor, naming the key, the file, the architecture and the tensor."""
    def rename(tensors):
        tensors[RENAMED[1]] = tensors.pop(RENAMED[0])
        return tensors

    m1 = _rewrite_tensors(family[0], tmp_path / "m1", rename)
    m2 = _rewrite_tensors(family[1], tmp_path / "m2", rename)
    doc = {"model_path1": str(m1), "model_path2": str(m2), "operations": OPERATIONS}
    with pytest.raises(ConfigError) as info:
        _merge(doc, tmp_path, "out")
    (problem,) = [p for p in info.value.problems if "tensor order" in p]
    for needle in ("model_path1", str(m1), "LlamaForCausalLM", RENAMED[1],
                   "tensor order cannot be known", "gradient positions would be wrong"):
        assert needle in problem, needle
    assert not (tmp_path / "out").exists()


def test_mixtral_experts_renamed_by_transformers_are_an_error(tmp_path):
    """transformers 5 fuses Mixtral's experts in state_dict() (``mlp.experts.gate_up_proj``)
    while the files keep ``block_sparse_moe.experts.E.w1.weight``: an error, not a merge
    that silently keeps model 1's experts."""
    config = transformers.MixtralConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1, vocab_size=32,
        max_position_embeddings=64, tie_word_embeddings=False,
        architectures=["MixtralForCausalLM"])
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        d = tmp_path / f"mixtral{seed}"
        transformers.MixtralForCausalLM(config).save_pretrained(str(d))
        dirs.append(d)
    from safetensors import safe_open

    with safe_open(str(dirs[0] / "model.safetensors"), "pt") as f:
        files = set(f.keys())
    unordered = sorted(files - set(state_dict_order(dirs[0])))
    if not unordered:
        pytest.skip("the installed transformers names Mixtral's tensors as the files do")
    doc = {"model_path1": str(dirs[0]), "model_path2": str(dirs[1]),
           "operations": [{"operation": "all", "gradient_values": [0.2, 0.8]}]}
    with pytest.raises(ConfigError) as info:
        _merge(doc, tmp_path, "out")
    text = str(info.value)
    assert "MixtralForCausalLM" in text and "tensor order cannot be known" in text
    assert any(name in text for name in unordered)
    assert not (tmp_path / "out").exists()


def test_buffers_and_int_tensors_outside_the_order_are_no_error(family, tmp_path):
    """Old checkpoints hold a per-layer ``rotary_emb.inv_freq`` (float) and a persistent
    ``position_ids`` (int): transformers drops them on load, so no operation blends them;
    they keep model 1's values and the other tensors get the usual ratios."""
    extra = "model.layers.0.self_attn.rotary_emb.inv_freq"

    def add(tensors):
        tensors[extra] = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
        tensors["model.position_ids"] = torch.arange(64, dtype=torch.int64)[None]
        return tensors

    m1 = _rewrite_tensors(family[0], tmp_path / "m1", add)
    m2 = _rewrite_tensors(family[1], tmp_path / "m2", add)
    doc = {"model_path1": str(m1), "model_path2": str(m2), "out_dtype": "float32",
           "operations": OPERATIONS}
    out = load_state(_merge(doc, tmp_path, "out"))
    s1 = load_state(m1)
    assert torch.equal(out[extra], s1[extra])
    assert torch.equal(out["model.position_ids"], s1["model.position_ids"])
    expect = direct_blend(family[0], family[1], OPERATIONS)
    for name, exact in expect.items():
        assert torch.allclose(out[name].double(), exact, rtol=1e-6, atol=1e-7), name


# ----- tied embeddings ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory) -> list[Path]:
    """Gemma ties lm_head to embed_tokens: lm_head.weight is in state_dict(), not in the files."""
    root = tmp_path_factory.mktemp("blockmerge_tied")
    return make_family(root, arch="gemma", n_models=2, layers=3, hidden=32, vocab=64,
                       dtype="float32", seed=5)


def test_tied_embedding_model_merges_with_the_rule_s_ratios(tied_family, tmp_path):
    m1, m2 = tied_family
    order = state_dict_order(m1)
    files = set(load_state(m1))
    assert "lm_head.weight" in order and "lm_head.weight" not in files
    assert files <= set(order)
    doc = {"model_path1": str(m1), "model_path2": str(m2), "out_dtype": "float32",
           "operations": OPERATIONS}
    path = tmp_path / "tied.yml"
    path.write_text(yaml.safe_dump(doc))
    share2 = _composed_shares(order, OPERATIONS)  # lm_head counts in its section
    plan = load_merge(path)
    assert {t.name for t in plan.tensors} == files
    for t in plan.tensors:
        w1, w2 = t.input_params["weight"]
        assert w2 == pytest.approx(share2[t.name], abs=1e-12), t.name
        assert w1 + w2 == pytest.approx(1.0, abs=1e-12)
    out = load_state(_merge(doc, tmp_path, "out"))
    expect = direct_blend(m1, m2, OPERATIONS)
    assert out.keys() == expect.keys() == files
    for name, exact in expect.items():
        assert torch.allclose(out[name].double(), exact, rtol=1e-6, atol=1e-7), name


# ----- when the order cannot be known ------------------------------------------------------------


def test_order_needs_architectures_and_model_type(family, tmp_path):
    for config in (None, {}, {"model_type": "llama"}, {"architectures": ["LlamaForCausalLM"]}):
        with pytest.raises(ConfigError, match="names no architectures / model_type") as info:
            architecture_order(config, "model_path1 'm'")
        assert "model_path1 'm'" in str(info.value)
    # through a merge: model 1's config.json lost its architectures
    m1 = tmp_path / "m1"
    shutil.copytree(family[0], m1)
    cfg = json.loads((m1 / "config.json").read_text())
    del cfg["architectures"]
    (m1 / "config.json").write_text(json.dumps(cfg))
    doc = {"model_path1": str(m1), "model_path2": str(family[1]), "operations": OPERATIONS}
    with pytest.raises(ConfigError, match="names no architectures") as info:
        _merge(doc, tmp_path, "out")
    assert f"model_path1 {str(m1)!r}" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_order_of_an_unknown_class_or_model_type_is_an_error(family):
    config = json.loads((family[0] / "config.json").read_text())
    with pytest.raises(ConfigError, match="cannot learn the tensor order of NoSuchForCausalLM "
                       "from transformers: transformers has no class 'NoSuchForCausalLM'"):
        architecture_order({**config, "architectures": ["NoSuchForCausalLM"]}, "here")
    with pytest.raises(ConfigError, match="here: cannot learn the tensor order of "
                       "LlamaForCausalLM from transformers"):
        architecture_order({**config, "model_type": "no_such_model_type"}, "here")


def test_order_without_transformers_says_how_to_install_it(family, monkeypatch):
    config = json.loads((family[0] / "config.json").read_text())
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    with pytest.raises(ConfigError, match="needs transformers to learn the tensor order of "
                       "LlamaForCausalLM: pip install transformers"):
        architecture_order(config, "here")
