"""The merge methods mergecore runs from a YAML, with mergekit 0.1.5's parameter specs.

For each method: its parameters (name, type, scope, default or required) and its input
contract (whether it needs a base model, how many inputs it takes). Scopes:

- ``global``: one value per output tensor, filters match the *output* tensor name;
- ``input``: one value per input model, the base included (filters match the input name);
- ``non_base``: one value per input model other than the base (the base gets none).

Types: ``float``, ``bool``, ``optional_float`` (a float, or absent), and ``rescale`` (a bool,
or the mergecore extension strings ``"inverse_density"`` / ``"l1"``).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Marks a parameter without a default: it must be set in the YAML.
REQUIRED = object()

GLOBAL = "global"
INPUT = "input"
NON_BASE = "non_base"


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a merge method."""

    name: str
    kind: str  # "float" | "bool" | "optional_float" | "rescale"
    scope: str  # GLOBAL | INPUT | NON_BASE
    default: object = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its parameters and its input contract.

    ``base``: ``"required"`` (the base model must be one of the inputs) or ``"ignored"`` (a
    base model, if configured, is an ordinary input). ``min_inputs``/``max_inputs`` count
    all inputs, the base included.
    """

    name: str
    params: tuple[ParamSpec, ...]
    base: str  # "required" | "ignored"
    min_inputs: int = 1
    max_inputs: int | None = None

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    def param(self, name: str) -> ParamSpec | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    @property
    def global_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == GLOBAL)

    @property
    def input_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope != GLOBAL)


def _task_arithmetic_family(name: str, *, normalize: bool, rescale: bool,
                            gamma: bool = False) -> MethodSpec:
    params = [
        ParamSpec("int8_mask", "bool", GLOBAL, False),
        ParamSpec("normalize", "bool", GLOBAL, normalize),
        ParamSpec("rescale", "rescale", GLOBAL, rescale),
        ParamSpec("lambda", "float", GLOBAL, 1.0),
        ParamSpec("weight", "float", NON_BASE),
        ParamSpec("density", "float", NON_BASE, 1.0),
    ]
    if gamma:
        params.append(ParamSpec("gamma", "float", NON_BASE, 0.01))
    return MethodSpec(name, tuple(params), base="required")


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec(
            "linear",
            (ParamSpec("weight", "float", INPUT), ParamSpec("normalize", "bool", GLOBAL, True)),
            base="ignored",
        ),
        MethodSpec("slerp", (ParamSpec("t", "float", GLOBAL),), base="required",
                   min_inputs=2, max_inputs=2),
        MethodSpec("passthrough", (ParamSpec("scale", "optional_float", INPUT, None),),
                   base="ignored", max_inputs=1),
        _task_arithmetic_family("task_arithmetic", normalize=False, rescale=False),
        _task_arithmetic_family("ties", normalize=True, rescale=False),
        _task_arithmetic_family("dare_linear", normalize=False, rescale=True),
        _task_arithmetic_family("dare_ties", normalize=False, rescale=True),
        _task_arithmetic_family("breadcrumbs", normalize=False, rescale=False, gamma=True),
        _task_arithmetic_family("breadcrumbs_ties", normalize=False, rescale=False, gamma=True),
    )
}

SUPPORTED_METHODS: tuple[str, ...] = tuple(METHODS)

#: Methods mergekit 0.1.5 offers that mergecore does not run (yet).
MERGEKIT_ONLY_METHODS: tuple[str, ...] = (
    "arcee_fusion", "della", "della_linear", "karcher", "model_stock", "multislerp",
    "nearswap", "nuslerp", "ram", "ramplus_tl", "sce",
)

#: Methods whose trimming keeps ``int(density * numel)`` entries by magnitude.
MAGNITUDE_TRIM_METHODS = frozenset({"ties", "breadcrumbs", "breadcrumbs_ties"})
#: Methods whose trimming drops entries at random (DARE).
RANDOM_DROP_METHODS = frozenset({"dare_linear", "dare_ties"})


def get_method(name: str) -> MethodSpec:
    """The spec of a supported method; ``KeyError`` for any other name."""
    return METHODS[name]


def unsupported_method_message(name: object) -> str:
    """The error line for a ``merge_method`` mergecore does not run."""
    supported = ", ".join(SUPPORTED_METHODS)
    if isinstance(name, str) and name in MERGEKIT_ONLY_METHODS:
        return (f"merge method {name!r} is not supported by mergecore (it is a mergekit method "
                f"mergecore does not implement); supported methods: {supported}")
    return (f"merge method {name!r} is not supported by mergecore (unknown method); "
            f"supported methods: {supported}")
