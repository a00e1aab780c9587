"""The merge planner: a checked config + the inputs' safetensors headers -> one record per
output tensor with everything needed to compute it (no tensor data is read).

What goes into the output, following mergekit 0.1.5:

- Tensor names come from the checkpoints' headers. Layers are found by name
  (``mergecore.config.layout``): ``<prefix>.<N>.<rest>``.
- ``models:`` form: one slice over all layers; every listed model is an input, and a
  ``base_model`` that is not listed is added as the last input. With several layer stacks
  (a vision tower beside the text layers) each stack is its own slice.
- ``slices:`` form: each output slice contributes its layers in order, renumbered
  consecutively in the output; source ``k`` of a slice supplies its layer
  ``layer_range[0] + idx`` for the slice's ``idx``-th layer. The non-layer tensors before
  the layers (embeddings) come from the first slice's sources with the first slice's
  parameters, those after the layers (final norm, ``lm_head``) from the last slice's.
- ``u``: ``idx / (n - 1)`` for the ``idx``-th of the ``n`` layers of a slice (1 when n == 1);
  0 for every non-layer tensor.
- Parameters (``mergecore.config.params``): a source's own > its slice's > top level >
  default; per-model parameters match the input tensor name, global ones the output name.
  A base model's ``non_base`` parameters (``weight``, ``density`` ... of the task-arithmetic
  family) are not resolved: listed among the models, the base contributes only as the base.
- The set of tensors of a group of inputs is the *reference* input's: the base model when it
  is one of the inputs, else the first input. Every other input must have each of them.
- Non-floating tensors (``position_ids``) are copied from the reference input.
- Embedding / ``lm_head`` rows (dim 0 equal to each model's ``vocab_size``) beyond the
  smallest vocabulary are dropped: the common sub-matrix is merged. Any other shape
  difference is an error.
- Output dtype: ``out_dtype``, else ``dtype``, else the promoted dtype of the inputs;
  non-floating tensors keep theirs.
- The output config.json is the base (or first) model's, with the layer count set to the
  output's (``slices:``), ``torch_dtype``/``dtype`` set to the output dtype, and
  ``vocab_size`` set to the merged vocabulary when it shrank.

All problems are collected and raised together in one ``ConfigError``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergecore.config.blockmerge import resolve_blockmerge
from mergecore.config.errors import ConfigError, Problems
from mergecore.config.layout import (
    ModelLayout,
    config_layer_count,
    config_vocab_size,
    detect_layout,
    set_config_value,
)
from mergecore.config.methods import (
    MAGNITUDE_TRIM_METHODS,
    METHODS,
    NON_BASE,
    RANDOM_DROP_METHODS,
    MethodSpec,
    ParamSpec,
)
from mergecore.config.params import Setting, resolve_parameter
from mergecore.config.schema import (
    DTYPE_CODES,
    DTYPE_NAMES,
    MergeConfig,
    ModelRef,
    parse_model_ref,
)
from mergecore.io.types import (
    FLOAT8_CODES,
    SAFETENSORS_DTYPES,
    TORCH_TO_SAFETENSORS,
    Checkpoint,
    TensorInfo,
)
from mergecore.methods import weights_cancel

#: Name parts of tensors indexed by the vocabulary (used when a config has no vocab_size).
_VOCAB_NAME_MARKERS = ("embed", "lm_head", "wte", "word_embeddings", "tok_embeddings",
                       "output.weight", "shared.weight")
_LIST_LIMIT = 5


# ----- the plan records -----------------------------------------------------------------------


@dataclass
class PlannedInput:
    """One input tensor of an output tensor.

    ``model``: the model reference as written in the YAML (``path`` or ``path+adapter``);
    ``info``: where its bytes are; ``adapter``: the LoRA adapter to apply first, or None;
    ``rows``: use only the first ``rows`` rows (the common vocabulary), or None for all.
    """

    model: str
    info: TensorInfo
    adapter: str | None = None
    rows: int | None = None


@dataclass
class PlannedTensor:
    """One output tensor, fully resolved.

    - ``name``, ``shape``, ``out_dtype`` (safetensors code): what is written;
    - ``compute_dtype``: the config's ``dtype`` (torch name, e.g. ``"bfloat16"``) the inputs
      are converted to before merging, or None to keep each input's dtype;
    - ``method``: a merge method name, or ``"copy"`` (non-floating tensors: ``inputs[0]`` is
      written unchanged);
    - ``inputs``: in the config's model order, the base included (a base model that is not
      listed comes last); ``base_index``: the base's position for methods that use a base
      (task-arithmetic family, slerp), else None;
    - ``global_params``: ``{name: value}`` of the method's global parameters (normalize,
      lambda, rescale, int8_mask, t ...); for passthrough, ``scale`` is mirrored here from
      ``input_params`` (its only input);
    - ``input_params``: ``{name: [value per input]}`` (weight, density, gamma, scale), None
      at the base's position for the parameters the base does not take;
    - ``layer``: the output layer index (within its layer stack), None for non-layer tensors;
    - ``u``: the position gradients were evaluated at;
    - ``tail_from``: with ``vocab_rows: first`` and a first model of a larger vocabulary, the
      input whose rows from ``common_rows`` on are copied to the output after the merge of
      the first ``common_rows`` rows (``mergecore.vocab_tail``); else None.
    """

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    compute_dtype: str | None
    method: str
    inputs: list[PlannedInput]
    base_index: int | None
    global_params: dict[str, Any] = field(default_factory=dict)
    input_params: dict[str, list[Any]] = field(default_factory=dict)
    layer: int | None = None
    u: float = 0.0
    tail_from: int | None = None
    common_rows: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_nbytes(self) -> int:
        return self.numel * SAFETENSORS_DTYPES[self.out_dtype][1]


@dataclass
class MergePlan:
    """Everything a merge run needs, decided before any tensor is read.

    ``tensors`` in output order (embeddings, layers in order, the rest). ``output_config``:
    the config.json to write (None when the donor has none). ``models``: every input model
    reference, in config order. ``tokenizer_path``: the directory to copy the tokenizer from
    (``tokenizer_source``, else the base model, else the first model). ``num_layers``: output
    layers of the main stack. ``total_input_bytes`` counts each distinct input tensor once.
    """

    tensors: list[PlannedTensor]
    output_config: dict[str, Any] | None
    base_model: str | None
    tokenizer_source: str | None
    random_seed: int | None
    total_output_bytes: int
    total_input_bytes: int
    method: str = ""
    models: list[str] = field(default_factory=list)
    tokenizer_path: str | None = None
    chat_template: str | None = None
    num_layers: int | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    name: str | None = None
    warnings: list[str] = field(default_factory=list)

    def tensor(self, name: str) -> PlannedTensor:
        """The planned tensor called ``name`` (``KeyError`` if none)."""
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


def distinct_input_bytes(inputs: list[PlannedInput]) -> int:
    """Bytes to read for ``inputs``: each distinct stored tensor (file, offset) once."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for inp in inputs:
        key = (str(inp.info.file), inp.info.data_start)
        if key not in seen:
            seen.add(key)
            total += inp.info.nbytes
    return total


