"""Parsing a mergekit YAML into checked records (no file other than the YAML is touched).

Accepted keys, as mergekit 0.1.5 reads them:

    merge_method: linear | slerp | task_arithmetic | ties | dare_linear | dare_ties |
                  breadcrumbs | breadcrumbs_ties | passthrough
    models: [{model: REF, parameters: {...}}]                       # either this ...
    slices: [{sources: [{model: REF, layer_range: [a, b], parameters: {...}}],
              base_model: REF, parameters: {...}, residual_weight: X}]   # ... or this
    base_model: REF
    parameters: {...}
    dtype / out_dtype: float32 | float16 | bfloat16
    tokenizer_source: base | REF          (union, and the tokenizer: block: not supported yet)
    chat_template: STR
    random_seed: INT
    name: STR                             (a stage of a multi-document recipe)

``REF`` is a model path, or ``path+adapter_path`` for a LoRA adapter applied to the model.
A document with ``model_path1`` / ``model_path2`` (and no ``merge_method``) is a
BlockMerge_Gradient document (``mergecore.config.blockmerge``), read as a ``linear`` merge.
Several documents separated by ``---`` form a multi-stage recipe (mergekit-multi): named
documents are intermediate merges that later documents may use as models by name; at most
one document has no name (the final output).

Every problem found is reported at once in one ``ConfigError``, each line naming its key path
(``slices[1].sources[0].layer_range``) and, in a multi-document file, the document.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergecore.config.blockmerge import is_blockmerge, parse_blockmerge
from mergecore.config.errors import ConfigError, Problems
from mergecore.config.methods import (
    GLOBAL,
    METHODS,
    NON_BASE,
    MethodSpec,
    unsupported_method_message,
)
from mergecore.config.params import (
    ParameterValueError,
    Setting,
    parse_setting,
    setting_leaves,
    validate_value,
)
from mergecore.tokenizer import chat_template_problem

TOP_KEYS = ("merge_method", "models", "slices", "base_model", "parameters", "dtype",
            "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "random_seed", "name")
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")

#: dtype names accepted in the YAML -> canonical torch name (what mergecore computes in).
DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
#: canonical torch name -> safetensors dtype code.
DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


# ----- records -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A model reference as written: ``path`` or ``path+adapter`` (a LoRA adapter).

    ``ref`` is the whole string (it identifies the input: the same path with and without an
    adapter are two inputs); ``path`` the model part, ``adapter`` the adapter part or None.
    """

    ref: str
    path: str
    adapter: str | None = None

    def __str__(self) -> str:
        return self.ref


@dataclass
class InputModel:
    """One entry of ``models:``."""

    model: ModelRef
    parameters: dict[str, Setting] = field(default_factory=dict)
    #: its key path in the YAML (``models[2]``), for messages; "" when not read from YAML
    where: str = field(default="", compare=False, repr=False)


@dataclass
class SliceSource:
    """One entry of a slice's ``sources:``; ``layer_range`` is half-open ``[start, end)``."""

    model: ModelRef
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] = field(default_factory=dict)
    #: its key path in the YAML (``slices[0].sources[2]``), for messages; "" when not read
    #: from YAML
    where: str = field(default="", compare=False, repr=False)

    @property
    def num_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


@dataclass
class OutputSlice:
    """One entry of ``slices:``: output layers taken from ``sources`` (same length each)."""

    sources: list[SliceSource]
    base_model: ModelRef | None = None
    parameters: dict[str, Setting] = field(default_factory=dict)
    residual_weight: float | None = None
    #: its key path in the YAML (``slices[1]``), for messages; "" when not read from YAML
    where: str = field(default="", compare=False, repr=False)

    @property
    def num_layers(self) -> int:
        return self.sources[0].num_layers if self.sources else 0


