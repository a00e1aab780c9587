"""The merge planner on small real checkpoints, checked against mergekit 0.1.5's own planner."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mergecore.config import ConfigError, load_config, load_merge, open_checkpoints, parse_config
from mergecore.config.layout import detect_layout, is_pre_layer_name, split_layer_name
from mergecore.config.methods import METHODS, NON_BASE
from mergecore.io.checkpoint import open_checkpoint
from mergecore.plan import MergePlan, build_plan

transformers = pytest.importorskip("transformers")


def y(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


# ----- checkpoints ------------------------------------------------------------------------------


def _save_hf(model, path: Path) -> Path:
    model.save_pretrained(str(path))
    return path


def llama(path: Path, seed: int, layers: int = 4, vocab: int = 16, tied: bool = False) -> Path:
    cfg = transformers.LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=2,
                                   vocab_size=vocab, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return _save_hf(transformers.LlamaForCausalLM(cfg), path)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    out = {
        "a": llama(root / "llama_a", 1),
        "b": llama(root / "llama_b", 2),
        "c": llama(root / "llama_c", 3),
        "d6": llama(root / "llama_d6", 4, layers=6),
        "ta": llama(root / "tied_a", 5, tied=True),
        "tb": llama(root / "tied_b", 6, tied=True),
    }
    g = transformers.GPT2Config(n_embd=8, n_layer=3, n_head=2, vocab_size=16, n_positions=12,
                                bos_token_id=0, eos_token_id=0)
    for name, seed in (("ga", 7), ("gb", 8)):
        torch.manual_seed(seed)
        out[name] = _save_hf(transformers.GPT2LMHeadModel(g), root / f"gpt2_{name}")
    bc = transformers.BertConfig(hidden_size=8, num_hidden_layers=3, num_attention_heads=2,
                                 intermediate_size=16, vocab_size=16, max_position_embeddings=12)
    for name, seed in (("ba", 9), ("bb", 10)):
        torch.manual_seed(seed)
        out[name] = _save_hf(transformers.BertForMaskedLM(bc), root / f"bert_{name}")
    return out


def handmade(path: Path, tensors: dict[str, torch.Tensor], config: dict | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def toy(path: Path, seed: int, *, layers: int = 3, hidden: int = 4, vocab: int = 10,
        prefix: str = "model.layers", extra: dict | None = None, drop: tuple = (),
        dtype=torch.float32, config: dict | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g),
         "model.norm.weight": torch.randn(hidden, generator=g),
         "lm_head.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        t[f"{prefix}.{i}.attn.q.weight"] = torch.randn(hidden, hidden, generator=g)
        t[f"{prefix}.{i}.norm.weight"] = torch.randn(hidden, generator=g)
    t = {k: v.to(dtype) for k, v in t.items() if k not in drop}
    t.update(extra or {})
    cfg = {"architectures": ["ToyForCausalLM"], "num_hidden_layers": layers,
           "vocab_size": vocab, "torch_dtype": "float32"}
    cfg.update(config or {})
    return handmade(path, t, cfg)


def plan_for(text: str, **kw) -> MergePlan:
    cfg = parse_config(y(text))
    return build_plan(cfg, open_checkpoints(cfg.models_to_open()), **kw)


def plan_problems(text: str, **kw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        plan_for(text, **kw)
    return info.value.problems


def has(lines: list[str], *parts: str) -> bool:
    return any(all(p in line for p in parts) for line in lines)


# ----- mergekit's planner, for comparison --------------------------------------------------------


def mergekit_plan(text: str):
    mk_config = pytest.importorskip("mergekit.config")
    from mergekit.architecture import get_architecture_info
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    mc = mk_config.MergeConfiguration.model_validate(yaml.safe_load(y(text)))
    opts = MergeOptions()
    arch = get_architecture_info(mc, opts)
    out_cfg = _model_out_config(mc, arch)
    planner = MergePlanner(mc, arch, opts, out_cfg)
    planner._plan()
    out = {}
    for weight, task in planner._tensors:
        gather = task.gather_tensors
        out[weight.name] = {
            "order": [str(m) for m in task.model_order],
            "inputs": {str(m): w.name for m, w in gather.weight_info.items()},
            "glob": dict(task.parameters.items()),
            "per": {str(m): dict(v.items()) for m, v in task.input_parameters.items()},
            "base": str(task.base_model) if task.base_model else None,
        }
    return out, out_cfg


def assert_same_as_mergekit(ours: MergePlan, mk: dict, *, extra_ok: frozenset = frozenset()):
    names = {t.name for t in ours.tensors}
    assert set(mk) <= names
    assert names - set(mk) <= extra_ok, names - set(mk)
    spec = METHODS[ours.method]
    for t in ours.tensors:
        if t.name not in mk:
            continue
        m = mk[t.name]
        assert [i.model for i in t.inputs] == m["order"], t.name
        assert {i.model: i.info.name for i in t.inputs} == m["inputs"], t.name
        glob = dict(t.global_params)
        if ours.method == "passthrough":
            glob.pop("scale")
        assert glob == m["glob"], t.name
        for k, inp in enumerate(t.inputs):
            per = {p.name: t.input_params[p.name][k] for p in spec.input_params
                   if not (p.scope == NON_BASE and k == t.base_index)}
            assert per == m["per"][inp.model], (t.name, inp.model)
        if spec.needs_base:
            assert t.inputs[t.base_index].model == m["base"], t.name


def assert_output_order(plan: MergePlan):
    kinds = ["pre" if t.layer is None and is_pre_layer_name(t.name) else
             "layer" if t.layer is not None else "post" for t in plan.tensors]
    rank = {"pre": 0, "layer": 1, "post": 2}
    assert [rank[k] for k in kinds] == sorted(rank[k] for k in kinds)
    layers = [t.layer for t in plan.tensors if t.layer is not None]
    assert layers == sorted(layers)


# ----- layout --------------------------------------------------------------------------------------


def test_layer_detection_is_generic():
    names = ["transformer.wte.weight", "transformer.h.0.attn.w", "transformer.h.1.attn.w",
             "transformer.h.10.attn.w"] + [f"transformer.h.{i}.attn.w" for i in range(2, 10)] + [
        "transformer.ln_f.weight", "proj.0.weight", "proj.2.weight",
        "model.layers.3.mlp.experts.7.w1"]
    lay = detect_layout(names)
    assert list(lay.stacks) == ["transformer.h"] and lay.num_layers == 11
    assert lay.main.rests[10] == ["attn.w"]
    assert lay.pre == ["transformer.wte.weight"]
    # proj.{0,2} and a lone layer 3 are not layer stacks
    assert set(lay.post) == {"transformer.ln_f.weight", "proj.0.weight", "proj.2.weight",
                             "model.layers.3.mlp.experts.7.w1"}
    assert split_layer_name("model.decoder.layers.12.fc1.weight") == (
        "model.decoder.layers", 12, "fc1.weight")
    assert split_layer_name("lm_head.weight") is None
    two = detect_layout([f"vision.layers.{i}.w" for i in range(6)] +
                        [f"model.layers.{i}.w" for i in range(4)], expected_layers=4)
    assert two.main.prefix == "model.layers" and len(two.stacks) == 2
    assert detect_layout([f"vision.layers.{i}.w" for i in range(6)] +
                         [f"model.layers.{i}.w" for i in range(4)]).main.prefix == "vision.layers"


def test_pre_post_split_matches_mergekit_architecture_files():
    """Embeddings before the layers, norms and heads after, as mergekit's JSON definitions of
    text models say."""
    arch_dir = Path(pytest.importorskip("mergekit._data.architectures").__file__).parent
    checked = 0
    for fname in ("llama.json", "mistral.json", "qwen2.json", "gemma2.json", "gpt2.json",
                  "gpt-neox.json", "bert.json", "bert-masked-lm.json", "distilbert.json",
                  "phi3.json", "falcon.json", "roberta.json", "starcoder2.json", "t5.json"):
        path = arch_dir / fname
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        for key, pre in (("pre_weights", True), ("post_weights", False)):
            for entry in _find(data, key):
                if "${" not in entry["name"]:
                    assert is_pre_layer_name(entry["name"]) is pre, (fname, entry["name"])
                    checked += 1
    assert checked > 40


def _find(obj, key):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield from v
            else:
                yield from _find(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _find(v, key)


# ----- plans vs mergekit's ---------------------------------------------------------------------------


def test_ties_models_form_matches_mergekit(models):
    text = f"""
        merge_method: ties
        base_model: {models['a']}
        models:
          - model: {models['a']}
            parameters: {{weight: 5, density: 0.1}}
          - model: {models['b']}
            parameters:
              weight: [0, 0.3, 1]
              density: [{{filter: self_attn, value: [0.2, 0.9]}}, {{value: 0.7}}]
          - model: {models['c']}
            parameters: {{weight: [{{filter: mlp, value: 0.4}}]}}
        parameters:
          weight: 0.25
          normalize: [{{filter: norm, value: false}}, {{value: true}}]
          lambda: [1, 2]
        dtype: bfloat16
    """
    ours = plan_for(text)
    mk, mk_cfg = mergekit_plan(text)
    assert_same_as_mergekit(ours, mk)
    assert_output_order(ours)
    t = ours.tensor("model.layers.3.self_attn.q_proj.weight")
    assert t.u == 1.0 and t.layer == 3 and t.base_index == 0
    assert t.input_params["weight"] == [None, 1.0, 0.25]
    assert t.input_params["density"] == [None, 0.9, 1.0]
    assert t.global_params["lambda"] == 2.0
    assert ours.tensor("model.embed_tokens.weight").u == 0.0
    assert ours.tensor("lm_head.weight").global_params["lambda"] == 1.0  # u = 0 after layers
    assert all(t.out_dtype == "BF16" and t.compute_dtype == "bfloat16" for t in ours.tensors)
    assert ours.output_config["num_hidden_layers"] == mk_cfg.num_hidden_layers == 4
    dtype_keys = [k for k in ("torch_dtype", "dtype") if k in ours.output_config]
    assert dtype_keys and all(ours.output_config[k] == "bfloat16" for k in dtype_keys)
    assert ours.tokenizer_path == str(models["a"])
    assert ours.models == [str(models[k]) for k in "abc"]


def test_slerp_two_slices_u_positions_match_mergekit(models):
    a, d6 = models["a"], models["d6"]
    text = f"""
        merge_method: slerp
        base_model: {a}
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 2]
              - model: {d6}
                layer_range: [3, 5]
            parameters:
              t: [0, 1]
          - sources:
              - model: {a}
                layer_range: [1, 4]
              - model: {d6}
                layer_range: [0, 3]
        parameters:
          t: [{{filter: self_attn, value: [0, 1]}}, {{value: 0.3}}]
    """
    ours = plan_for(text)
    mk, mk_cfg = mergekit_plan(text)
    assert_same_as_mergekit(ours, mk)
    assert_output_order(ours)
    assert ours.num_layers == 5 == mk_cfg.num_hidden_layers
    assert ours.output_config["num_hidden_layers"] == 5
    # t: [0, 1] makes t equal to u; slice 0 has 2 layers (u = 0, 1), slice 1 has 3
    want_u = {0: 0.0, 1: 1.0, 2: 0.0, 3: 0.5, 4: 1.0}
    for t in ours.tensors:
        if t.layer is None:
            assert t.u == 0.0
            continue
        assert t.u == want_u[t.layer], t.name
        if t.layer < 2 or "self_attn" in t.name:
            assert t.global_params["t"] == want_u[t.layer], t.name
    q = ours.tensor("model.layers.3.self_attn.q_proj.weight")
    assert [i.info.name for i in q.inputs] == ["model.layers.2.self_attn.q_proj.weight",
                                               "model.layers.1.self_attn.q_proj.weight"]
    assert [i.model for i in q.inputs] == [str(a), str(d6)]
    # embeddings come from the first slice, the final norm from the last (at u = 0)
    assert ours.tensor("model.embed_tokens.weight").global_params["t"] == 0.0
    assert ours.tensor("model.norm.weight").global_params["t"] == 0.3


def test_slices_precedence_matches_mergekit(models):
    a, b, c = models["a"], models["b"], models["c"]
    text = f"""
        merge_method: ties
        base_model: {a}
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 2]
              - model: {b}
                layer_range: [2, 4]
                parameters:
                  weight: [{{filter: mlp, value: 0.9}}]
                  density: 0.4
              - model: {c}
                layer_range: [1, 3]
            parameters: {{weight: 0.3, density: [0.5, 0.7], lambda: 1.5}}
          - sources:
              - model: {a}
                layer_range: [2, 4]
              - model: {b}
                layer_range: [0, 2]
              - model: {c}
                layer_range: [2, 4]
                parameters: {{weight: 0.8}}
        parameters: {{weight: 0.1, density: 0.9, normalize: false, lambda: [0.5, 1]}}
    """
    ours = plan_for(text)
    mk, mk_cfg = mergekit_plan(text)
    assert_same_as_mergekit(ours, mk)
    assert ours.num_layers == mk_cfg.num_hidden_layers == 4
    up = ours.tensor("model.layers.1.mlp.up_proj.weight")
    assert up.input_params["weight"] == [None, 0.9, 0.3]  # source > slice
    assert up.input_params["density"] == [None, 0.4, 0.7]
    q = ours.tensor("model.layers.1.self_attn.q_proj.weight")
    assert q.input_params["weight"] == [None, 0.3, 0.3]  # no filter matched: the slice's
    assert q.global_params["lambda"] == 1.5
    q3 = ours.tensor("model.layers.3.self_attn.q_proj.weight")
    assert q3.input_params["weight"] == [None, 0.1, 0.8]  # top level < source
    assert q3.global_params == {"int8_mask": False, "normalize": False, "rescale": False,
                                "lambda": 1.0}


def test_dare_and_breadcrumbs_match_mergekit(models):
    for method in ("dare_ties", "breadcrumbs_ties", "task_arithmetic", "dare_linear"):
        text = f"""
            merge_method: {method}
            base_model: {models['c']}
            models:
              - model: {models['a']}
                parameters: {{weight: 0.6, density: [0.3, 0.6], gamma: 0.02}}
              - model: {models['b']}
                parameters: {{weight: [{{filter: mlp, value: -0.5}}, {{value: 0.5}}]}}
            parameters: {{density: 0.8, rescale: [{{filter: up_proj, value: false}}]}}
        """
        if method in ("task_arithmetic", "dare_linear"):
            text = text.replace(", gamma: 0.02", "")
        ours = plan_for(text)
        mk, _ = mergekit_plan(text)
        assert_same_as_mergekit(ours, mk)
        base = ours.tensor("model.layers.0.mlp.up_proj.weight")
        assert base.inputs[base.base_index].model == str(models["c"])
        assert base.base_index == 2  # an unlisted base model is the last input


def test_linear_and_passthrough_match_mergekit(models):
    text = f"""
        merge_method: linear
        models:
          - model: {models['a']}
            parameters: {{weight: [1, 3]}}
          - model: {models['b']}
            parameters: {{weight: 2}}
        parameters: {{normalize: false}}
    """
    ours = plan_for(text)
    mk, _ = mergekit_plan(text)
    assert_same_as_mergekit(ours, mk)
    assert ours.tensors[0].base_index is None
    a, d6 = models["a"], models["d6"]
    text = f"""
        merge_method: passthrough
        slices:
          - sources: [{{model: {d6}, layer_range: [0, 4]}}]
          - sources: [{{model: {a}, layer_range: [2, 4]}}]
            parameters: {{scale: [{{filter: o_proj, value: 0.5}}]}}
          - sources: [{{model: {d6}, layer_range: [4, 6]}}]
        dtype: float16
    """
    ours = plan_for(text)
    mk, mk_cfg = mergekit_plan(text)
    assert_same_as_mergekit(ours, mk)
    assert ours.num_layers == mk_cfg.num_hidden_layers == 8
    assert ours.output_config["num_hidden_layers"] == 8
    o = ours.tensor("model.layers.5.self_attn.o_proj.weight")
    assert o.global_params["scale"] == 0.5 == o.input_params["scale"][0]
    assert o.inputs[0].info.name == "model.layers.3.self_attn.o_proj.weight"
    assert ours.tensor("model.layers.6.self_attn.o_proj.weight").global_params["scale"] is None
    # embeddings from the first slice's model, lm_head from the last one's
    assert ours.tensor("model.embed_tokens.weight").inputs[0].model == str(d6)
    assert all(t.out_dtype == "F16" for t in ours.tensors)


def test_gpt2_plan_matches_mergekit(models):
    text = f"""
        merge_method: ties
        base_model: {models['ga']}
        models:
          - model: {models['gb']}
            parameters: {{weight: [0, 1], density: 0.5}}
    """
    ours = plan_for(text)
    mk, _ = mergekit_plan(text)
    assert_same_as_mergekit(ours, mk)
    assert_output_order(ours)
    assert "lm_head.weight" not in {t.name for t in ours.tensors}  # tied
    assert ours.tensor("transformer.h.2.mlp.c_fc.weight").u == 1.0
    assert ours.tensor("transformer.wpe.weight").u == 0.0
    text = f"""
        merge_method: passthrough
        slices:
          - sources: [{{model: {models['ga']}, layer_range: [0, 3]}}]
          - sources: [{{model: {models['gb']}, layer_range: [1, 3]}}]
        out_dtype: bfloat16
    """
    ours = plan_for(text)
    mk, mk_cfg = mergekit_plan(text)
    assert_same_as_mergekit(ours, mk)
    assert ours.output_config["n_layer"] == mk_cfg.n_layer == 5
    assert "num_hidden_layers" not in ours.output_config
    assert ours.tensor("transformer.h.4.ln_1.weight").inputs[0].info.name == \
        "transformer.h.2.ln_1.weight"


def test_bert_plan_matches_mergekit(models):
    text = f"""
        merge_method: linear
        models:
          - model: {models['ba']}
            parameters: {{weight: 1}}
          - model: {models['bb']}
            parameters: {{weight: [{{filter: attention, value: [2, 4]}}, {{value: 1}}]}}
    """
    ours = plan_for(text)
    mk, _ = mergekit_plan(text)
    # mergekit's BERT-MLM definition leaves out the prediction head's transform layer;
    # mergecore takes every tensor the checkpoints hold
    held = open_checkpoint(models["ba"]).tensors
    extra = frozenset(n for n in held if n.startswith("cls.predictions.transform"))
    assert extra
    # ... and plans an (optional) pooler that BertForMaskedLM checkpoints do not have
    assert {n for n in mk if n not in held} == {"bert.pooler.dense.weight",
                                                "bert.pooler.dense.bias"}
    mk = {n: v for n, v in mk.items() if n in held}
    assert_same_as_mergekit(ours, mk, extra_ok=extra)
    assert_output_order(ours)
    q = ours.tensor("bert.encoder.layer.1.attention.self.query.weight")
    assert q.u == 0.5 and q.input_params["weight"] == [1.0, 3.0]


def test_tied_embeddings_just_work(models):
    plan = plan_for(f"""
        merge_method: slerp
        base_model: {models['ta']}
        models: [{{model: {models['ta']}}}, {{model: {models['tb']}}}]
        parameters: {{t: 0.5}}
    """)
    names = {t.name for t in plan.tensors}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert plan.output_config["tie_word_embeddings"] is True


# ----- planner behaviour on hand-made checkpoints ------------------------------------------------------


def test_int64_tensor_is_copied_from_the_base(tmp_path):
    pos = torch.arange(12, dtype=torch.int64).reshape(1, 12)
    a = toy(tmp_path / "a", 1, extra={"model.embed_positions.position_ids": pos})
    b = toy(tmp_path / "b", 2, extra={"model.embed_positions.position_ids": pos + 1})
    plan = plan_for(f"""
        merge_method: task_arithmetic
        base_model: {b}
        models: [{{model: {a}, parameters: {{weight: 1}}}}]
        dtype: bfloat16
    """)
    t = plan.tensor("model.embed_positions.position_ids")
    assert t.method == "copy" and t.out_dtype == "I64" and t.compute_dtype is None
    assert [i.model for i in t.inputs] == [str(b)] and t.shape == (1, 12)
    assert plan.tensors[0].name in ("model.embed_tokens.weight",
                                    "model.embed_positions.position_ids")
    # a float tensor in one model, or another integer dtype: a problem naming both dtypes
    for seed, other, expected in ((3, pos.float(), ("floating point in some models", "F32")),
                                  (4, pos.int(), ("dtypes differ", "I32"))):
        c = toy(tmp_path / f"c{seed}", seed, extra={"model.embed_positions.position_ids": other})
        probs = plan_problems(f"""
            merge_method: task_arithmetic
            base_model: {b}
            models: [{{model: {c}, parameters: {{weight: 1}}}}]
        """)
        assert has(probs, "tensor 'model.embed_positions.position_ids'", *expected,
                   f"'{b}': I64"), probs


def test_out_dtype_defaults_to_promoted_input_dtype(tmp_path):
    a = toy(tmp_path / "a", 1, dtype=torch.bfloat16)
    b = toy(tmp_path / "b", 2, dtype=torch.float16)
    c = toy(tmp_path / "c", 3, dtype=torch.bfloat16)
    text = f"""
        merge_method: linear
        models: [{{model: {a}}}, {{model: MODEL}}]
        parameters: {{weight: 1}}
    """
    assert {t.out_dtype for t in plan_for(text.replace("MODEL", str(c))).tensors} == {"BF16"}
    plan = plan_for(text.replace("MODEL", str(b)))
    assert {t.out_dtype for t in plan.tensors} == {"F32"}
    assert plan.output_config["torch_dtype"] == "float32"  # untouched: no dtype given
    plan = plan_for(text.replace("MODEL", str(b)), out_dtype="fp16")
    assert {t.out_dtype for t in plan.tensors} == {"F16"}
    assert plan.output_config["torch_dtype"] == "float16"


def test_vocab_mismatch_merges_the_common_rows(tmp_path, caplog):
    a = toy(tmp_path / "a", 1, vocab=10)
    b = toy(tmp_path / "b", 2, vocab=13)
    plan = plan_for(f"""
        merge_method: ties
        base_model: {b}
        models: [{{model: {a}, parameters: {{weight: 1, density: 0.5}}}}, {{model: {b}}}]
    """)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        t = plan.tensor(name)
        assert t.shape == (10, 4)
        assert [(i.model, i.rows) for i in t.inputs] == [(str(a), None), (str(b), 10)]
        assert t.inputs[1].info.shape == (13, 4)
    assert plan.tensor("model.norm.weight").inputs[1].rows is None
    assert plan.output_config["vocab_size"] == 10
    assert has(plan.warnings, "vocabularies differ", "first 10 rows")


def test_shape_missing_tensor_and_layer_count_problems_all_reported(tmp_path):
    a = toy(tmp_path / "a", 1)
    wide = toy(tmp_path / "wide", 2, hidden=6)
    few = toy(tmp_path / "few", 3, drop=("model.layers.1.norm.weight", "lm_head.weight",
                                         "model.layers.2.norm.weight"))
    short = toy(tmp_path / "short", 4, layers=2)
    probs = plan_problems(f"""
        merge_method: linear
        models:
          - model: {a}
          - model: {wide}
          - model: {few}
        parameters: {{weight: 1}}
    """)
    shape_lines = [p for p in probs if "shapes differ" in p]
    assert len(shape_lines) == 1  # one line for all the tensors, not one per tensor
    assert has(shape_lines, "tensors 'model.embed_tokens.weight'", "and 1 more",
               f"reference model '{a}' and '{wide}'", "[10, 6]", "[10, 4]")
    assert has(probs, f"model '{few}'", "lacks 3 tensors", "'model.layers.1.norm.weight'",
               "'lm_head.weight'")
    probs = plan_problems(f"""
        merge_method: linear
        models: [{{model: {a}}}, {{model: {short}}}]
        parameters: {{weight: 1}}
    """)
    assert has(probs, f"model '{short}'", "has 2 layers", "'model.layers'", "has 3")


def test_yaml_problems_come_with_the_header_problems_of_every_plannable_document(tmp_path):
    """A recipe whose first stage lacks a parameter and a tensor, and uses two models of
    other layer counts: one ConfigError lists the YAML problem and the header problems
    (load_config plans each document it can); the stage that uses stage1 is not planned,
    and a document that lost a models entry to its own problems is not planned either (its
    key paths would shift)."""
    a = toy(tmp_path / "a", 1)
    few = toy(tmp_path / "few", 2, drop=("lm_head.weight",))
    short = toy(tmp_path / "short", 3, layers=2)
    path = tmp_path / "recipe.yml"
    path.write_text(y(f"""
        name: stage1
        merge_method: linear
        models: [{{model: {a}}}, {{model: {few}}}]
        ---
        name: stage2
        merge_method: linear
        models: [{{model: {a}}}, {{model: {short}}}, {{modle: {few}}}]
        parameters: {{weight: 1}}
        ---
        merge_method: linear
        models: [{{model: stage1}}, {{model: {short}}}]
        parameters: {{weight: 1}}
    """))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    probs = info.value.problems
    assert has(probs, "stage1", "missing required parameter 'weight'")
    assert has(probs, f"model '{few}'", "lacks 1 tensor", "'lm_head.weight'")
    assert has(probs, "stage2", "models[2]", "modle")
    assert not has(probs, f"model '{short}'", "has 2 layers"), probs  # stage2 not planned
    assert str(path) in str(info.value)
    # without the YAML problems, planning finds the rest in the usual order
    path.write_text(path.read_text().replace("modle", "model"))
    with pytest.raises(ConfigError) as info:
        load_config(path, check_inputs=False)
    assert not has(info.value.problems, "lacks 1 tensor")


def _load_problems(path: Path, text: str) -> list[str]:
    path.write_text(y(text))
    with pytest.raises(ConfigError) as info:
        load_merge(path)
    assert str(path) in str(info.value)
    return info.value.problems


def test_a_model_that_does_not_open_does_not_hide_the_others_problems(tmp_path):
    """One run lists the missing model and what the models that did open show."""
    a = toy(tmp_path / "a", 1)
    wide = toy(tmp_path / "wide", 2, hidden=6)
    few = toy(tmp_path / "few", 3, drop=("lm_head.weight",))
    gone = tmp_path / "gone"
    probs = _load_problems(tmp_path / "c.yml", f"""
        merge_method: ties
        base_model: {a}
        models:
          - model: {gone}
            parameters: {{weight: 1, density: 0.5}}
          - model: {wide}
            parameters: {{weight: 1, density: 0.5}}
          - model: {few}
            parameters: {{weight: 1, density: 0.5}}
    """)
    assert has(probs, f"model '{gone}'", "does not exist")
    assert has(probs, "shapes differ", f"reference model '{a}' and '{wide}'")
    assert has(probs, f"model '{few}'", "lacks 1 tensor", "'lm_head.weight'")
    assert not has(probs, f"'{gone}'", "lacks") and len(probs) == 3, probs
    # slices: the other source of the slice is still checked against its layer_range
    probs = _load_problems(tmp_path / "s.yml", f"""
        merge_method: slerp
        base_model: {a}
        slices:
          - sources: [{{model: {a}, layer_range: [1, 4]}}, {{model: {gone}, layer_range: [0, 3]}}]
        parameters: {{t: 0.5}}
    """)
    assert has(probs, "slices[0].sources[0].layer_range", "[1, 4) is out of bounds")
    assert len(probs) == 2, probs


def test_a_document_that_uses_a_stage_is_checked_against_the_stages_output(tmp_path):
    """A YAML problem (an unknown key) in a recipe does not hide a layer_range past the end of
    a stage's output, nor a shape that differs from it: the stage is planned first and the
    document that uses it is planned against what it would output."""
    a = toy(tmp_path / "a", 1)
    b = toy(tmp_path / "b", 2)
    wide = toy(tmp_path / "wide", 3, hidden=6)
    path = tmp_path / "recipe.yml"
    path.write_text(y(f"""
        name: stage1
        merge_method: linear
        models: [{{model: {a}}}, {{model: {b}}}]
        parameters: {{weight: 1}}
        ---
        merge_method: linear
        slices:
          - sources: [{{model: stage1, layer_range: [1, 4]}}, {{model: {b}, layer_range: [0, 3]}}]
        parameters: {{weight: 1}}
        ---
        name: stage3
        merge_method: linear
        models: [{{model: stage1}}, {{model: {wide}}}]
        parameters: {{weight: 1}}
        tokenizer_sauce: base
    """))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    probs = info.value.problems
    assert has(probs, "document 3 (name: stage3): tokenizer_sauce")  # labelled as below
    assert has(probs, "document 2 (final)", "slices[0].sources[0].layer_range",
               "[1, 4) is out of bounds", "'stage1' has 3 layers")
    assert has(probs, "document 3 (name: stage3)", "shapes differ", "'stage1'", f"'{wide}'")
    assert len(probs) == 3, probs


def test_a_recipe_stage_with_a_missing_input_still_checks_its_other_inputs(tmp_path):
    from mergecore.recipes import load_recipe

    a = toy(tmp_path / "a", 1)
    few = toy(tmp_path / "few", 2, drop=("lm_head.weight",))
    gone = tmp_path / "gone"
    path = tmp_path / "recipe.yml"
    path.write_text(y(f"""
        name: stage1
        merge_method: linear
        models: [{{model: {a}}}, {{model: {few}}}, {{model: {gone}}}]
        parameters: {{weight: 1}}
        ---
        merge_method: linear
        models: [{{model: stage1}}, {{model: {a}}}]
        parameters: {{weight: 1}}
    """))
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    probs = info.value.problems
    assert has(probs, "stage1", f"model '{gone}'", "does not exist")
    assert has(probs, "stage1", f"model '{few}'", "lacks 1 tensor", "'lm_head.weight'")
    assert len(probs) == 2, probs  # the final document waits for stage1


def test_models_left_out_give_no_made_up_problems(tmp_path):
    """Without its base a delta merge is not checked at all; a linear merge whose remaining
    weights sum to 0 is not called a normalization problem (the missing one has weight 1)."""
    a = toy(tmp_path / "a", 1)
    b = toy(tmp_path / "b", 2)
    gone = tmp_path / "gone"
    probs = _load_problems(tmp_path / "t.yml", f"""
        merge_method: ties
        base_model: {gone}
        models: [{{model: {a}}}, {{model: {b}}}]
        parameters: {{weight: 1, density: 0.5}}
    """)
    assert len(probs) == 1 and has(probs, f"model '{gone}'", "does not exist"), probs
    probs = _load_problems(tmp_path / "l.yml", f"""
        merge_method: linear
        models:
          - {{model: {a}, parameters: {{weight: 1}}}}
          - {{model: {b}, parameters: {{weight: -1}}}}
          - {{model: {gone}, parameters: {{weight: 1}}}}
    """)
    assert len(probs) == 1 and has(probs, f"model '{gone}'", "does not exist"), probs


def test_a_parameter_the_yaml_rejects_does_not_hide_the_planners_value_checks(tmp_path):
    """``weight: .nan`` is the YAML check's; a density that keeps nothing of a small tensor
    (of another model) is the planner's: one run lists both."""
    a = toy(tmp_path / "a", 1)
    b = toy(tmp_path / "b", 2)
    c = toy(tmp_path / "c", 3)
    path = tmp_path / "c.yml"
    path.write_text(y(f"""
        merge_method: ties
        base_model: {a}
        models:
          - model: {b}
            parameters: {{weight: .nan, density: 0.5}}
          - model: {c}
            parameters: {{weight: 1, density: 0.01}}
    """))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    probs = info.value.problems
    assert has(probs, "models[0].parameters.weight", "not a finite number")
    assert has(probs, "tensors 'model.embed_tokens.weight'",
               f"model '{c}': density 0.01 keeps int(density * numel) = 0 entries")
    assert not has(probs, f"model '{b}': density"), probs
    assert len(probs) == 2, probs


