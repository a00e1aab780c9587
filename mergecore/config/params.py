"""Parameter settings: their YAML forms, and their value for one tensor (mergekit's rules).

A setting is one of
- a scalar (bool, int, float or str);
- a gradient: a list of scalars ``[v_0, ..., v_m]``;
- a conditional ``{filter: SUBSTRING, value: SCALAR_OR_GRADIENT}`` (``Conditional``);
- a list of conditionals.

Its value for a tensor named ``name`` at position ``u`` in [0, 1] (``evaluate_setting``):
- conditionals: the first entry whose filter is absent, ``"*"``, or a substring of ``name``
  is used; when none matches the setting has no value (``None``);
- a gradient of numbers: linear interpolation over evenly spaced knots, ``s = u * m``,
  ``i = int(s)``, ``value = (1 - (s - i)) * v_i + (s - i) * v_{min(i + 1, m)}``
  (the same as ``numpy.interp(u, linspace(0, 1, m + 1), v)``, evaluated as mergekit does);
- a gradient of booleans or strings is not interpolated: ``v_{int(u * m)}``;
- an empty list has no value.
Every scalar is first converted to the parameter's type (``validate_value``), the way
mergekit's pydantic validation does it (``"1e-3"`` is a float, ``"yes"`` is true).

A value is looked up in several scopes, highest precedence first (``resolve_parameter``):
the source model's own parameters, the output slice's, the top-level ``parameters``, then
the method's default. A scope that has the key but no value for this tensor (no filter
matched, empty list) passes on to the next scope.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergecore.config.methods import ParamSpec

Scalar = bool | int | float | str


@dataclass(frozen=True)
class Conditional:
    """``{filter: ..., value: ...}``: ``value`` applies to tensors whose name contains ``filter``."""

    value: Any  # Scalar or list[Scalar]
    filter: str | None = None

    def matches(self, tensor_name: str) -> bool:
        return self.filter is None or self.filter == "*" or (
            bool(tensor_name) and self.filter in tensor_name)


Setting = Scalar | list | Conditional


class ParameterValueError(ValueError):
    """A parameter value cannot be converted to the parameter's type."""


class MissingParameterError(ValueError):
    """A required parameter has no value for a tensor."""


# ----- types ------------------------------------------------------------------------------

_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})
RESCALE_MODES = frozenset({"inverse_density", "l1"})


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            raise ParameterValueError(f"{value!r} is not a number") from None
    else:
        raise ParameterValueError(f"{value!r} is not a number")
    if not math.isfinite(out):
        raise ParameterValueError(f"{value!r} is not a finite number")
    return out


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        if value in (0, 1):
            return bool(value)
        raise ParameterValueError(f"{value!r} is not a boolean (use true or false)")
    if isinstance(value, str) and value.strip().lower() in _TRUE:
        return True
    if isinstance(value, str) and value.strip().lower() in _FALSE:
        return False
    raise ParameterValueError(f"{value!r} is not a boolean (use true or false)")