@dataclass
class MergeConfig:
    """One YAML document, checked. Exactly one of ``models`` / ``slices`` is set.

    ``dtype`` / ``out_dtype`` are canonical torch names (``"bfloat16"``) or None;
    ``tokenizer_source`` is None, ``"base"`` or a model reference string. ``warnings`` holds
    things that are accepted but probably not what the author meant (also logged).
    """

    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    base_model: ModelRef | None = None
    parameters: dict[str, Setting] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    random_seed: int | None = None
    name: str | None = None
    warnings: list[str] = field(default_factory=list)
    #: A BlockMerge_Gradient document's operations, turned into per-tensor weights by the
    #: planner (``mergecore.config.blockmerge``); None for a mergekit document.
    blockmerge: Any = None
    #: Vocabulary-sized tensors of different sizes: ``"common"`` merges the rows all models
    #: share (mergekit); ``"first"`` keeps the first model's rows (its extra rows unchanged).
    vocab_rows: str = "common"

    @property
    def method(self) -> MethodSpec:
        return METHODS[self.merge_method]

    def referenced_models(self) -> list[ModelRef]:
        """Every model the document names, in the order written (each once); the base model
        comes where it is listed, or last when it is not listed among the inputs."""
        seen: dict[str, ModelRef] = {}
        for m in self.models or []:
            seen.setdefault(m.model.ref, m.model)
        for s in self.slices or []:
            for src in s.sources:
                seen.setdefault(src.model.ref, src.model)
            if s.base_model is not None:
                seen.setdefault(s.base_model.ref, s.base_model)
        if self.base_model is not None:
            seen.setdefault(self.base_model.ref, self.base_model)
        if self.tokenizer_source not in (None, "base"):
            seen.setdefault(self.tokenizer_source, parse_model_ref(self.tokenizer_source))
        return list(seen.values())

    def input_models(self) -> list[ModelRef]:
        """The models whose tensors are merged (``referenced_models`` minus a tokenizer-only
        donor)."""
        refs = self.referenced_models()
        inputs = {m.model.ref for m in self.models or []}
        for s in self.slices or []:
            inputs |= {src.model.ref for src in s.sources}
        if self.models is not None and self.base_model is not None:
            inputs.add(self.base_model.ref)
        return [r for r in refs if r.ref in inputs]

    def models_to_open(self) -> list[ModelRef]:
        """The models whose checkpoints a merge needs: the inputs, and the model whose
        config.json the output gets (a base model that is no input of a ``slices:`` merge)."""
        refs = self.input_models()
        donor = self.output_config_model
        return refs if any(r.ref == donor.ref for r in refs) else [*refs, donor]

    @property
    def output_config_model(self) -> ModelRef:
        """The model whose config.json (and default tokenizer) the output gets: the base
        model, else the first model named."""
        if self.base_model is not None:
            return self.base_model
        return self.input_models()[0]


# ----- model references ------------------------------------------------------------------


def parse_model_ref(text: str) -> ModelRef:
    """``"path"`` -> ModelRef(path); ``"path+adapter"`` -> ModelRef(path, adapter).

    Uses the IO layer's rule (an existing path is never split, else split at the ``+`` whose
    left side exists). Raises ``ValueError`` for an empty or ambiguous reference.
    """
    from mergecore.io.checkpoint import split_model_ref

    text = text.strip()
    if not text:
        raise ValueError("empty model reference")
    path, adapter = split_model_ref(text)
    return ModelRef(ref=text, path=path, adapter=adapter)


# ----- YAML loading --------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that records duplicate mapping keys instead of silently keeping the last."""

    duplicates: list[str]


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)
    keys: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            dup = key in keys
        except TypeError:
            continue
        if dup:
            mark = key_node.start_mark
            loader.duplicates.append(
                f"line {mark.line + 1}: key {key!r} appears twice in the same mapping")
        keys.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_yaml_documents(text: str, source: str | None) -> list[Any]:
    loader = _StrictLoader(text)
    loader.name = source or loader.name  # YAML errors then point at the file, not "<unicode string>"
    loader.duplicates = []
    try:
        docs = []
        while loader.check_data():
            docs.append(loader.get_data())
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], source=source) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError(loader.duplicates, source=source)
    docs = [d for d in docs if d is not None]
    if not docs:
        raise ConfigError(["the file holds no YAML document"], source=source)
    return docs