def test_missing_tensors_are_summarised(tmp_path):
    a = toy(tmp_path / "a", 1, layers=12)
    b = toy(tmp_path / "b", 2, layers=12,
            drop=tuple(f"model.layers.{i}.norm.weight" for i in range(12)))
    probs = plan_problems(f"""
        merge_method: task_arithmetic
        base_model: {a}
        models: [{{model: {b}, parameters: {{weight: 1}}}}]
    """)
    assert probs == [(f"model '{b}': lacks 12 tensors the merge needs: "
                     "'model.layers.0.norm.weight', 'model.layers.1.norm.weight', "
                     "'model.layers.2.norm.weight', 'model.layers.3.norm.weight', "
                     "'model.layers.4.norm.weight' and 7 more")]


def test_layer_range_out_of_bounds_and_config_cross_check(tmp_path):
    a = toy(tmp_path / "a", 1, layers=4)
    b = toy(tmp_path / "b", 2, layers=4)
    probs = plan_problems(f"""
        merge_method: slerp
        base_model: {a}
        slices:
          - sources: [{{model: {a}, layer_range: [0, 3]}}, {{model: {b}, layer_range: [2, 5]}}]
          - sources: [{{model: {a}, layer_range: [3, 6]}}, {{model: {b}, layer_range: [0, 3]}}]
        parameters: {{t: 0.5}}
    """)
    assert has(probs, "slices[0].sources[1].layer_range", "[2, 5) is out of bounds", "4 layers")
    assert has(probs, "slices[1].sources[0].layer_range", "[3, 6)")
    bad = toy(tmp_path / "bad", 3, layers=4, config={"num_hidden_layers": 5})
    probs = plan_problems(f"""
        merge_method: linear
        models: [{{model: {a}}}, {{model: {bad}}}]
        parameters: {{weight: 1}}
    """)
    assert has(probs, f"model '{bad}'", "num_hidden_layers = 5", "4 under 'model.layers'")