# ----- internal structures -------------------------------------------------------------------


@dataclass
class _Source:
    ref: ModelRef
    ckpt: Checkpoint
    layout: ModelLayout
    start: int
    params: Mapping[str, Setting]
    where: str


class _Unplannable(Exception):
    """A group of sources that cannot be checked (structure_problems with unopened models)."""


@dataclass
class _Group:
    where: str
    sources: list[_Source]
    base: ModelRef | None
    params: Mapping[str, Setting]
    length: int

    def base_position(self) -> int | None:
        if self.base is None:
            return None
        for k, s in enumerate(self.sources):
            if s.ref.ref == self.base.ref:
                return k
        return None

    def reference(self) -> int:
        k = self.base_position()
        return 0 if k is None else k


def _listing(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_LIST_LIMIT])
    more = f" and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
    return shown + more


def _phrase(names: list[str], noun: str = "tensor") -> str:
    return f"{noun}{'s' if len(names) > 1 else ''} {_listing(names)}"


def promoted_dtype(infos: list[TensorInfo]) -> str | None:
    """The safetensors code of the inputs' promoted dtype (torch's rules); None when torch
    has none (float8 next to another float dtype)."""
    dt = infos[0].torch_dtype
    try:
        for info in infos[1:]:
            dt = torch.promote_types(dt, info.torch_dtype)
    except RuntimeError:
        return None
    return TORCH_TO_SAFETENSORS[dt]


