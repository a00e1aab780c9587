"""BlockMerge_Gradient documents, translated into a ``linear`` merge with per-tensor weights.

The YAML (Gryphe's BlockMerge_Gradient format)::

    model_path1: PATH              # the model the result starts from (its config, tokenizer)
    model_path2: PATH
    output_model_path: PATH        # accepted; mergecore writes to the OUT_DIR it is given
    max_shard_size: 2000MiB        # accepted; the shard size is --out-shard-size
    out_dtype: float16             # mergecore extension (default float16, as the script saves)
    name: STAGE                    # mergecore extension: a stage of a multi-stage recipe
    operations:
      - {operation: LABEL, filter: SUBSTRING, gradient_values: [g0, ..., gm],
         layer_only: false, no_layers: false}

The rule (docs/semantics.md, "BlockMerge_Gradient"). The tensor names, in the order of the
model class's ``state_dict()`` (``architecture_order``), are filtered per operation:
names containing "layer" with ``layer_only``, names without it with ``no_layers``, then
names containing ``filter``. With ``m = len(g) - 1`` sections and ``q = len(names) // m``,
the ratios are ``linspace(g[j], g[j + 1], q)`` for each section ``j``, then ``g[m]`` for the
remainder (a single value is used for all). The ``i``-th name gets ``r_i``, the share of
model 2: ``out = (1 - r_i) * current + r_i * model2``. Operations apply in order, each on the
result of the previous one, so a tensor reached by ratios ``r_1 .. r_k`` ends as
``(1 - R) * model1 + R * model2`` with ``R = 1 - prod(1 - r_j)``: that ``R`` becomes the
tensor's weight in one ``linear`` merge (``normalize: false``), computed in float32 and
rounded once. Tensors no operation reaches keep model 1's values (weight ``R = 0``).
A floating-point tensor of model 1 that the order does not hold (say, MoE experts that the
installed transformers fuses and renames) is an error: its position, and so the sections,
cannot be known. Buffers and names transformers drops on load are not blended (``R = 0``);
names of the order that the files lack (a tied ``lm_head``) still count in the sections.
``lm_head`` / ``embed_tokens`` of different vocabularies: the output has model 1's rows;
the shared rows are blended, model 1's extra rows kept, model 2's extra rows dropped
(``MergeConfig.vocab_rows = "first"``).

Translation happens in two steps: parsing (no file is read) records the operations in a
``BlockMergeSpec`` on the ``MergeConfig``; ``resolve_blockmerge`` (called by the planner with
the opened checkpoints) turns them into per-tensor weights: one ``{filter: NAME, value: w}``
conditional per tensor name, longest names first, so each name matches only its own entry.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mergecore.config.errors import ConfigError
from mergecore.config.params import Conditional

if TYPE_CHECKING:
    from mergecore.config.schema import MergeConfig, _Checker

KEYS = ("model_path1", "model_path2", "output_model_path", "max_shard_size", "operations",
        "out_dtype", "name")
OPERATION_KEYS = ("operation", "filter", "gradient_values", "layer_only", "no_layers")
DEFAULT_OUT_DTYPE = "float16"


@dataclass(frozen=True)
class BlockMergeOperation:
    """One entry of ``operations``."""

    label: str
    gradient_values: tuple[float, ...]
    filter: str | None = None
    layer_only: bool = False
    no_layers: bool = False

    def selects(self, name: str) -> bool:
        if self.layer_only and "layer" not in name:
            return False
        if self.no_layers and "layer" in name:
            return False
        return self.filter is None or self.filter in name


@dataclass(frozen=True)
class BlockMergeSpec:
    """What a BlockMerge_Gradient document asks for, before tensor names are known."""

    operations: tuple[BlockMergeOperation, ...]
    output_model_path: str | None = None
    max_shard_size: str | int | None = None


def is_blockmerge(raw: Any) -> bool:
    """Whether a YAML document is in BlockMerge_Gradient's format (recognized by its keys)."""
    return isinstance(raw, dict) and "merge_method" not in raw and (
        "model_path1" in raw or "model_path2" in raw)


# ----- the rule ---------------------------------------------------------------------------------


def operation_ratios(op: BlockMergeOperation, names: Sequence[str]) -> dict[str, float]:
    """``{name: r}`` for the names ``op`` selects (``names`` in state_dict order)."""
    keys = [n for n in names if op.selects(n)]
    g = list(op.gradient_values)
    if len(g) == 1:
        g = [g[0], g[0]]
    sections = len(g) - 1
    per_section = len(keys) // sections
    ratios: list[float] = []
    for j in range(sections):
        ratios.extend(float(v) for v in np.linspace(g[j], g[j + 1], per_section))
    ratios.extend([float(g[-1])] * (len(keys) - len(ratios)))
    return dict(zip(keys, ratios))


def blend_weights(ops: Sequence[BlockMergeOperation], names: Sequence[str]) -> dict[str, float]:
    """``{name: R}``: model 2's share of every name after all operations (0 where none
    applies), ``R = 1 - prod(1 - r_j)`` over the operations that reach the name."""
    keep1 = dict.fromkeys(names, 1.0)
    for op in ops:
        for name, r in operation_ratios(op, names).items():
            keep1[name] *= 1.0 - r
    return {name: 1.0 - k for name, k in keep1.items()}