def test_per_tensor_parameter_problems(tmp_path):
    a = toy(tmp_path / "a", 1)
    b = toy(tmp_path / "b", 2)
    probs = plan_problems(f"""
        merge_method: linear
        models:
          - model: {a}
            parameters: {{weight: [{{filter: attn, value: 1}}, {{value: 1}}]}}
          - model: {b}
            parameters: {{weight: [{{filter: attn, value: -1}}, {{filter: embed, value: 1}}]}}
    """)
    assert has(probs, "linear with normalize: the weights sum to 0",
               "'model.layers.0.attn.q.weight'", "'model.layers.2.attn.q.weight'")
    assert has(probs, "models", "missing required parameter 'weight'", str(b),
               "'model.norm.weight'")
    # ties: density * numel < 1 keeps nothing of the 4-element norm vectors
    probs = plan_problems(f"""
        merge_method: ties
        base_model: {a}
        models: [{{model: {b}, parameters: {{weight: 1, density: 0.2}}}}]
    """)
    assert has(probs, f"model '{b}'", "density 0.2 keeps int(density * numel) = 0",
               "'model.norm.weight'", "'model.layers.0.norm.weight'")
    assert not has(probs, "attn.q.weight")  # 0.2 * 16 = 3 entries kept
    # the same density is fine for DARE, which drops at random
    plan_for(f"""
        merge_method: dare_ties
        base_model: {a}
        models: [{{model: {b}, parameters: {{weight: 1, density: 0.2}}}}]
    """)


