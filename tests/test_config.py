"""mergekit YAML parsing and parameter resolution, checked against mergekit 0.1.5 itself."""

from __future__ import annotations

import math
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergecore.config import (
    Conditional,
    ConfigError,
    evaluate_setting,
    load_config,
    parse_config,
    parse_documents,
    resolve_parameter,
    stage_dependencies,
    stage_order,
)
from mergecore.config.methods import GLOBAL, INPUT, METHODS, NON_BASE, SUPPORTED_METHODS
from mergecore.config.params import (
    MissingParameterError,
    ParameterValueError,
    interpolate_gradient,
    validate_value,
)

mk_config = pytest.importorskip("mergekit.config")
mk_methods = pytest.importorskip("mergekit.merge_methods")
mk_base = pytest.importorskip("mergekit.merge_methods.base")
from pydantic import TypeAdapter, ValidationError


def y(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_documents(y(text))
    assert isinstance(info.value, ValueError)
    return info.value.problems


def has(problems: list[str], *parts: str) -> bool:
    return any(all(p in line for p in parts) for line in problems)


@pytest.mark.parametrize(("text", "where"), [
    (("base_model: a\nslices:\n  - sources: [{model: a, layer_range: [0, 1.5]},"
     " {model: b, layer_range: [0, 2]}]\n"), "slices[0].sources[0].layer_range"),
    ("base_model: a\nmodels: [{model: a}, {model: 3}]\n", "models[1].model"),
    ("base_model: a\nmodels: [{model: a}, [b]]\n", "models[1]"),
])
def test_a_dropped_input_is_not_also_blamed_as_a_count_or_a_missing_base(text, where):
    """An entry the check cannot read is reported once: not also as 'slerp takes exactly 2
    input models; got 1' or 'the base model must be one of the sources' after it."""
    probs = problems_of("merge_method: slerp\nparameters: {t: 0.5}\n" + text)
    assert len(probs) == 1 and probs[0].startswith(where + ":"), probs


@pytest.mark.parametrize(("params", "where"), [
    ("models: [{model: b, parameters: {weight: [{filter: mlp, value: 1}, 0.5]}}]\n",
     "models[0].parameters.weight"),
    ("models: [{model: b, parameters: 7}]\n", "models[0].parameters"),
    ("models: [{model: b}]\nparameters: {weight: [{filter: mlp}]}\n", "parameters.weight[0]"),
    (("slices:\n  - sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 2]}]\n"
     "    parameters: {weight: .inf}\n"), "slices[0].parameters.weight"),
])
def test_a_rejected_parameter_is_not_also_called_missing(params, where):
    probs = problems_of("merge_method: ties\nbase_model: a\n" + params)
    assert len(probs) == 1 and probs[0].startswith(where + ":"), probs


def test_key_paths_count_entries_as_written_also_after_a_dropped_one():
    """The third source is slices[1].sources[2] even when sources[1] could not be read."""
    probs = problems_of("""
        merge_method: ties
        base_model: a
        slices:
          - sources: [{model: a, layer_range: [0, 2]}]
          - sources:
              - {model: a, layer_range: [2, 4]}
              - {model: b, layer_range: [[], 4], parameters: {weight: 1}}
              - {model: c, layer_range: [2, 4]}
    """)
    assert has(probs, "slices[1].sources[1].layer_range", "pair of integers")
    assert has(probs, "slices[1].sources[2]: missing required parameter 'weight'", "'c'")
    assert len(probs) == 2, probs


def test_a_rejected_parameter_does_not_hide_another_that_is_missing():
    probs = problems_of("merge_method: ties\nbase_model: a\n"
                        "models: [{model: b, parameters: {density: x}}]\n")
    assert has(probs, "models[0].parameters.density", "not a number")
    assert has(probs, "models[0]: missing required parameter 'weight'")


@pytest.mark.parametrize("key", ["base_model", "slices[0].base_model"])
def test_an_invalid_base_model_is_not_also_called_missing(key):
    where = ("base_model: -0.5\nmodels: [{model: a, parameters: {weight: 1}}]\n"
             if key == "base_model" else
             "slices:\n  - base_model: [x]\n    sources: [{model: a, layer_range: [0, 2],"
             " parameters: {weight: 1}}]\n")
    probs = problems_of("merge_method: ties\n" + where)
    assert has(probs, key, "must be a model path") and not has(probs, "needs a base_model"), probs


# ----- parsing: good documents ----------------------------------------------------------------


def test_models_form_parses_every_key():
    cfg = parse_config(y("""
        merge_method: ties
        base_model: base/model
        models:
          - model: a
            parameters:
              weight: [0, 0.5, 1]
              density: [{filter: mlp, value: 0.3}, {value: 0.7}]
          - model: b
        parameters:
          weight: 0.25
          normalize: false
          lambda: "1.5"
        dtype: bfloat16
        out_dtype: float16
        tokenizer_source: base
        chat_template: chatml
        random_seed: 7
    """))
    assert cfg.merge_method == "ties"
    assert cfg.base_model.ref == "base/model"
    assert [m.model.ref for m in cfg.models] == ["a", "b"]
    assert cfg.models[0].parameters["weight"] == [0, 0.5, 1]
    assert cfg.models[0].parameters["density"] == [Conditional(0.3, "mlp"), Conditional(0.7, None)]
    assert cfg.models[1].parameters == {}
    assert cfg.parameters == {"weight": 0.25, "normalize": False, "lambda": "1.5"}
    assert (cfg.dtype, cfg.out_dtype) == ("bfloat16", "float16")
    assert cfg.tokenizer_source == "base"
    assert cfg.chat_template == "chatml"
    assert cfg.random_seed == 7
    assert cfg.slices is None
    assert [r.ref for r in cfg.input_models()] == ["a", "b", "base/model"]
    assert cfg.output_config_model.ref == "base/model"
    assert cfg.warnings == []


def test_slices_form_and_adapter_reference(tmp_path):
    base = tmp_path / "m1"
    base.mkdir()
    cfg = parse_config(y(f"""
        merge_method: passthrough
        slices:
          - sources:
              - model: {base}+{tmp_path}/lora
                layer_range: [0, 4]
          - sources:
              - model: {base}
                layer_range: [2, 6]
                parameters: {{scale: 0.5}}
        dtype: float32
    """))
    s0, s1 = cfg.slices
    ref = s0.sources[0].model
    assert ref.ref == f"{base}+{tmp_path}/lora"
    assert (ref.path, ref.adapter) == (str(base), f"{tmp_path}/lora")
    assert s0.sources[0].layer_range == (0, 4) and s1.num_layers == 4
    assert s1.sources[0].parameters == {"scale": 0.5}
    assert s1.sources[0].model.adapter is None
    # the same path with and without an adapter are two inputs
    assert len(cfg.input_models()) == 2
    assert cfg.output_config_model.ref == ref.ref


@pytest.mark.parametrize("method", SUPPORTED_METHODS)
def test_every_supported_method_parses(method):
    spec = METHODS[method]
    params = {"linear": "weight: 1.0", "slerp": "t: 0.5", "passthrough": "scale: 1.0"}.get(
        method, "weight: 1.0")
    if spec.max_inputs == 1:
        text = f"merge_method: {method}\nmodels:\n  - model: a\nparameters: {{{params}}}\n"
    else:
        text = (f"merge_method: {method}\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n"
                f"parameters: {{{params}}}\n")
    assert parse_config(text).merge_method == method


def test_yaml_scientific_notation_and_bool_strings_are_typed_like_mergekit():
    cfg = parse_config(y("""
        merge_method: dare_ties
        base_model: a
        models: [{model: a}, {model: b, parameters: {weight: 1e-3, density: "5e-1"}}]
        parameters: {normalize: "yes", rescale: "off", int8_mask: 1}
    """))
    assert cfg.models[1].parameters["weight"] == "1e-3"  # PyYAML reads 1e-3 as a string
    w = resolve_parameter(METHODS["dare_ties"].param("weight"), [cfg.models[1].parameters],
                          tensor_name="x")
    assert w == 0.001
    assert resolve_parameter(METHODS["dare_ties"].param("normalize"), [cfg.parameters],
                             tensor_name="x") is True
    assert resolve_parameter(METHODS["dare_ties"].param("rescale"), [cfg.parameters],
                             tensor_name="x") is False


def test_rescale_inverse_density_extension():
    cfg = parse_config(y("""
        merge_method: dare_linear
        base_model: a
        models: [{model: a}, {model: b, parameters: {weight: 1, density: 0.5}}]
        parameters: {rescale: inverse_density}
    """))
    spec = METHODS["dare_linear"].param("rescale")
    assert resolve_parameter(spec, [cfg.parameters], tensor_name="x") == "inverse_density"
    assert resolve_parameter(spec, [{}], tensor_name="x") is True  # DARE default


# ----- parsing: bad documents, all problems at once ---------------------------------------------


def test_all_problems_are_listed_at_once_with_key_paths():
    probs = problems_of("""
        merge_method: slerp
        base_model: a
        slices:
          - sources:
              - model: a
                layer_range: [0, 4]
              - model: b
                layer_range: [0, 4]
          - sources:
              - model: a
                layer_rang: [4, 8]
              - model: b
                layer_range: [4, 9]
                parameters: {t: abc}
        parameters:
          t: [0, {filter: x}]
        dtype: float8
        tokenizer_source: union
        toknizer: foo
        random_seed: -1
    """)
    assert has(probs, "slices[1].sources[0].layer_rang", "unknown key", "layer_range")
    assert has(probs, "slices[1].sources[0].layer_range", "missing")
    assert has(probs, "slices[1].sources[1].parameters.t", "'abc' is not a number")
    assert has(probs, "parameters.t", "mixes plain values")
    assert has(probs, "dtype", "unknown dtype 'float8'")
    assert has(probs, "tokenizer_source", "'union'", "not supported")
    assert has(probs, "toknizer", "unknown key", "tokenizer")
    assert has(probs, "random_seed", "non-negative integer")
    assert len(probs) >= 8
    # the message lists every problem too
    with pytest.raises(ConfigError) as info:
        parse_documents(y("merge_method: nope\nmodels: 3\nfoo: 1\n"))
    msg = str(info.value)
    assert "merge_method" in msg and "models" in msg and "foo" in msg
    assert "3 problems" in msg


def test_unsupported_and_unknown_methods_list_supported_ones():
    for name, kind in (("della", "mergekit method"), ("model_stock", "mergekit method"),
                       ("frobnicate", "unknown method")):
        probs = problems_of(f"merge_method: {name}\nmodels: [{{model: a}}]\n")
        assert has(probs, "merge_method", repr(name), "not supported by mergecore", kind)
        assert all(m in probs[0] for m in SUPPORTED_METHODS)


@pytest.mark.parametrize("text, where, words", [
    ("models: [{model: a, parameters: {weight: 1}}]\n", "merge_method", ["missing"]),
    ("merge_method: linear\n", "", ["exactly one of"]),
    (("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n"
     "slices: [{sources: [{model: a, layer_range: [0, 1]}]}]\nparameters: {weight: 1}\n"),
     "", ["exactly one of", "both"]),
    ("merge_method: linear\nmodels: []\n", "models", ["non-empty list"]),
    ("merge_method: linear\nmodels: [a]\n", "models[0]", ["must be a mapping"]),
    ("merge_method: linear\nmodels: [{parameters: {weight: 1}}]\n", "models[0].model",
     ["missing"]),
    ("merge_method: linear\nmodels: [{model: {path: a}}]\nparameters: {weight: 1}\n",
     "models[0].model", ["string"]),
    ("merge_method: linear\nmodels: [{model: a, weight: 1}]\n", "models[0].weight",
     ["unknown key"]),
    ("merge_method: linear\nmodels: [{model: a}]\nparameters: {weight: 1}\nmodules: {}\n",
     "modules", ["not supported"]),
    ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [3, 3]}]}]\n",
     "slices[0].sources[0].layer_range", ["empty"]),
    ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [0]}]}]\n",
     "slices[0].sources[0].layer_range", ["pair of integers"]),
    ("merge_method: passthrough\nslices: [{sources: []}]\n", "slices[0].sources",
     ["non-empty"]),
    ("merge_method: linear\nmodels: [{model: a}]\nparameters: {weight: 1}\ndtype: float64\n",
     "dtype", ["not supported by mergecore"]),
    (("merge_method: linear\nmodels: [{model: a}]\nparameters: {weight: 1}\n"
     "tokenizer: {source: union}\n"), "tokenizer", ["not supported by mergecore yet"]),
    (("merge_method: linear\nmodels: [{model: a}]\nparameters: {weight: 1}\n"
     "tokenizer_source: base\n"), "tokenizer_source", ["needs a top-level base_model"]),
    ("merge_method: linear\nmodels: [{model: a}]\nparameters: {weight: .nan}\n",
     "parameters.weight", ["not a finite number"]),
    ("merge_method: linear\nmodels: [{model: a}]\nparameters: {weight: [1, [2]]}\n",
     "parameters.weight[1]", ["not allowed"]),
    ("merge_method: linear\nmodels: [{model: a}]\nparameters:\n  weight:\n", "parameters.weight",
     ["has no value"]),
    (("merge_method: linear\nmodels: [{model: a}]\n"
     "parameters: {weight: [{filter: 3, value: 1}]}\n"), "parameters.weight[0].filter",
     ["must be a string"]),
    (("merge_method: linear\nmodels: [{model: a}]\n"
     "parameters: {weight: [{filter: x, value: 1, fliter: y}]}\n"),
     "parameters.weight[0].fliter", ["unknown key"]),
    ("merge_method: linear\nmodels: [{model: a}]\nparameters: {weight: [{filter: x}]}\n",
     "parameters.weight[0]", ["needs a 'value'"]),
    ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]\n", "base_model",
     ["needs a base_model"]),
    ("merge_method: ties\nbase_model: a\nmodels: [{model: b}]\n", "models[0]",
     ["missing required parameter 'weight'", "'b'"]),
    (("merge_method: ties\nbase_model: a\nmodels: [{model: b, parameters: {weight: 1}},"
     " {model: b, parameters: {weight: 1}}]\n"), "models[1]", ["listed twice"]),
    (("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}, {model: c}]\n"
     "parameters: {t: 0.5}\n"), "models", ["exactly 2 input models", "got 3"]),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}]\nparameters: {t: 0.5}\n",
     "models", ["exactly 2", "got 1"]),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n", "parameters",
     ["missing required parameter 't'"]),
    (("merge_method: slerp\nbase_model: a\nslices:\n  - sources: [{model: b, layer_range: [0, 2]},"
     " {model: c, layer_range: [0, 2]}]\nparameters: {t: 0.5}\n"), "slices[0]",
     ["base model 'a' must be one of the sources"]),
    (("merge_method: slerp\nslices:\n  - sources: [{model: b, layer_range: [0, 2]},"
     " {model: c, layer_range: [0, 3]}]\nparameters: {t: 0.5}\n"), "slices[0].sources",
     ["same number of layers"]),
    ("merge_method: passthrough\nbase_model: a\nmodels: [{model: b}]\n", "models",
     ["exactly 1 input model ", "got 2"]),
    # mergekit adds an unlisted base_model as one more input: for linear it needs a weight
    ("merge_method: linear\nbase_model: c\nmodels: [{model: a, parameters: {weight: 1}}]\n",
     "base_model", ["missing required parameter 'weight'", "'c'"]),
])
def test_bad_documents(text, where, words):
    probs = problems_of(text)
    assert any(line.startswith(f"{where}:") if where else True for line in probs), probs
    assert has(probs, *words), probs