# ----- document checking -------------------------------------------------------------------


class _Checker:
    """Checks one document; problems go to ``self.problems`` prefixed with ``self.prefix``."""

    def __init__(self, problems: Problems, prefix: str, method: MethodSpec | None):
        self.problems = problems
        self.prefix = prefix
        self.method = method
        self.warnings: list[str] = []
        # groups ("models", "slices[i]") that lost an entry to its own problem: their input
        # count and base membership are not checked (that would blame the wrong thing)
        self.incomplete: set[str] = set()

    def add(self, where: str, message: str) -> None:
        self.problems.add(f"{self.prefix}{where}" if where else self.prefix.rstrip(": "),
                          message)

    def reported(self, where: str, *, nested: bool = True) -> bool:
        """Whether a problem at key path ``where`` (or, with ``nested``, under it) was
        already recorded."""
        head = f"{self.prefix}{where}"
        ends = (":", ".", "[") if nested else (":",)
        return any(line.startswith(head) and line[len(head):len(head) + 1] in ends
                   for line in self.problems)

    def parameter_reported(self, name: str, *scopes: str) -> bool:
        """Whether parameter ``name`` (or the whole ``parameters`` mapping) of one of the key
        paths ``scopes`` ("" for the top level) already has a problem: then it is not also
        called missing."""
        for scope in scopes:
            base = f"{scope}.parameters" if scope else "parameters"
            if self.reported(f"{base}.{name}") or self.reported(base, nested=False):
                return True
        return False

    def warn(self, where: str, message: str) -> None:
        line = f"{self.prefix}{where}: {message}"
        self.warnings.append(line)

    def keys(self, raw: dict, allowed: tuple[str, ...], where: str) -> None:
        for key in raw:
            if key in allowed:
                continue
            path = f"{where}.{key}" if where else str(key)
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            if key == "modules":
                self.add(path, "the 'modules:' form is not supported by mergecore yet; use "
                         "'models:' or 'slices:'")
            else:
                self.add(path, "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else
                                               f"; allowed here: {', '.join(allowed)}"))

    def model_ref(self, raw: Any, where: str) -> ModelRef | None:
        if isinstance(raw, dict):
            self.add(where, "write the model reference as a string ('path' or "
                     "'path+adapter_path'); the mapping form is not supported")
            return None
        if not isinstance(raw, str) or not raw.strip():
            self.add(where, f"must be a model path (a non-empty string), not {raw!r}")
            return None
        try:
            return parse_model_ref(raw)
        except ValueError as exc:
            self.add(where, str(exc))
            return None

    def parameters(self, raw: Any, where: str, level: str) -> dict[str, Setting]:
        """``level``: "model" (a model's or a source's own parameters), "slice" or "top"."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.add(where, "must be a mapping of parameter name -> value")
            return {}
        out: dict[str, Setting] = {}
        found: list[tuple[str, str]] = []
        for name, value in raw.items():
            path = f"{where}.{name}"
            if not isinstance(name, str):
                self.add(path, "parameter names must be strings")
                continue
            setting = parse_setting(value, path, found)
            if setting is None:
                continue
            out[name] = setting
            if self.method is None:
                continue
            spec = self.method.param(name)
            if spec is None:
                names = [p.name for p in self.method.params]
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                self.warn(path, f"{self.method.name} has no parameter {name!r} ({hint}it has: "
                          f"{', '.join(names)}); ignored")
                continue
            if level == "model" and spec.scope == GLOBAL:
                self.warn(path, f"{name!r} is a global parameter of {self.method.name}; "
                          "set on one model it is ignored (as by mergekit): set it at the "
                          "top level or on the slice")
            for leaf_path, leaf in setting_leaves(setting, path):
                try:
                    validate_value(spec.kind, leaf)
                except ParameterValueError as exc:
                    self.add(leaf_path, str(exc))
        for path, message in found:
            self.add(path, message)
        return out

    def dtype(self, raw: Any, where: str) -> str | None:
        if raw is None:
            return None
        if not isinstance(raw, str):
            self.add(where, f"must be a dtype name, not {raw!r}")
            return None
        key = raw.strip().lower().removeprefix("torch.")
        if key in DTYPE_NAMES:
            return DTYPE_NAMES[key]
        if key in ("float64", "double", "int64"):
            self.add(where, f"dtype {raw!r} is not supported by mergecore; use float32, "
                     "float16 or bfloat16")
        else:
            self.add(where, f"unknown dtype {raw!r}; use float32, float16 or bfloat16")
        return None


def _check_document(raw: Any, doc_label: str, problems: Problems) -> MergeConfig | None:
    prefix = f"{doc_label}: " if doc_label else ""
    if is_blockmerge(raw):
        return parse_blockmerge(raw, _Checker(problems, prefix, None))
    if not isinstance(raw, dict):
        problems.add(doc_label or None, "a merge configuration must be a YAML mapping "
                     "(merge_method:, models: or slices:, ...)")
        return None
    method_name = raw.get("merge_method")
    method: MethodSpec | None = None
    checker = _Checker(problems, prefix, None)
    if method_name is None:
        checker.add("merge_method", "missing (one of: " + ", ".join(METHODS) + ")")
    elif not isinstance(method_name, str) or method_name not in METHODS:
        checker.add("merge_method", unsupported_method_message(method_name))
    else:
        method = METHODS[method_name]
    checker.method = method
    checker.keys(raw, TOP_KEYS, "")

    base_model = None
    if raw.get("base_model") is not None:
        base_model = checker.model_ref(raw["base_model"], "base_model")
    parameters = checker.parameters(raw.get("parameters"), "parameters", "top")

    models = slices = None
    has_models, has_slices = raw.get("models") is not None, raw.get("slices") is not None
    if has_models == has_slices:
        checker.add("", "exactly one of 'models:' or 'slices:' must be given" +
                    (" (both are)" if has_models else ""))
    if has_models:
        models = _check_models(raw["models"], checker)
    elif has_slices:
        slices = _check_slices(raw["slices"], checker)

    cfg = MergeConfig(
        merge_method=method_name if isinstance(method_name, str) else "",
        models=models, slices=slices, base_model=base_model, parameters=parameters,
        dtype=checker.dtype(raw.get("dtype"), "dtype"),
        out_dtype=checker.dtype(raw.get("out_dtype"), "out_dtype"),
    )
    _check_tokenizer(raw, cfg, checker)
    template = raw.get("chat_template")
    if template is not None and not isinstance(template, str):
        checker.add("chat_template", "must be a string (a template name or a Jinja template)")
    elif template is not None and (problem := chat_template_problem(template)):
        checker.add("chat_template", problem)
    cfg.chat_template = template if isinstance(template, str) else None
    seed = raw.get("random_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        checker.add("random_seed", f"must be a non-negative integer, not {seed!r}")
    elif seed is not None:
        cfg.random_seed = seed
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        checker.add("name", f"must be a non-empty string, not {name!r}")
    elif name is not None:
        cfg.name = name.strip()

    if method is not None:
        _check_contract(cfg, method, checker)
    cfg.warnings = checker.warnings
    return cfg


def _check_models(raw: Any, checker: _Checker) -> list[InputModel] | None:
    if not isinstance(raw, list) or not raw:
        checker.add("models", "must be a non-empty list of {model: PATH, parameters: {...}}")
        return None
    out = []
    for i, entry in enumerate(raw):
        where = f"models[{i}]"
        checker.incomplete.add("models")  # until the entry is read
        if not isinstance(entry, dict):
            checker.add(where, "must be a mapping {model: PATH, parameters: {...}}")
            continue
        checker.keys(entry, MODEL_KEYS, where)
        if entry.get("model") is None:
            checker.add(f"{where}.model", "missing")
            continue
        ref = checker.model_ref(entry["model"], f"{where}.model")
        params = checker.parameters(entry.get("parameters"), f"{where}.parameters", "model")
        if ref is not None:
            out.append(InputModel(ref, params, where))
    if len(out) == len(raw):
        checker.incomplete.discard("models")
    return out


def _layer_range(raw: Any, where: str, checker: _Checker) -> tuple[int, int] | None:
    if raw is None:
        checker.add(where, "missing (a half-open [start, end) pair of layer numbers)")
        return None
    if (not isinstance(raw, (list, tuple)) or len(raw) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw)):
        checker.add(where, f"must be a pair of integers [start, end), not {raw!r}")
        return None
    start, end = raw
    if start < 0 or end <= start:
        checker.add(where, f"[{start}, {end}) is empty or negative: need 0 <= start < end")
        return None
    return start, end


def _check_slices(raw: Any, checker: _Checker) -> list[OutputSlice] | None:
    if not isinstance(raw, list) or not raw:
        checker.add("slices", "must be a non-empty list of {sources: [...]}")
        return None
    out = []
    for i, entry in enumerate(raw):
        where = f"slices[{i}]"
        if not isinstance(entry, dict):
            checker.add(where, "must be a mapping {sources: [...], parameters: {...}}")
            continue
        checker.keys(entry, SLICE_KEYS, where)
        sources_raw = entry.get("sources")
        sources = []
        if not isinstance(sources_raw, list) or not sources_raw:
            checker.add(f"{where}.sources", "must be a non-empty list of "
                        "{model: PATH, layer_range: [start, end]}")
            sources_raw = []
        for j, src in enumerate(sources_raw):
            swhere = f"{where}.sources[{j}]"
            if not isinstance(src, dict):
                checker.add(swhere, "must be a mapping {model: PATH, layer_range: [a, b]}")
                continue
            checker.keys(src, SOURCE_KEYS, swhere)
            ref = None
            if src.get("model") is None:
                checker.add(f"{swhere}.model", "missing")
            else:
                ref = checker.model_ref(src["model"], f"{swhere}.model")
            lr = _layer_range(src.get("layer_range"), f"{swhere}.layer_range", checker)
            params = checker.parameters(src.get("parameters"), f"{swhere}.parameters", "model")
            if ref is not None and lr is not None:
                sources.append(SliceSource(ref, lr, params, swhere))
        if not sources_raw or len(sources) != len(sources_raw):
            checker.incomplete.add(where)
        lengths = sorted({s.num_layers for s in sources})
        if len(lengths) > 1:
            checker.add(f"{where}.sources", "all sources of a slice must span the same number "
                        f"of layers (their layer_range spans {', '.join(str(s.num_layers) for s in sources)})")
        base = None
        if entry.get("base_model") is not None:
            base = checker.model_ref(entry["base_model"], f"{where}.base_model")
        params = checker.parameters(entry.get("parameters"), f"{where}.parameters", "slice")
        rw = entry.get("residual_weight")
        if rw is not None:
            if isinstance(rw, bool) or not isinstance(rw, (int, float)):
                checker.add(f"{where}.residual_weight", f"must be a number, not {rw!r}")
                rw = None
            else:
                checker.warn(f"{where}.residual_weight", "is ignored (as by mergekit)")
        out.append(OutputSlice(sources, base, params, rw, where))
    return out


def _check_tokenizer(raw: dict, cfg: MergeConfig, checker: _Checker) -> None:
    if raw.get("tokenizer") is not None:
        checker.add("tokenizer", "the 'tokenizer:' block (vocabulary merging, added tokens) is "
                    "not supported by mergecore yet; use tokenizer_source: base or a model")
        if raw.get("tokenizer_source") is not None:
            checker.add("tokenizer_source", "cannot be given together with 'tokenizer:'")
    src = raw.get("tokenizer_source")
    if src is None:
        return
    if src == "union":
        checker.add("tokenizer_source", "'union' (building a union vocabulary) is not "
                    "supported by mergecore yet; use 'base' or a model path")
        return
    if src == "base":
        if cfg.base_model is None:
            checker.add("tokenizer_source", "'base' needs a top-level base_model")
        cfg.tokenizer_source = "base"
        return
    ref = checker.model_ref(src, "tokenizer_source")
    if ref is not None:
        cfg.tokenizer_source = ref.ref


def _check_contract(cfg: MergeConfig, method: MethodSpec, checker: _Checker) -> None:
    """The method's input contract and its required parameters, as far as the YAML alone
    tells (per-tensor gaps left by filters are found by the planner)."""
    top = cfg.parameters
    if cfg.models is not None:
        groups = [("models", cfg.models and [(m.where or f"models[{i}]", m.model, m.parameters)
                                             for i, m in enumerate(cfg.models)], cfg.base_model,
                   {})]
    else:
        groups = [(sl.where or f"slices[{i}]", [(s.where or f"slices[{i}].sources[{j}]", s.model,
                                                 s.parameters) for j, s in enumerate(sl.sources)],
                   sl.base_model or cfg.base_model, sl.parameters)
                  for i, sl in enumerate(cfg.slices or [])]
    for where, entries, base, slice_params in groups:
        if not entries:
            continue
        refs = [ref.ref for _, ref, _ in entries]
        seen: set[str] = set()
        for (ewhere, ref, _), r in zip(entries, refs):
            if r in seen:
                checker.add(ewhere, f"model {r!r} is listed twice in {where}; each input may "
                            "appear once")
            seen.add(r)
        inputs = list(entries)
        if cfg.models is not None and base is not None and base.ref not in seen:
            # mergekit adds a base model that is not listed as one more input
            inputs.append(("base_model", base, {}))
        # where an entry was dropped (checker.incomplete), its own problem is reported, not
        # the missing base or the input count that follow from it
        if method.needs_base:
            if base is None:
                if not (checker.reported("base_model") or checker.reported(f"{where}.base_model")):
                    checker.add(where if cfg.slices is not None else "base_model",
                                f"merge method {method.name} needs a base_model")
            elif (where not in checker.incomplete
                  and base.ref not in {ref.ref for _, ref, _ in inputs}):
                checker.add(where, f"the base model {base.ref!r} must be one of the sources "
                            f"of this slice for {method.name}")
        n = len(inputs)
        if where not in checker.incomplete and (
                n < method.min_inputs or (method.max_inputs is not None
                                          and n > method.max_inputs)):
            want = (f"exactly {method.min_inputs}" if method.min_inputs == method.max_inputs
                    else f"at most {method.max_inputs}" if method.max_inputs is not None
                    else f"at least {method.min_inputs}")
            counted = " (the base model included)" if base is not None else ""
            checker.add(where, f"merge method {method.name} takes {want} input "
                        f"model{'s' if method.max_inputs != 1 else ''}{counted}; got {n}")
        for spec in method.params:
            if not spec.required:
                continue
            if spec.scope == GLOBAL:
                if spec.name not in slice_params and spec.name not in top and not \
                        checker.parameter_reported(spec.name, where if cfg.slices is not None
                                                   else "", ""):
                    checker.add(where if cfg.slices is not None else "parameters",
                                f"missing required parameter {spec.name!r} of {method.name}")
                continue
            for ewhere, ref, own in inputs:
                if spec.scope == NON_BASE and method.needs_base and base is not None and \
                        ref.ref == base.ref:
                    continue
                scopes = (ewhere, where if cfg.slices is not None else "", "")
                if spec.name not in own and spec.name not in slice_params and \
                        spec.name not in top and not checker.parameter_reported(spec.name,
                                                                                *scopes):
                    why = (" (mergekit adds a base_model that is not listed under models: as "
                           "one more input; give it a weight at the top level or list it)"
                           if ewhere == "base_model" else "")
                    checker.add(ewhere, f"missing required parameter {spec.name!r} for model "
                                f"{ref.ref!r}{why}")


# ----- entry points ------------------------------------------------------------------------


def parse_documents(text: str, source: str | None = None) -> list[MergeConfig]:
    """Parse a YAML text that holds one merge document or several (mergekit-multi).

    With several documents, checks the stage names (unique, at most one document without a
    name) and the references between them (no cycles). Raises ``ConfigError`` listing every
    problem found, each with its document and key path.
    """
    parsed, problems = parse_documents_leniently(text, source)
    problems.raise_if_any(source)
    return [c for _, c in parsed if c is not None]


def document_label(index: int, name: str | None, *, final: bool = True) -> str:
    """How problems name document ``index`` (0-based) of a multi-stage recipe:
    ``document 2 (name: stage2)``, or ``document 3 (final)`` for the unnamed one (without
    "(final)" when ``final`` is false: several documents lack a name)."""
    if name is not None:
        return f"document {index + 1} (name: {name})"
    return f"document {index + 1}" + (" (final)" if final else "")


def parse_documents_leniently(text: str, source: str | None = None
                              ) -> tuple[list[tuple[Any, MergeConfig | None]], Problems]:
    """``parse_documents`` without raising for the documents' own problems.

    Returns each YAML document next to the config read from it as far as it could be (None
    where the document is not a mapping), and the problems found. Raises ``ConfigError`` only
    when the text is not YAML at all.
    """
    docs = _load_yaml_documents(text, source)
    problems = Problems()
    configs: list[MergeConfig | None] = []
    names = [raw.get("name") if isinstance(raw, dict) else None for raw in docs]
    unnamed = sum(not isinstance(n, str) for n in names)
    for i, (raw, name) in enumerate(zip(docs, names)):
        label = ""
        if len(docs) > 1:
            label = document_label(i, name if isinstance(name, str) else None,
                                   final=unnamed == 1)
        configs.append(_check_document(raw, label, problems))
    if len(docs) > 1:
        _check_stages([c for c in configs if c is not None], problems)
    return list(zip(docs, configs)), problems


def parse_config(text: str, source: str | None = None) -> MergeConfig:
    """Parse a YAML text that holds exactly one merge document (see ``parse_documents``)."""
    docs = parse_documents(text, source)
    if len(docs) != 1:
        raise ConfigError([(f"expected one merge document, found {len(docs)} (a multi-stage "
                           "recipe); use parse_documents")], source=source)
    return docs[0]


def load_config(path: str | os.PathLike, *, check_inputs: bool = True,
                allow_crimes: bool = False) -> list[MergeConfig]:
    """Read and parse a YAML file (one document or a multi-stage recipe).

    When the YAML has problems of its own and ``check_inputs`` is true, the ``ConfigError``
    also lists the problems of the models it names (``mergecore.config.load.input_problems``:
    missing or malformed checkpoints, and the shape, tensor and layer-range problems of the
    documents that can be planned; headers only), so one run shows every mistake instead of
    the second kind only after the first is fixed. ``allow_crimes`` as in ``build_plan``.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the configuration file: {exc.strerror or exc}"],
                          source=str(p)) from None
    except UnicodeDecodeError:
        raise ConfigError(["the configuration file is not UTF-8 text"], source=str(p)) from None
    parsed, problems = parse_documents_leniently(text, source=str(p))
    if problems and check_inputs:
        from mergecore.config.load import input_problems

        problems.extend(input_problems(parsed, allow_crimes=allow_crimes))
    problems.raise_if_any(str(p))
    return [c for _, c in parsed if c is not None]