def test_base_listed_among_models_is_only_the_base(tmp_path):
    a = toy(tmp_path / "a", 1)
    b = toy(tmp_path / "b", 2)
    plan = plan_for(f"""
        merge_method: ties
        base_model: {a}
        models:
          - model: {b}
            parameters: {{weight: 0.5, density: 0.5}}
          - model: {a}
            parameters: {{weight: 0.9, density: 0.1}}
    """)
    t = plan.tensor("model.layers.1.attn.q.weight")
    assert [i.model for i in t.inputs] == [str(b), str(a)] and t.base_index == 1
    assert t.input_params == {"weight": [0.5, None], "density": [0.5, None]}
    # for linear a base model has no special role: its weight counts
    plan = plan_for(f"""
        merge_method: linear
        base_model: {a}
        models: [{{model: {b}, parameters: {{weight: 1}}}}, {{model: {a}, parameters: {{weight: 3}}}}]
    """)
    t = plan.tensor("model.layers.1.attn.q.weight")
    assert t.base_index is None and t.input_params["weight"] == [1.0, 3.0]


def test_input_bytes_count_each_tensor_once(tmp_path):
    a = toy(tmp_path / "a", 1, layers=2)
    plan = plan_for(f"""
        merge_method: passthrough
        slices:
          - sources: [{{model: {a}, layer_range: [0, 2]}}]
          - sources: [{{model: {a}, layer_range: [0, 2]}}]
    """)
    ckpt = open_checkpoint(a)
    assert plan.total_input_bytes == sum(i.nbytes for i in ckpt.tensors.values())
    layer_bytes = sum(i.nbytes for n, i in ckpt.tensors.items() if ".layers." in n)
    assert plan.total_output_bytes == plan.total_input_bytes + layer_bytes
    assert plan.num_layers == 4 and plan.output_config["num_hidden_layers"] == 4