class _Planner:
    def __init__(self, config: MergeConfig, checkpoints: Mapping[str, Checkpoint], *,
                 out_dtype: str | None, allow_crimes: bool, report_parameters: bool = True,
                 skip_unopened: bool = False):
        self.config = config
        self.report_parameters = report_parameters  # False: the YAML check reports them
        # True: models without a checkpoint (the caller reports why) are left out of the
        # plan, which then checks the others; ``dropped`` says whether any was
        self.skip_unopened = skip_unopened
        self.dropped = False
        self.method: MethodSpec = METHODS[config.merge_method]
        self.checkpoints = checkpoints
        self.allow_crimes = allow_crimes
        self.problems = Problems()
        self.warnings: list[str] = list(config.warnings)
        self.issues: dict[str, list[str]] = {}  # message -> tensor names
        self.details: dict[str, str] = {}  # message -> detail of its first tensor
        self.missing: dict[str, list[str]] = {}  # model ref -> missing tensor names
        self.tensors: list[PlannedTensor] = []
        self.out_names: set[str] = set()
        self.used: dict[str, set[str]] = {}  # model path -> input names used
        self.vocab_rows: int | None = None
        self.compute_dtype = config.dtype
        self.out_dtype_name = self._dtype_arg(out_dtype) or config.out_dtype or config.dtype
        self.layouts: dict[str, ModelLayout] = {}

    # --- helpers ---
    def _dtype_arg(self, value: str | None) -> str | None:
        if value is None:
            return None
        key = str(value).lower().removeprefix("torch.")
        if key not in DTYPE_NAMES:
            self.problems.add("out_dtype", f"unknown dtype {value!r}; use float32, float16 or "
                              "bfloat16")
            return None
        return DTYPE_NAMES[key]

    def issue(self, message: str, tensor: str, detail: str | None = None) -> None:
        """Record a per-tensor problem; tensors with the same problem are reported together
        (with the ``detail`` of the first one)."""
        if message not in self.issues:
            self.issues[message] = []
            if detail:
                self.details[message] = detail
        if tensor not in self.issues[message]:
            self.issues[message].append(tensor)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def checkpoint(self, ref: ModelRef) -> Checkpoint | None:
        ckpt = self.checkpoints.get(ref.ref)
        if ckpt is None:
            ckpt = self.checkpoints.get(ref.path)
        return ckpt

    def layout(self, ref: ModelRef, ckpt: Checkpoint) -> ModelLayout:
        if ref.path not in self.layouts:
            count = config_layer_count(ckpt.config)
            layout = detect_layout(ckpt.tensors, count[1] if count else None)
            self.layouts[ref.path] = layout
            if count is not None and layout.stacks and not any(
                    s.num_layers == count[1] for s in layout.stacks.values()):
                stacks = ", ".join(f"{s.num_layers} under {s.prefix!r}"
                                   for s in layout.stacks.values())
                self.problems.add(f"model {ref.path!r}", f"config.json says {count[0]} = "
                                  f"{count[1]}, but the checkpoint holds {stacks} layers")
        return self.layouts[ref.path]

    # --- inputs ---
    def open_inputs(self) -> bool:
        ok = True
        for ref in self.config.models_to_open():
            if self.checkpoint(ref) is None and not self.skip_unopened:
                self.problems.add(f"model {ref.ref!r}", "no checkpoint was opened for it")
                ok = False
            if ref.adapter is not None and not Path(ref.adapter).expanduser().exists():
                self.problems.add(f"model {ref.ref!r}", f"LoRA adapter path {ref.adapter!r} "
                                  "does not exist")
        src = self.config.tokenizer_source
        if src not in (None, "base"):
            path = parse_model_ref(src).path
            if self.checkpoints.get(path) is None and not Path(path).expanduser().exists():
                self.problems.add("tokenizer_source", f"model path {path!r} does not exist")
        return ok

    def check_architectures(self) -> None:
        archs: dict[str, list[str]] = {}
        for ref in self.config.input_models():
            ckpt = self.checkpoint(ref)
            if ckpt is None:  # skip_unopened
                continue
            cfg = ckpt.config or {}
            arch = cfg.get("architectures")
            key = ", ".join(arch) if isinstance(arch, list) else None
            if key:
                archs.setdefault(key, []).append(ref.ref)
        if len(archs) > 1 and not self.allow_crimes:
            desc = "; ".join(f"{a}: {', '.join(map(repr, ms))}" for a, ms in archs.items())
            self.problems.add(None, f"the models have different architectures ({desc}); pass "
                              "--allow-crimes to merge them anyway")

    def source(self, ref: ModelRef, start: int, params: Mapping[str, Setting] | None,
               where: str) -> _Source | None:
        """The source ``ref`` at key path ``where``; None for a model without a checkpoint
        (``skip_unopened``: it is left out of its group)."""
        ckpt = self.checkpoint(ref)
        if ckpt is None:
            self.dropped = True
            return None
        return _Source(ref, ckpt, self.layout(ref, ckpt), start, params or {}, where)

    def group(self, where: str, sources: list[_Source | None], base: ModelRef | None,
              params: Mapping[str, Setting], length: int) -> _Group:
        kept = [s for s in sources if s is not None]
        if not kept or (self.method.needs_base and base is not None
                        and self.checkpoint(base) is None):
            raise _Unplannable(where)  # no model left, or no base to take deltas from
        return _Group(where, kept, base, params, length)

    def groups(self) -> list[_Group]:
        cfg = self.config
        if cfg.models is not None:
            sources = [self.source(m.model, 0, m.parameters, m.where or f"models[{i}]")
                       for i, m in enumerate(cfg.models)]
            if cfg.base_model is not None and all(s is None or s.ref.ref != cfg.base_model.ref
                                                  for s in sources):
                sources.append(self.source(cfg.base_model, 0, None, "base_model"))
            return [self.group("models", sources, cfg.base_model, {}, 0)]
        out = []
        for i, sl in enumerate(cfg.slices or []):
            sources = [self.source(s.model, s.layer_range[0], s.parameters,
                                   s.where or f"slices[{i}].sources[{j}]")
                       for j, s in enumerate(sl.sources)]
            out.append(self.group(sl.where or f"slices[{i}]", sources,
                                  sl.base_model or cfg.base_model, sl.parameters, sl.num_layers))
        return out

    # --- parameters ---
    def resolve(self, group: _Group, names: list[str], out_name: str, u: float
                ) -> tuple[dict[str, Any], dict[str, list[Any]]] | None:
        """The tensor's global and per-input parameters (with ``report_parameters`` off, a
        value that does not resolve is None); None after a problem was recorded."""
        top = self.config.parameters
        base_pos = group.base_position() if self.method.needs_base else None
        glob: dict[str, Any] = {}
        per: dict[str, list[Any]] = {}

        def value(spec: ParamSpec, chain: list[Mapping[str, Setting]], **where: Any) -> Any:
            try:
                return resolve_parameter(spec, chain, u=u, **where)
            except ValueError:
                if self.report_parameters:
                    raise
                return None  # the YAML check reports it; the others are still checked

        try:
            for spec in self.method.global_params:
                glob[spec.name] = value(spec, [group.params, top], tensor_name=out_name)
            for spec in self.method.input_params:
                values = []
                for k, src in enumerate(group.sources):
                    if spec.scope == NON_BASE and k == base_pos:
                        values.append(None)
                        continue
                    values.append(value(spec, [src.params, group.params, top],
                                        tensor_name=names[k], model=src.ref.ref))
                per[spec.name] = values
        except ValueError as exc:  # MissingParameterError, ParameterValueError
            msg = str(exc)
            tensor_at = msg.rfind(" (tensor ")
            key = msg[:tensor_at] if tensor_at > 0 else msg
            self.issue(f"{group.where}: {key}", out_name)
            return None
        return glob, per

    def check_values(self, out_name: str, numel: int, group: _Group, base_pos: int | None,
                     glob: dict[str, Any], per: dict[str, list[Any]]) -> None:
        m = self.method.name
        others = [k for k in range(len(group.sources)) if k != base_pos]
        weights = per.get("weight", [])
        if (m == "linear" and glob.get("normalize") and not self.dropped
                and None not in weights and weights_cancel(weights)):
            self.issue("linear with normalize: the weights sum to 0 (set normalize: false "
                       "or change the weights)", out_name)
        for k in others:
            who = group.sources[k].ref.ref
            density = per.get("density", [None] * len(group.sources))[k]
            if density is None:
                continue
            if density < 0:
                self.issue(f"model {who!r}: density {density} is negative", out_name)
            elif m in MAGNITUDE_TRIM_METHODS and density < 1 and int(density * numel) <= 0:
                self.issue(f"model {who!r}: density {density} keeps int(density * numel) = 0 "
                           "entries (raise the density, or exclude these tensors with a "
                           "filter)", out_name)
            elif (m in RANDOM_DROP_METHODS and glob.get("rescale") == "inverse_density"
                  and density == 0):
                self.issue(f"model {who!r}: rescale: inverse_density divides by the density, "
                           "which is 0", out_name)
            gamma = per.get("gamma", [None] * len(group.sources))[k]
            if gamma is not None and gamma < 0:
                self.issue(f"model {who!r}: gamma {gamma} is negative", out_name)

    # --- one output tensor ---
    def is_vocab(self, group: _Group, infos: list[TensorInfo], name: str) -> bool:
        sizes = [config_vocab_size(s.ckpt.config) for s in group.sources]
        if all(v is not None for v in sizes):
            return all(info.shape[0] == v for info, v in zip(infos, sizes))
        low = name.lower()
        return any(mk in low for mk in _VOCAB_NAME_MARKERS)

    def emit(self, out_name: str, names: list[str], group: _Group, u: float,
             layer: int | None) -> None:
        if out_name in self.out_names:
            self.problems.add(None, f"output tensor {out_name!r} would be written twice")
            return
        self.out_names.add(out_name)
        infos: list[TensorInfo] = []
        for src, name in zip(group.sources, names):
            self.used.setdefault(src.ref.path, set()).add(name)
            info = src.ckpt.tensors.get(name)
            if info is None:
                self.missing.setdefault(src.ref.ref, []).append(name)
            else:
                infos.append(info)
        if len(infos) != len(group.sources):
            return
        ref = group.reference()
        who = [s.ref.ref for s in group.sources]
        floats = {info.is_float for info in infos}
        if len(floats) > 1:
            desc = ", ".join(f"{w!r}: {i.dtype}" for w, i in zip(who, infos))
            self.problems.add(f"tensor {out_name!r}", f"is floating point in some models and "
                              f"not in others ({desc})")
            return
        shapes = {info.shape for info in infos}
        rows = tail_from = None
        shape = infos[ref].shape
        if len(shapes) > 1:
            same_tail = len({(len(s), s[1:]) for s in shapes}) == 1 and len(shape) >= 1
            if same_tail and floats == {True} and self.is_vocab(group, infos, names[ref]):
                rows = min(s[0] for s in shapes)
                if self.config.vocab_rows == "first" and shape[0] > rows:
                    tail_from = ref  # the output keeps the first model's vocabulary
                else:
                    shape = (rows, *shape[1:])
                    self.vocab_rows = rows if self.vocab_rows is None else min(self.vocab_rows,
                                                                               rows)
                self.warn(f"tensor {out_name!r}: vocabularies differ ("
                          + ", ".join(f"{w!r}: {i.shape[0]}" for w, i in zip(who, infos))
                          + f"); merging the first {rows} rows"
                          + (f", the rest copied from {who[ref]!r}" if tail_from is not None
                             else ""))
            else:
                odd = [w for w, i in zip(who, infos) if i.shape != infos[ref].shape]
                desc = ", ".join(f"{w!r}: {list(i.shape)}" for w, i in zip(who, infos))
                self.issue(f"shapes differ between the reference model {who[ref]!r} and "
                           f"{', '.join(map(repr, odd))}", out_name, detail=desc)
                return

        if floats == {False}:
            dtypes = {info.dtype for info in infos}
            if len(dtypes) > 1:
                desc = ", ".join(f"{w!r}: {i.dtype}" for w, i in zip(who, infos))
                self.problems.add(f"tensor {out_name!r}", f"dtypes differ ({desc})")
                return
            src = group.sources[ref]
            self.tensors.append(PlannedTensor(
                name=out_name, shape=tuple(shape), out_dtype=infos[ref].dtype,
                compute_dtype=None, method="copy",
                inputs=[PlannedInput(src.ref.ref, infos[ref], src.ref.adapter)],
                base_index=None, layer=layer, u=u))
            return

        resolved = self.resolve(group, names, out_name, u)
        if resolved is None:
            return
        glob, per = resolved
        base_pos = group.base_position() if self.method.needs_base else None
        numel = math.prod(shape)
        self.check_values(out_name, numel, group, base_pos, glob, per)
        # with ``report_parameters`` off some values may be None (structure_problems,
        # shape_plan): the tensor is planned for its shape and dtype; such a plan never runs
        if self.method.name == "passthrough":
            glob["scale"] = per["scale"][0]
        if self.out_dtype_name is not None:
            out_code = DTYPE_CODES[self.out_dtype_name]
        else:
            out_code = promoted_dtype(infos)
            if out_code is None:
                desc = ", ".join(f"{w!r}: {i.dtype}" for w, i in zip(who, infos))
                self.problems.add(f"tensor {out_name!r}", f"dtypes {desc} have no common "
                                  "output dtype (float8 promotes only to itself); set "
                                  "dtype or out_dtype")
                return
            if out_code in FLOAT8_CODES:
                self.problems.add(f"tensor {out_name!r}", f"float8 inputs ({out_code}) are "
                                  "merged in float32 and not written back as float8; set "
                                  "dtype or out_dtype (bfloat16, float16 or float32)")
                return
        inputs = [PlannedInput(s.ref.ref, info, s.ref.adapter,
                               rows if rows is not None and info.shape[0] > rows
                               and k != tail_from else None)
                  for k, (s, info) in enumerate(zip(group.sources, infos))]
        self.tensors.append(PlannedTensor(
            name=out_name, shape=tuple(shape), out_dtype=out_code,
            compute_dtype=self.compute_dtype, method=self.method.name, inputs=inputs,
            base_index=base_pos, global_params=glob, input_params=per, layer=layer, u=u,
            tail_from=tail_from, common_rows=rows if tail_from is not None else None))

    # --- the two forms ---
    def plan_models(self, group: _Group) -> int:
        ref_src = group.sources[group.reference()]
        R = ref_src.layout
        for src in group.sources:
            for prefix, stack in R.stacks.items():
                other = src.layout.stacks.get(prefix)
                if other is None:
                    self.problems.add(f"model {src.ref.ref!r}", f"has no layers under "
                                      f"{prefix!r} (model {ref_src.ref.ref!r} has "
                                      f"{stack.num_layers})")
                elif other.num_layers != stack.num_layers:
                    self.problems.add(f"model {src.ref.ref!r}", f"has {other.num_layers} layers "
                                      f"under {prefix!r}, model {ref_src.ref.ref!r} has "
                                      f"{stack.num_layers}: models: needs the same number of "
                                      "layers in every model (use slices: otherwise)")
        if self.problems:
            return R.num_layers
        k = len(group.sources)
        for name in R.pre:
            self.emit(name, [name] * k, group, 0.0, None)
        for prefix, stack in R.stacks.items():
            n = stack.num_layers
            for i in range(n):
                u = i / (n - 1) if n > 1 else 1.0
                for rest in stack.rests[i]:
                    name = stack.name(i, rest)
                    self.emit(name, [name] * k, group, u, i)
        for name in R.post:
            self.emit(name, [name] * k, group, 0.0, None)
        for src in group.sources:
            extra = [n for n in src.ckpt.tensors if n not in self.used.get(src.ref.path, ())]
            if extra:
                self.warn(f"model {src.ref.ref!r}: {_phrase(extra)} not in the reference model "
                          f"{ref_src.ref.ref!r} ignored")
        return R.num_layers

    def plan_slices(self, groups: list[_Group]) -> int:
        for g in groups:
            for src in g.sources:
                lay = src.layout
                if not lay.stacks:
                    self.problems.add(f"{src.where}.model", f"model {src.ref.ref!r} has no "
                                      "numbered layers (no '<prefix>.<N>.' tensor names)")
                elif len(lay.stacks) > 1:
                    self.problems.add(f"{src.where}.model", f"model {src.ref.ref!r} has several "
                                      f"layer stacks ({', '.join(lay.stacks)}); slices: can "
                                      "address only one (use models:)")
                elif src.start + g.length > lay.num_layers:
                    self.problems.add(f"{src.where}.layer_range", f"[{src.start}, "
                                      f"{src.start + g.length}) is out of bounds: model "
                                      f"{src.ref.ref!r} has {lay.num_layers} layers")
        if self.problems:
            return 0
        out_model = self.config.output_config_model
        out_layout = self.layouts.get(out_model.path)
        out_prefix = (out_layout.main.prefix if out_layout is not None and out_layout.main
                      else groups[0].sources[groups[0].reference()].layout.main.prefix)
        first = groups[0]
        k0 = first.sources[first.reference()].layout
        for name in k0.pre:
            self.emit(name, [name] * len(first.sources), first, 0.0, None)
        out_idx = 0
        for g in groups:
            ref_src = g.sources[g.reference()]
            n = g.length
            for idx in range(n):
                u = idx / (n - 1) if n > 1 else 1.0
                for rest in ref_src.layout.main.rests[ref_src.start + idx]:
                    names = [s.layout.main.name(s.start + idx, rest) for s in g.sources]
                    self.emit(f"{out_prefix}.{out_idx}.{rest}", names, g, u, out_idx)
                out_idx += 1
        last = groups[-1]
        kl = last.sources[last.reference()].layout
        for name in kl.post:
            self.emit(name, [name] * len(last.sources), last, 0.0, None)
        return out_idx

    # --- output config ---
    def output_config(self, num_layers: int) -> dict[str, Any] | None:
        donor = self.config.output_config_model
        ckpt = self.checkpoint(donor)
        if ckpt is None or ckpt.config is None:
            self.warn(f"model {donor.ref!r} has no config.json: the output will have none")
            return None
        out = copy.deepcopy(ckpt.config)
        if self.config.slices is not None:
            key = config_layer_count(out)
            if key is None:
                self.warn(f"config.json of {donor.ref!r} has no layer count key "
                          "(num_hidden_layers, n_layer, num_layers): set it by hand to "
                          f"{num_layers}")
            else:
                set_config_value(out, key[0], num_layers)
        if self.out_dtype_name is not None:
            keys = [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype"]
            for k in keys:
                out[k] = self.out_dtype_name
        vocab = config_vocab_size(out)
        if self.vocab_rows is not None and vocab is not None and vocab != self.vocab_rows:
            key = "vocab_size" if "vocab_size" in out else "text_config.vocab_size"
            set_config_value(out, key, self.vocab_rows)
        return out

    def tokenizer_path(self) -> str:
        src = self.config.tokenizer_source
        if src == "base" and self.config.base_model is not None:
            return self.config.base_model.path
        if src not in (None, "base"):
            return parse_model_ref(src).path
        return self.config.output_config_model.path

    def report(self) -> None:
        for model, names in self.missing.items():
            self.problems.add(f"model {model!r}", f"lacks {len(names)} tensor"
                              f"{'s' if len(names) > 1 else ''} the merge needs: "
                              f"{_listing(names)}")
        for message, names in self.issues.items():
            detail = self.details.get(message)
            example = f" (first: {detail})" if detail else ""
            self.problems.add(None, f"{_phrase(names)}: {message}{example}")

    def run(self, random_seed: int | None) -> MergePlan:
        if not self.open_inputs():
            self.problems.raise_if_any()
        self.check_architectures()
        groups = self.groups()
        if self.config.models is not None:
            num_layers = self.plan_models(groups[0])
        else:
            num_layers = self.plan_slices(groups)
        self.report()
        self.problems.raise_if_any()
        seen: set[tuple[str, int]] = set()
        total_in = 0
        for t in self.tensors:
            for inp in t.inputs:
                key = (str(inp.info.file), inp.info.data_start)
                if key not in seen:
                    seen.add(key)
                    total_in += inp.info.nbytes
        cfg = self.config
        return MergePlan(
            tensors=self.tensors,
            output_config=self.output_config(num_layers),
            base_model=cfg.base_model.ref if cfg.base_model else None,
            tokenizer_source=cfg.tokenizer_source,
            random_seed=random_seed if random_seed is not None else cfg.random_seed,
            total_output_bytes=sum(t.out_nbytes for t in self.tensors),
            total_input_bytes=total_in,
            method=cfg.merge_method,
            models=[r.ref for r in cfg.input_models()],
            tokenizer_path=self.tokenizer_path(),
            chat_template=cfg.chat_template,
            num_layers=num_layers,
            dtype=cfg.dtype,
            out_dtype=self.out_dtype_name,
            name=cfg.name,
            warnings=self.warnings,
        )


def build_plan(config: MergeConfig, checkpoints: Mapping[str, Checkpoint], *,
               out_dtype: str | None = None, random_seed: int | None = None,
               allow_crimes: bool = False) -> MergePlan:
    """Plan every output tensor of ``config`` from the inputs' headers.

    ``checkpoints`` maps a model path (or a whole reference string) to its opened
    ``Checkpoint`` (``mergecore.io.open_checkpoint``). ``out_dtype`` overrides the config's
    output dtype; ``random_seed`` the config's seed. Raises ``ConfigError`` listing every
    problem (missing tensors, shape mismatches, out-of-range layers, missing parameters,
    zero weight sums, densities that keep nothing ...). Reads no tensor data.
    """
    if config.merge_method not in METHODS:
        raise ConfigError([f"merge method {config.merge_method!r} is not supported"])
    if config.blockmerge is not None:
        config = resolve_blockmerge(config, checkpoints)
    planner = _Planner(config, checkpoints, out_dtype=out_dtype, allow_crimes=allow_crimes)
    return planner.run(random_seed)


def structure_problems(config: MergeConfig, checkpoints: Mapping[str, Checkpoint], *,
                       allow_crimes: bool = False, report_parameters: bool = False) -> list[str]:
    """What ``build_plan`` finds wrong in the inputs' headers for ``config`` (shapes that
    differ, missing tensors, layer counts, layer_range bounds, dtypes, densities that keep
    nothing ...) when the caller already has problems to report, so that one run lists them
    all. Two such cases:

    - some models could not be opened (absent from ``checkpoints``; the caller says why):
      they are left out, and the others are checked among themselves (nothing is checked
      when a group loses its base model or every model);
    - the YAML has problems of its own (``report_parameters`` False): parameters that do
      not resolve are not reported (the YAML check does); the values that do are checked.

    A config too broken to plan gives no problems rather than an exception; a BlockMerge
    config gives none. Reads no tensor data."""
    return _lenient_plan(config, checkpoints, allow_crimes=allow_crimes,
                         report_parameters=report_parameters, skip_unopened=True)[1]


def shape_plan(config: MergeConfig, checkpoints: Mapping[str, Checkpoint], *,
               allow_crimes: bool = False) -> MergePlan | None:
    """The plan of a stage whose ``build_plan`` failed only on parameters that do not
    resolve (a missing ``weight`` ...): its tensors, shapes, output dtypes and config.json
    are still known, so later documents of a recipe can be checked against what it would
    output in the same run. Unresolved parameters are None: the plan is for checking, never
    for merging. None when the headers show problems too (or the config cannot be planned
    at all). Reads no tensor data."""
    return _lenient_plan(config, checkpoints, allow_crimes=allow_crimes,
                         report_parameters=False, skip_unopened=False)[0]


def _lenient_plan(config: MergeConfig, checkpoints: Mapping[str, Checkpoint], *,
                  allow_crimes: bool, report_parameters: bool, skip_unopened: bool
                  ) -> tuple[MergePlan | None, list[str]]:
    """A planner run for checking (``structure_problems``, ``shape_plan``): (the plan, or
    None; the problems it found). A BlockMerge config or an unknown method gives (None, []),
    and so does a config too broken to plan (_Unplannable ...): the caller's own problems
    are reported."""
    if config.blockmerge is not None or config.merge_method not in METHODS:
        return None, []
    planner = _Planner(config, checkpoints, out_dtype=None, allow_crimes=allow_crimes,
                       report_parameters=report_parameters, skip_unopened=skip_unopened)
    try:
        return planner.run(None), []
    except ConfigError as exc:
        return None, exc.problems
    except Exception:  # noqa: BLE001 - half-checked config
        return None, []


__all__ = [
    "MergePlan",
    "PlannedInput",
    "PlannedTensor",
    "build_plan",
    "distinct_input_bytes",
    "shape_plan",
    "structure_problems",
]