@dataclass(frozen=True)
class ArchitectureOrder:
    """What the model class says about tensor names: ``names`` in ``state_dict()`` order, and
    which other names a checkpoint may legitimately hold (see :meth:`ignorable`)."""

    arch: str
    names: tuple[str, ...]
    #: every buffer of the class (persistent or not) - e.g. ``inv_freq``, causal masks
    buffers: frozenset[str] = frozenset()
    #: the patterns transformers drops from a checkpoint when it loads one into the class
    #: (``_keys_to_ignore_on_load_unexpected``, old per-layer ``rotary_emb.inv_freq``, old
    #: persistent ``position_ids``): None when there are none
    ignore_unexpected: re.Pattern[str] | None = None
    #: the version of transformers the order came from (error messages name it)
    transformers_version: str = ""

    def ignorable(self, name: str) -> bool:
        """Whether a checkpoint tensor outside ``names`` is legitimately there: a buffer of
        the class or a name transformers itself ignores on load. The script never sees such
        a tensor in ``state_dict()``, so no operation blends it; it keeps model 1's values."""
        return name in self.buffers or (self.ignore_unexpected is not None
                                        and self.ignore_unexpected.search(name) is not None)

    def unordered(self, tensors: Mapping[str, Any]) -> list[str]:
        """The floating-point checkpoint tensors (``{name: TensorInfo}``) whose position in
        the order cannot be known: not in ``names`` and not :meth:`ignorable`."""
        known = set(self.names)
        return [n for n, info in tensors.items()
                if n not in known and getattr(info, "is_float", True) and not self.ignorable(n)]


def _ignore_pattern(model: Any, buffers: frozenset[str]) -> re.Pattern[str] | None:
    """The regex of checkpoint names transformers ignores when loading into ``model`` (whose
    buffer names are ``buffers``; ``PreTrainedModel._adjust_missing_and_unexpected_keys``)."""
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(b.endswith("position_ids") for b in buffers):
        patterns.add(r"(^|\.)position_ids$")
    if not patterns:
        return None
    return re.compile("|".join(f"({p})" for p in sorted(patterns)))


def architecture_order(config: Mapping[str, Any] | None, where: str) -> ArchitectureOrder:
    """The transformers class named by ``config["architectures"][0]``, built on the meta
    device (no memory): its ``state_dict()`` names in order, its buffers and the names it
    ignores on load.

    Raises ``ConfigError`` (naming ``where``) when the order cannot be known.
    """
    if not config or not config.get("architectures") or not config.get("model_type"):
        raise ConfigError(f"{where}: BlockMerge_Gradient orders tensors as the model class "
                          "does, but the model's config.json names no architectures / "
                          "model_type")
    arch = config["architectures"][0]
    try:
        import torch
        import transformers

        cls = getattr(transformers, arch, None)
        if cls is None:
            raise ValueError(f"transformers has no class {arch!r}")
        fields = {k: v for k, v in config.items() if k != "model_type"}
        hf_config = transformers.AutoConfig.for_model(config["model_type"], **fields)
        with torch.device("meta"):
            model = cls(hf_config)
        buffers = frozenset(name for name, _ in model.named_buffers())
        return ArchitectureOrder(arch, tuple(model.state_dict().keys()), buffers,
                                 _ignore_pattern(model, buffers), transformers.__version__)
    except ImportError:
        raise ConfigError(f"{where}: BlockMerge_Gradient needs transformers to learn the "
                          f"tensor order of {arch}: pip install transformers") from None
    except Exception as exc:  # noqa: BLE001 - any failure to build the class
        raise ConfigError(f"{where}: cannot learn the tensor order of {arch} from "
                          f"transformers: {exc}") from None


def _unordered_problem(where: str, ckpt: Any, order: ArchitectureOrder,
                       missing: Sequence[str]) -> str:
    version = f" {order.transformers_version}" if order.transformers_version else ""
    examples = ", ".join(repr(n) for n in missing[:3])
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    files = "its files" if str(ckpt.path) in where else str(ckpt.path)
    return (f"{where}: {len(missing)} tensor(s) of {files} are not in the tensor order "
            f"of {order.arch} (the state_dict() of the installed transformers{version}), e.g. "
            f"{examples}{more}: the architecture's tensor order cannot be known for these "
            "names (the installed transformers names them differently, e.g. it fuses or "
            "renames them on load), so BlockMerge_Gradient's gradient positions would be "
            "wrong")