def test_layer_prefixes_of_other_architectures(tmp_path):
    for prefix in ("encoder.layer", "model.decoder.layers", "transformer.blocks"):
        a = toy(tmp_path / prefix / "a", 1, prefix=prefix, layers=3)
        b = toy(tmp_path / prefix / "b", 2, prefix=prefix, layers=3)
        plan = plan_for(f"""
            merge_method: passthrough
            slices:
              - sources: [{{model: {a}, layer_range: [1, 3]}}]
              - sources: [{{model: {b}, layer_range: [0, 1]}}]
        """)
        assert [t.name for t in plan.tensors if t.layer == 2] == [
            f"{prefix}.2.attn.q.weight", f"{prefix}.2.norm.weight"]
        assert plan.tensor(f"{prefix}.2.norm.weight").inputs[0].info.name == \
            f"{prefix}.0.norm.weight"
        assert plan.tensor(f"{prefix}.2.norm.weight").u == 1.0  # a one-layer slice


def test_architectures_must_agree_unless_crimes(tmp_path):
    a = toy(tmp_path / "a", 1)
    b = toy(tmp_path / "b", 2, config={"architectures": ["OtherForCausalLM"]})
    text = f"""
        merge_method: linear
        models: [{{model: {a}}}, {{model: {b}}}]
        parameters: {{weight: 1}}
    """
    assert has(plan_problems(text), "different architectures", "--allow-crimes")
    assert plan_for(text, allow_crimes=True).tensors