def validate_value(kind: str, value: Any) -> Any:
    """Convert one scalar to a parameter type: ``float``, ``bool``, ``optional_float``, ``rescale``.

    Raises ``ParameterValueError`` when it cannot be converted (non-finite floats included).
    """
    if kind in ("float", "optional_float"):
        if value is None and kind == "optional_float":
            return None
        return _to_float(value)
    if kind == "bool":
        return _to_bool(value)
    if kind == "rescale":
        if isinstance(value, str) and value.strip().lower() in RESCALE_MODES:
            return value.strip().lower()
        try:
            return _to_bool(value)
        except ParameterValueError:
            raise ParameterValueError(
                f"{value!r} is not a valid rescale (use true, false or 'inverse_density')"
            ) from None
    raise ValueError(f"unknown parameter kind {kind!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ----- evaluation -------------------------------------------------------------------------


def interpolate_gradient(values: Sequence[Any], u: float) -> Any:
    """A gradient's value at ``u``: linear between knots for numbers, a step otherwise."""
    m = len(values) - 1
    if not all(_is_number(v) for v in values):
        return values[int(u * m)]
    scaled = u * m
    i0 = int(scaled)
    i1 = min(m, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def evaluate_setting(tensor_name: str, setting: Setting, u: float = 0.0, *,
                     kind: str = "float") -> Any:
    """The value of ``setting`` for ``tensor_name`` at position ``u``, or None when it has none.

    See the module docstring for the rules. ``kind`` is the parameter type every scalar is
    converted to (``validate_value``).
    """
    if isinstance(setting, Conditional):
        setting = [setting]
    if _is_scalar(setting):
        return validate_value(kind, setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(_is_scalar(e) for e in setting):
            values = [validate_value(kind, e) for e in setting]
            result = interpolate_gradient(values, u)
            return validate_value(kind, result) if _is_number(result) else result
        for cond in setting:
            if not isinstance(cond, Conditional):
                raise ParameterValueError(
                    f"a list of conditions holds {cond!r}, which is not a {{filter, value}}")
            if cond.matches(tensor_name):
                return evaluate_setting(tensor_name, cond.value, u, kind=kind)
        return None
    raise ParameterValueError(f"unexpected parameter setting {setting!r}")


def resolve_parameter(spec: ParamSpec, scopes: Sequence[Mapping[str, Setting] | None], *,
                      tensor_name: str, u: float = 0.0, model: str | None = None) -> Any:
    """A parameter's value for one tensor: the first scope (highest precedence first) that
    has a value for it, else the method's default.

    Raises ``MissingParameterError`` naming the parameter, the model (for a per-model
    parameter) and the tensor when a required parameter has no value.
    """
    for scope in scopes:
        if scope is not None and spec.name in scope:
            value = evaluate_setting(tensor_name, scope[spec.name], u, kind=spec.kind)
            if value is not None:
                return value
    if spec.required:
        who = f" for model {model!r}" if model is not None else ""
        raise MissingParameterError(
            f"missing required parameter {spec.name!r}{who} (tensor {tensor_name!r})")
    return spec.default


# ----- structure (YAML -> Setting) ---------------------------------------------------------


def parse_setting(raw: Any, where: str, problems: list[tuple[str, str]]) -> Setting | None:
    """Check a YAML parameter value's structure and turn ``{filter, value}`` maps into
    ``Conditional``. Problems are appended as ``(key path, message)``; returns None when the
    value is unusable.
    """
    if _is_scalar(raw):
        return raw
    if raw is None:
        problems.append((where, "has no value"))
        return None
    if isinstance(raw, dict):
        return _parse_conditional(raw, where, problems)
    if isinstance(raw, list):
        if all(_is_scalar(e) for e in raw):
            return list(raw)
        if all(isinstance(e, dict) for e in raw):
            out = [_parse_conditional(e, f"{where}[{i}]", problems) for i, e in enumerate(raw)]
            return None if any(c is None for c in out) else out
        for i, e in enumerate(raw):
            if not _is_scalar(e) and not isinstance(e, dict):
                problems.append((f"{where}[{i}]", (f"{_describe(e)} is not allowed here: a "
                                 "gradient is a list of numbers")))
                return None
        problems.append((where, ("mixes plain values and {filter, value} entries; use one "
                         "form (e.g. a last entry {value: X} without filter as the fallback)")))
        return None
    problems.append((where, f"{_describe(raw)} is not a valid parameter value"))
    return None


def _parse_conditional(raw: dict, where: str,
                       problems: list[tuple[str, str]]) -> Conditional | None:
    ok = True
    for key in raw:
        if key not in ("filter", "value"):
            problems.append((f"{where}.{key}", ("unknown key (a conditional parameter has "
                             "'filter' and 'value')")))
            ok = False
    if "value" not in raw or raw["value"] is None:
        problems.append((where, "a conditional parameter needs a 'value'"))
        return None
    value = raw["value"]
    if isinstance(value, list):
        if not all(_is_scalar(e) for e in value):
            problems.append((f"{where}.value", ("must be a number, a boolean, a string or a "
                             "list of those (a gradient)")))
            ok = False
    elif not _is_scalar(value):
        problems.append((f"{where}.value", f"{_describe(value)} is not a valid value"))
        ok = False
    filt = raw.get("filter")
    if filt is not None and not isinstance(filt, str):
        problems.append((f"{where}.filter", f"must be a string, not {_describe(filt)}"))
        ok = False
    return Conditional(value=value, filter=filt) if ok else None


def setting_leaves(setting: Setting, where: str) -> list[tuple[str, Any]]:
    """Every scalar in a setting with its key path (for type checks at parse time)."""
    if isinstance(setting, Conditional):
        if isinstance(setting.value, list):
            return [(f"{where}.value[{i}]", v) for i, v in enumerate(setting.value)]
        return [(f"{where}.value", setting.value)]
    if isinstance(setting, list):
        out: list[tuple[str, Any]] = []
        for i, e in enumerate(setting):
            out += setting_leaves(e, f"{where}[{i}]")
        return out
    return [(where, setting)]


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)