#: Keys whose string value names a model directory (mergekit's YAML and BlockMerge_Gradient's).
MODEL_PATH_KEYS = ("model", "base_model", "model_path1", "model_path2")


def model_strings(node: Any) -> Iterator[str]:
    """Every string under a MODEL_PATH_KEYS key of a parsed YAML document, in document order."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in MODEL_PATH_KEYS and isinstance(value, str):
                yield value
            else:
                yield from model_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from model_strings(value)


def structure_is_complete(raw: Any, cfg: MergeConfig) -> bool:
    """Whether ``cfg`` kept every model entry and slice source of its YAML document ``raw``
    (so key paths such as ``slices[1].sources[0]`` mean the same in both) and every slice's
    sources span one length: a config the planner can check although the document has
    problems elsewhere (parameters, unknown keys ...)."""
    if not isinstance(raw, dict) or cfg.merge_method not in METHODS or cfg.blockmerge is not None:
        return False
    if cfg.models is not None:
        return isinstance(raw.get("models"), list) and len(raw["models"]) == len(cfg.models)
    raw_slices = raw.get("slices")
    if cfg.slices is None or not isinstance(raw_slices, list) or len(raw_slices) != len(cfg.slices):
        return False
    for raw_slice, sl in zip(raw_slices, cfg.slices):
        raw_sources = raw_slice.get("sources") if isinstance(raw_slice, dict) else None
        if not isinstance(raw_sources, list) or len(raw_sources) != len(sl.sources):
            return False
        if len({s.num_layers for s in sl.sources}) != 1:
            return False
    return True


# ----- multi-stage recipes --------------------------------------------------------------------


def stage_dependencies(configs: list[MergeConfig]) -> dict[str | None, list[str]]:
    """For each document (by name; None for the unnamed final one), the stage names it uses
    as models (a model reference whose path part is a stage name), in order."""
    names = {c.name for c in configs if c.name is not None}
    deps: dict[str | None, list[str]] = {}
    for c in configs:
        used: list[str] = []
        for ref in c.referenced_models():
            if ref.path in names and ref.path not in used:
                used.append(ref.path)
        deps[c.name] = used
    return deps


def stage_order(configs: list[MergeConfig]) -> list[MergeConfig]:
    """The documents in an order where every stage comes after the stages it uses.

    Raises ``ConfigError`` on a cycle.
    """
    by_name = {c.name: c for c in configs}
    deps = stage_dependencies(configs)
    order: list[MergeConfig] = []
    state: dict[str | None, int] = {}

    def visit(name: str | None, chain: list[str | None]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = chain[chain.index(name):] + [name]
            raise ConfigError(["stages use each other in a cycle: " +
                               " -> ".join(str(n) for n in cycle)])
        state[name] = 1
        for dep in deps[name]:
            visit(dep, chain + [name])
        state[name] = 2
        order.append(by_name[name])

    for c in configs:
        visit(c.name, [])
    return order


def _check_stages(configs: list[MergeConfig], problems: Problems) -> None:
    seen: set[str | None] = set()
    for c in configs:
        if c.name in seen:
            problems.add(None, "several documents have no 'name:' (only the final output may "
                         "be unnamed)" if c.name is None else
                         f"two documents have the name {c.name!r}; stage names must be unique")
        seen.add(c.name)
    if len(seen) != len(configs):
        return
    try:
        order = stage_order(configs)
    except ConfigError as exc:
        for p in exc.problems:
            problems.add(None, p)
        return
    used = {d for deps in stage_dependencies(configs).values() for d in deps}
    for c in order:
        if c.name is not None and c.name not in used and None in seen:
            line = f"stage {c.name!r} is not used by any other document"
            c.warnings.append(line)