def test_lora_reference_and_missing_paths(tmp_path):
    a = toy(tmp_path / "a", 1)
    lora = tmp_path / "lora"
    lora.mkdir()  # a valid PEFT adapter that changes nothing
    (lora / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 1, "lora_alpha": 1}')
    save_file({}, str(lora / "adapter_model.safetensors"))
    plan = plan_for(f"""
        merge_method: linear
        models: [{{model: {a}+{lora}}}, {{model: {a}}}]
        parameters: {{weight: 1}}
    """)
    t = plan.tensor("model.norm.weight")
    assert [(i.model, i.adapter) for i in t.inputs] == [(f"{a}+{lora}", str(lora)),
                                                        (str(a), None)]
    assert plan.tokenizer_path == str(a)
    with pytest.raises(ConfigError) as info:
        plan_for(f"""
            merge_method: linear
            models: [{{model: {a}+{tmp_path}/nolora}}, {{model: {tmp_path}/nothing}}]
            parameters: {{weight: 1}}
        """)
    probs = info.value.problems
    assert has(probs, f"model '{tmp_path}/nothing'", "does not exist")
    assert has(probs, f"model '{a}+{tmp_path}/nolora'", "LoRA adapter path", "does not exist")


def test_load_merge_end_to_end(tmp_path):
    a = toy(tmp_path / "a", 1)
    b = toy(tmp_path / "b", 2)
    cfg = tmp_path / "merge.yml"
    cfg.write_text(y(f"""
        merge_method: dare_linear
        base_model: {a}
        models: [{{model: {b}, parameters: {{weight: 1, density: 0.5}}}}]
        parameters: {{rescale: inverse_density}}
        random_seed: 11
        tokenizer_source: {b}
    """))
    plan = load_merge(cfg)
    assert plan.random_seed == 11 and load_merge(cfg, random_seed=3).random_seed == 3
    assert plan.tokenizer_path == str(b) and plan.base_model == str(a)
    assert plan.tensor("lm_head.weight").global_params["rescale"] == "inverse_density"
    cfg.write_text(cfg.read_text().replace(str(b), str(tmp_path / "gone")))
    with pytest.raises(ConfigError) as info:
        load_merge(cfg)
    assert str(cfg) in str(info.value) and "gone" in str(info.value)
    cfg.write_text("name: x\nmerge_method: linear\nmodels: [{model: a}]\nparameters: {weight: 1}"
                   "\n---\nmerge_method: linear\nmodels: [{model: x}]\nparameters: {weight: 1}\n")
    with pytest.raises(ConfigError, match="multi-stage recipes"):
        load_merge(cfg)