def test_duplicate_yaml_keys_are_errors():
    probs = problems_of("merge_method: linear\nmerge_method: ties\nmodels: [{model: a}]\n")
    assert has(probs, "line 2", "'merge_method' appears twice")


def test_invalid_yaml_and_empty_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_documents("merge_method: [linear\n")
    with pytest.raises(ConfigError, match="no YAML document"):
        parse_documents("\n# nothing\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        parse_documents("- a\n- b\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yml")


def test_warnings_for_ignored_parameters(caplog):
    cfg = parse_config(y("""
        merge_method: slerp
        base_model: a
        models:
          - model: a
          - model: b
            parameters: {t: 0.3, weight: 1}
        parameters: {t: 0.5}
    """))
    assert has(cfg.warnings, "models[1].parameters.t", "global parameter", "ignored")
    assert has(cfg.warnings, "models[1].parameters.weight", "has no parameter 'weight'")


def test_load_config_names_the_file(tmp_path):
    p = tmp_path / "merge.yml"
    p.write_text("merge_method: linear\nmodels: [{model: a}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(p) in str(info.value)
    assert "missing required parameter 'weight'" in str(info.value)


# ----- multi-stage recipes ------------------------------------------------------------------------


MULTI = """
name: stage1
merge_method: linear
models:
  - model: a
    parameters: {weight: 1}
  - model: b
    parameters: {weight: 1}
---
merge_method: ties
base_model: stage2
models:
  - model: stage1
    parameters: {weight: 1, density: 0.5}
  - model: stage2
---
name: stage2
merge_method: slerp
base_model: a
models: [{model: a}, {model: stage1+lora_dir}]
parameters: {t: 0.5}
"""


def test_multi_document_recipe():
    docs = parse_documents(MULTI)
    assert [d.name for d in docs] == ["stage1", None, "stage2"]
    deps = stage_dependencies(docs)
    assert deps == {"stage1": [], None: ["stage1", "stage2"], "stage2": ["stage1"]}
    assert [d.name for d in stage_order(docs)] == ["stage1", "stage2", None]
    with pytest.raises(ConfigError, match="expected one merge document"):
        parse_config(MULTI)


def test_multi_document_problems():
    probs = problems_of("""
        name: s
        merge_method: linear
        models: [{model: t, parameters: {weight: 1}}]
        ---
        name: t
        merge_method: linear
        models: [{model: s, parameters: {weight: 1}}]
        ---
        name: t
        merge_method: linear
        models: [{model: a, parameters: {weight: 1}}]
        ---
        merge_method: linear
        models: [{model: s, parameters: {weight: 1}}]
        ---
        merge_method: linear
        models: [{model: s}]
    """)
    assert has(probs, "two documents have the name 't'")
    assert has(probs, "several documents have no 'name:'")
    assert has(probs, "document 5: models[0]", "missing required parameter 'weight'")
    assert not has(probs, "(final)")  # several unnamed documents: none is called the final
    final = problems_of("""
        name: s
        merge_method: linear
        models: [{model: a, parameters: {weight: 1}}]
        ---
        merge_method: linear
        models: [{model: s, parameters: {weight: 1}}]
        dtyp: float16
    """)
    assert final == ["document 2 (final): dtyp: unknown key (did you mean 'dtype'?)"]
    cyc = problems_of("""
        name: s
        merge_method: linear
        models: [{model: t, parameters: {weight: 1}}]
        ---
        name: t
        merge_method: linear
        models: [{model: s, parameters: {weight: 1}}]
        ---
        merge_method: linear
        models: [{model: t, parameters: {weight: 1}}]
    """)
    assert has(cyc, "cycle", "s -> t -> s")


# ----- parameter specs match mergekit's -------------------------------------------------------------


_KIND = {float: "float", bool: "bool"}


@pytest.mark.parametrize("method", SUPPORTED_METHODS)
def test_parameter_specs_match_mergekit(method):
    mk = mk_methods.get(method).spec
    ours = METHODS[method]
    assert {p.name for p in mk.parameters} == {p.name for p in ours.params}
    scope = {mk_base.ParameterScope.SHARED: GLOBAL, mk_base.ParameterScope.INPUT: INPUT,
             mk_base.ParameterScope.NON_BASE: NON_BASE}
    for p in mk.parameters:
        q = ours.param(p.name)
        assert scope[p.scope] == q.scope, p.name
        assert p.required == q.required, p.name
        if not p.required:
            assert p.default == q.default, p.name
        kind = _KIND.get(p.value_type, "optional_float")
        assert q.kind == ("rescale" if p.name == "rescale" else kind), p.name
    contract = mk.contract
    assert (contract.base == mk_base.BasePolicy.REQUIRED) == ours.needs_base
    assert contract.min_inputs == ours.min_inputs and contract.max_inputs == ours.max_inputs


# ----- parameter values match mergekit's evaluate_setting ----------------------------------------------

_MK_SETTING = TypeAdapter(mk_config.ParameterSetting)
_FLOAT = TypeAdapter(float)
_BOOL = TypeAdapter(bool)


def mk_evaluate(name, raw, u, kind):
    validate = {"float": _FLOAT.validate_python, "bool": _BOOL.validate_python}[kind]
    return mk_config.evaluate_setting(name, _MK_SETTING.validate_python(raw), u,
                                      validate=validate)


def ours_evaluate(name, raw, u, kind):
    problems: list = []
    from mergecore.config.params import parse_setting

    setting = parse_setting(raw, "p", problems)
    assert not problems
    return evaluate_setting(name, setting, u, kind=kind)


NAMES = ["model.layers.3.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
         "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
CASES = [
    (0.7, "float"), (2, "float"), ("1e-3", "float"), (True, "float"), ("0.25", "float"),
    ([0, 1], "float"), ([0, 0.5, 1, 0.2], "float"), (["1e-1", 3], "float"), ([5], "float"),
    ([], "float"), ([1, True, 0], "float"),
    ({"filter": "self_attn", "value": [0, 1]}, "float"),
    ([{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.2, 0.9]},
      {"value": 0.5}], "float"),
    ([{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": 0.2}], "float"),
    ([{"filter": "*", "value": [1, 2, 3]}], "float"),
    ([{"filter": "", "value": 4}], "float"),
    (True, "bool"), ("yes", "bool"), (0, "bool"), ([True, False], "bool"),
    ([False, False, True], "bool"), ([0, 1], "bool"),
    ([{"filter": "embed", "value": False}, {"value": True}], "bool"),
]


@pytest.mark.parametrize("raw, kind", CASES)
@pytest.mark.parametrize("u", [0.0, 1 / 3, 0.5, 2 / 3, 0.999, 1.0, 3 / 7])
def test_evaluate_setting_matches_mergekit(raw, kind, u):
    for name in NAMES:
        want = mk_evaluate(name, raw, u, kind)
        got = ours_evaluate(name, raw, u, kind)
        assert type(got) is type(want) and got == want, (name, raw, u)


_scalar = st.floats(-4, 4, allow_nan=False, allow_infinity=False, width=32) | st.integers(-3, 3)
_values = _scalar | st.lists(_scalar, min_size=1, max_size=6)
_filters = st.sampled_from([None, "*", "self_attn", "mlp", "layers.3", "embed", "norm", "zzz"])
_cond = st.fixed_dictionaries({"value": _values}, optional={"filter": _filters})


@settings(max_examples=300, deadline=None)
@given(raw=_values | _cond | st.lists(_cond, min_size=1, max_size=4),
       u=st.floats(0, 1, allow_nan=False), name=st.sampled_from(NAMES))
def test_evaluate_setting_matches_mergekit_random(raw, u, name):
    want = mk_evaluate(name, raw, u, "float")
    got = ours_evaluate(name, raw, u, "float")
    assert got == want or (got is not None and want is not None and math.isclose(
        got, want, rel_tol=0, abs_tol=0))


def test_gradient_interpolation_is_numpy_interp():
    np = pytest.importorskip("numpy")
    values = [0.0, 0.3, 1.0, -0.5, 2.0]
    for u in np.linspace(0, 1, 41):
        want = np.interp(u, np.linspace(0, 1, len(values)), values)
        assert interpolate_gradient(values, float(u)) == pytest.approx(want, abs=1e-12)
    assert interpolate_gradient([True, False], 0.49) is True
    assert interpolate_gradient([True, False], 1.0) is False


@pytest.mark.parametrize("value", [True, False, 0, 1, 2, -1.5, "1e-3", " 0.5 ", "+3", ".5",
                                   "1_000", "abc", "", "0x10", 0.0, 1.0, 0.5, "yes", "no",
                                   "on", "off", "t", "f", "y", "n", "1", "0", "TRUE", "2"])
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_validate_value_matches_pydantic(value, kind):
    adapter = _FLOAT if kind == "float" else _BOOL
    try:
        want = adapter.validate_python(value)
    except ValidationError:
        with pytest.raises(ParameterValueError):
            validate_value(kind, value)
        return
    got = validate_value(kind, value)
    assert type(got) is type(want) and got == want


def test_validate_value_rejects_non_finite_and_bad_rescale():
    for bad in ("inf", "nan", float("inf")):
        with pytest.raises(ParameterValueError, match="finite"):
            validate_value("float", bad)
    with pytest.raises(ParameterValueError, match="rescale"):
        validate_value("rescale", "sometimes")
    assert validate_value("rescale", "Inverse_Density") == "inverse_density"
    assert validate_value("optional_float", None) is None


# ----- precedence ----------------------------------------------------------------------------------


def test_precedence_source_slice_top_default():
    spec = METHODS["ties"].param("density")
    src = {"density": [{"filter": "mlp", "value": 0.1}]}
    slc = {"density": 0.2}
    top = {"density": [0.3, 0.5]}
    src = {"density": [Conditional(0.1, "mlp")]}
    name_mlp, name_attn = "model.layers.1.mlp.up.weight", "model.layers.1.attn.q.weight"
    assert resolve_parameter(spec, [src, slc, top], tensor_name=name_mlp) == 0.1
    # no filter matched in the source's own setting: the slice's value applies
    assert resolve_parameter(spec, [src, slc, top], tensor_name=name_attn) == 0.2
    assert resolve_parameter(spec, [src, None, top], tensor_name=name_attn, u=1.0) == 0.5
    assert resolve_parameter(spec, [{}, {}, {}], tensor_name=name_attn) == 1.0  # default
    # an empty list has no value and passes on too
    assert resolve_parameter(spec, [{"density": []}, slc], tensor_name=name_attn) == 0.2
    with pytest.raises(MissingParameterError, match="'weight' for model 'm'.*tensor 'x'"):
        resolve_parameter(METHODS["ties"].param("weight"), [{}, {}], tensor_name="x",
                          model="m")


@pytest.mark.parametrize("u", [0.0, 0.25, 1.0])
def test_resolution_matches_mergekit_resolve_parameters(u):
    resolver = pytest.importorskip("mergekit.parameter_resolver")
    common = pytest.importorskip("mergekit.common")
    raw = y("""
        merge_method: breadcrumbs_ties
        base_model: base
        slices:
          - sources:
              - model: base
                layer_range: [0, 4]
                parameters: {weight: 9, density: 0.1}
              - model: a
                layer_range: [0, 4]
                parameters:
                  weight: [{filter: mlp, value: [0.1, 0.9]}]
                  gamma: 0.05
              - model: b
                layer_range: [4, 8]
                parameters: {density: [0.2, 0.4, 0.8]}
            parameters:
              weight: 0.6
              lambda: [1, 2]
              normalize: [{filter: attn, value: true}]
        parameters:
          density: 0.9
          normalize: false
          rescale: [false, true]
    """)
    import yaml

    mk_cfg = mk_config.MergeConfiguration.model_validate(yaml.safe_load(raw))
    ours = parse_config(raw)
    spec_mk = mk_methods.get("breadcrumbs_ties").spec
    ref = {n: common.ModelReference.parse(n) for n in ("base", "a", "b")}
    reader = mk_config.ConfigReader(config=mk_cfg, t=u, slice_out=mk_cfg.slices[0])
    spec = METHODS["breadcrumbs_ties"]
    sl = ours.slices[0]
    for out_name in ("model.layers.2.mlp.up.weight", "model.layers.2.self_attn.q.weight"):
        inputs = {ref[s.model.ref]: out_name.replace(".2.", f".{2 + s.layer_range[0]}.")
                  for s in sl.sources}
        mk_glob, mk_per = resolver.resolve_parameters(
            spec_mk, tensor_name=out_name, inputs=inputs, sources=reader.parameter_sources,
            base_model=ref["base"], t=u)
        for p in spec.global_params:
            got = resolve_parameter(p, [sl.parameters, ours.parameters], tensor_name=out_name,
                                    u=u)
            assert got == mk_glob[p.name], (p.name, out_name)
        for s in sl.sources:
            for p in spec.input_params:
                if s.model.ref == "base":
                    assert p.name not in mk_per[ref["base"]]
                    continue
                got = resolve_parameter(p, [s.parameters, sl.parameters, ours.parameters],
                                        tensor_name=inputs[ref[s.model.ref]], u=u)
                assert got == mk_per[ref[s.model.ref]][p.name], (p.name, s.model.ref)


@pytest.mark.parametrize("text,complete", [
    ("merge_method: linear\nmodels: [{model: a}, {model: b}]\n", True),
    ("merge_method: linear\nmodels: [{model: a}, {modle: b}]\n", False),  # entry dropped
    ("merge_method: linear\nmodels: [{model: a}, 7]\n", False),
    ("merge_method: lineer\nmodels: [{model: a}, {model: b}]\n", False),  # unknown method
    (("merge_method: slerp\nslices:\n  - sources: [{model: a, layer_range: [0, 2]},"
     " {model: b, layer_range: [0, 2]}]\n"), True),
    (("merge_method: slerp\nslices:\n  - sources: [{model: a, layer_range: [0, 2]},"
     " {model: b, layer_range: [0, 3]}]\n"), False),  # spans differ
    (("merge_method: slerp\nslices:\n  - sources: [{model: a, layer_range: [0, 2]},"
     " {model: b}]\n"), False),  # a source without layer_range is dropped
    ("merge_method: slerp\nslices:\n  - sources: {model: a}\n", False),
    ("merge_method: slerp\nslices: [7]\n", False),
    ("model_path1: a\nmodel_path2: b\noperations: []\n", False),  # BlockMerge: not planned
])
def test_structure_is_complete_only_when_every_model_entry_survived(text, complete):
    """Which documents with problems of their own load_config still plans: key paths such as
    slices[0].sources[1] must mean the same in the config as in the YAML."""
    from mergecore.config.schema import parse_documents_leniently, structure_is_complete

    [(raw, cfg)], _ = parse_documents_leniently(text)
    assert (cfg is not None and structure_is_complete(raw, cfg)) is complete