def resolve_blockmerge(config: MergeConfig, checkpoints: Mapping[str, Any]) -> MergeConfig:
    """The ``linear`` ``MergeConfig`` with per-tensor weights for a parsed BlockMerge
    document (``config.blockmerge`` set). ``checkpoints`` maps model paths (or references)
    to opened checkpoints; model 1's config.json gives the order, its tensors the names.

    Raises ``ConfigError`` when a floating-point tensor of model 1 is not in the order (nor
    a buffer or a name transformers ignores on load): its position, and so every ratio,
    would be a guess. Names of the order that the files lack (a tied ``lm_head``) are
    counted in the sections, as ``state_dict()`` has them. Reads no tensor data."""
    ref1 = config.models[0].model
    ckpt = checkpoints.get(ref1.ref) or checkpoints.get(ref1.path)
    if ckpt is None:
        raise ConfigError([f"model_path1: no checkpoint was opened for {ref1.ref!r}"])
    where = f"model_path1 {ref1.ref!r}"
    arch_order = architecture_order(ckpt.config, where)
    missing = arch_order.unordered(ckpt.tensors)
    if missing:
        raise ConfigError([_unordered_problem(where, ckpt, arch_order, missing)])
    order = list(arch_order.names)
    weights = blend_weights(config.blockmerge.operations, order)
    names = sorted(set(order) | set(ckpt.tensors), key=len, reverse=True)

    def setting(share_of: int) -> list[Conditional]:
        def w(name: str) -> float:
            r = weights.get(name, 0.0)
            return r if share_of == 2 else 1.0 - r

        return [Conditional(w(n), n) for n in names]

    models = [dataclasses.replace(config.models[0], parameters={"weight": setting(1)}),
              dataclasses.replace(config.models[1], parameters={"weight": setting(2)})]
    return dataclasses.replace(config, models=models, blockmerge=None)


# ----- parsing -----------------------------------------------------------------------------------


def _number_list(raw: Any, where: str, checker) -> tuple[float, ...] | None:
    values = raw if isinstance(raw, list) else [raw] if raw is not None else []
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                             for v in values):
        checker.add(where, f"must be a non-empty list of numbers, not {raw!r}")
        return None
    if not all(np.isfinite(values)):
        checker.add(where, f"must hold finite numbers, not {raw!r}")
        return None
    return tuple(float(v) for v in values)


def _flag(entry: dict, key: str, where: str, checker) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        checker.add(f"{where}.{key}", f"must be true or false, not {value!r}")
        return False
    return value


def _operations(raw: Any, checker) -> tuple[BlockMergeOperation, ...]:
    if not isinstance(raw, list) or not raw:
        checker.add("operations", "must be a non-empty list of {operation: LABEL, filter: "
                    "SUBSTRING, gradient_values: [...]}")
        return ()
    ops = []
    for i, entry in enumerate(raw):
        where = f"operations[{i}]"
        if not isinstance(entry, dict):
            checker.add(where, "must be a mapping {operation, filter, gradient_values, "
                        "layer_only, no_layers}")
            continue
        checker.keys(entry, OPERATION_KEYS, where)
        values = _number_list(entry.get("gradient_values"), f"{where}.gradient_values", checker)
        filt = entry.get("filter")
        if filt is not None and not isinstance(filt, str):
            checker.add(f"{where}.filter", f"must be a string, not {filt!r}")
            filt = None
        layer_only = _flag(entry, "layer_only", where, checker)
        no_layers = _flag(entry, "no_layers", where, checker)
        if layer_only and no_layers:
            checker.add(where, "layer_only and no_layers together select nothing")
        if values is not None:
            ops.append(BlockMergeOperation(str(entry.get("operation", f"operation {i}")), values,
                                           filt or None, layer_only, no_layers))
    return tuple(ops)


def parse_blockmerge(raw: dict, checker: _Checker) -> MergeConfig:
    """A checked ``MergeConfig`` (``linear`` of model 1 and model 2, ``blockmerge`` set) for
    a BlockMerge_Gradient document. ``checker`` is the schema's document checker (problems
    and warnings go to it). Reads no file."""
    from mergecore.config.schema import InputModel, MergeConfig

    checker.keys(raw, KEYS, "")
    refs = []
    for key in ("model_path1", "model_path2"):
        if raw.get(key) is None:
            checker.add(key, "missing")
            continue
        ref = checker.model_ref(raw[key], key)
        if ref is not None:
            refs.append(ref)
    ops = _operations(raw.get("operations"), checker)
    out_path = raw.get("output_model_path")
    if out_path is not None:
        if not isinstance(out_path, str):
            checker.add("output_model_path", f"must be a path, not {out_path!r}")
        else:
            checker.warn("output_model_path", "is not used: mergecore writes to the output "
                         "directory given on the command line")
    shard = raw.get("max_shard_size")
    if shard is not None:
        checker.warn("max_shard_size", "is not used: set the shard size with --out-shard-size")
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        checker.add("name", f"must be a non-empty string, not {name!r}")
        name = None
    if len(refs) == 2 and refs[0].ref == refs[1].ref:
        checker.add("model_path2", "is the same model as model_path1")
    return MergeConfig(
        merge_method="linear",
        models=[InputModel(r) for r in refs],
        parameters={"normalize": False},
        dtype="float32",
        out_dtype=checker.dtype(raw.get("out_dtype", DEFAULT_OUT_DTYPE), "out_dtype"),
        name=name.strip() if isinstance(name, str) else None,
        warnings=checker.warnings,
        blockmerge=BlockMergeSpec(ops, out_path if isinstance(out_path, str) else None, shard),
        vocab_rows="first",
    )