def test_config_donor_that_is_no_input(tmp_path):
    a = toy(tmp_path / "a", 1, layers=3)
    donor = toy(tmp_path / "donor", 2, layers=3, config={"rope_theta": 1234.0})
    plan = plan_for(f"""
        merge_method: linear
        base_model: {donor}
        slices:
          - sources: [{{model: {a}, layer_range: [0, 2]}}]
        parameters: {{weight: 1}}
    """)
    assert plan.models == [str(a)]
    assert {i.model for t in plan.tensors for i in t.inputs} == {str(a)}
    assert plan.output_config["rope_theta"] == 1234.0
    assert plan.output_config["num_hidden_layers"] == 2
    assert plan.tokenizer_path == str(donor)


def test_models_form_with_two_layer_stacks(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"vision.blocks.{i}.w": torch.randn(3, generator=g) for i in range(5)}
    tensors |= {f"model.layers.{i}.w": torch.randn(3, generator=g) for i in range(3)}
    tensors["model.embed_tokens.weight"] = torch.randn(7, 3, generator=g)
    cfg = {"architectures": ["ToyVLM"], "text_config": {"num_hidden_layers": 3}}
    a = handmade(tmp_path / "a", tensors, cfg)
    b = handmade(tmp_path / "b", {k: v + 1 for k, v in tensors.items()}, cfg)
    plan = plan_for(f"""
        merge_method: slerp
        base_model: {a}
        models: [{{model: {a}}}, {{model: {b}}}]
        parameters: {{t: [0, 1]}}
    """)
    assert plan.num_layers == 3
    assert plan.tensor("model.layers.1.w").global_params["t"] == 0.5
    assert plan.tensor("vision.blocks.1.w").global_params["t"] == 0.25
    assert plan.tensors[0].name == "model.embed_tokens.weight"
    assert plan.output_config["text_config"]["num_hidden_layers"] == 3
    probs = plan_problems(f"""
        merge_method: passthrough
        slices: [{{sources: [{{model: {a}, layer_range: [0, 2]}}]}}]
    """)
    assert has(probs, "slices[0].sources[0].model", "several layer stacks")
