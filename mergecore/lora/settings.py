"""A PEFT LoRA adapter's ``adapter_config.json``: read, check, and the scale of each module.

What the merge uses from the config:

- ``r``, ``lora_alpha``: the default rank and alpha; ``rank_pattern`` / ``alpha_pattern``
  override them per module: the first key (in file order) that matches the module name as
  the regular expression ``(.*\\.)?(KEY)$`` wins (PEFT's rule);
- ``use_rslora``: the scale is ``alpha / sqrt(r)`` instead of ``alpha / r``;
- ``fan_in_fan_out``: the base weights are stored transposed (GPT-2 ``Conv1D``), so the
  low-rank product is transposed before it is added;
- ``peft_type`` must be ``LORA``.

Keys that only shape training or say which modules received adapters (``target_modules``,
``lora_dropout``, ``layers_to_transform`` ...) are accepted and ignored: the adapter's
tensors say what it changes. Features that change the merged weights in ways mergecore does
not compute (DoRA, layer replication, trainable tokens, LoRA on raw parameters, aLoRA ...)
are errors when they are switched on. A key this module does not know is accepted only
when its value is off (``null``, ``false``, empty): newer PEFT releases add such keys for
new, disabled features; any other value is an error naming the key.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Keys the merge reads (checked below).
USED_KEYS = frozenset({"peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern",
                       "alpha_pattern", "fan_in_fan_out", "modules_to_save", "lora_bias",
                       "bias"})

#: Keys that do not change the merged weights (training knobs, metadata, initialisation,
#: module selection that the saved tensors already reflect).
IGNORED_KEYS = frozenset({
    "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
    "auto_mapping", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "lora_dropout", "init_lora_weights", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "megatron_core", "qalora_group_size",
    "ensure_weight_tying", "enable_lora", "merge_weights", "runtime_config",
})

#: Features that change the merged weights and that mergecore does not implement: the key
#: and why; an error unless the value is off.
UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA (weight-decomposed LoRA) rescales each merged column by a learned "
                "magnitude",
    "layer_replication": "layer replication builds a model with more layers than the base",
    "target_parameters": "LoRA on raw nn.Parameters (e.g. MoE expert weights)",
    "trainable_token_indices": "trainable token embeddings",
    "use_qalora": "QA-LoRA (quantization-aware, pooled inputs)",
    "megatron_config": "Megatron-parallel LoRA layers",
    "alora_invocation_tokens": "activated LoRA (applies only after invocation tokens)",
    "arrow_config": "Arrow routing between several LoRA experts",
    "use_bdlora": "block-diagonal LoRA",
}


class AdapterConfigError(ValueError):
    """An adapter's configuration cannot be merged; the message names the adapter and key."""


def _is_off(value: Any) -> bool:
    return value is None or value is False or value in ({}, [], "", 0)


@dataclass(frozen=True)
class LoraSettings:
    """The parts of ``adapter_config.json`` that decide the merged weights."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    modules_to_save: tuple[str, ...] = ()
    lora_bias: bool = False

    def rank(self, module: str) -> int:
        """The configured rank of ``module`` (a name such as ``model.layers.0.mlp.up_proj``)."""
        key = pattern_key(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha(self, module: str) -> float:
        key = pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scale(self, module: str) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rslora), with the module's own r and alpha."""
        r = self.rank(module)
        alpha = self.alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The first key of ``patterns`` that matches ``module`` as ``(.*\\.)?(KEY)$``, or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


#: PEFT's LoraConfig defaults for the numbers a config may leave out.
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}

#: ``init_lora_weights`` values with which PEFT, loading the adapter, derives the initial
#: factors from the base weight and subtracts their product from it (PiSSA, CorDA, OLoRA,
#: ASTRA, LoftQ): the saved factors only fit that modified base. PEFT converts such an
#: adapter to a plain one with ``save_pretrained(path_initial_model_for_weight_conversion=...)``.
BASE_CHANGING_INITS = ("pissa", "corda", "astra", "olora", "loftq")


def _number(raw: dict, key: str, where: str, *, integer: bool) -> Any:
    value = raw.get(key, PEFT_DEFAULTS.get(key))
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or value <= 0 or not math.isfinite(value):
        kind = "a positive integer" if integer else "a positive number"
        raise AdapterConfigError(f"{where}: {key!r} must be {kind}, not {value!r}")
    return value


def _pattern(raw: dict, key: str, where: str, *, integer: bool) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise AdapterConfigError(f"{where}: {key!r} must be a mapping of module name patterns "
                                 f"to numbers, not {value!r}")
    for k in value:
        try:
            re.compile(k)
        except re.error as exc:
            raise AdapterConfigError(f"{where}: {key}[{k!r}] is not a valid pattern: "
                                     f"{exc}") from None
        _number(value, k, f"{where}: {key}", integer=integer)
    return dict(value)


def parse_settings(raw: Any, where: str) -> LoraSettings:
    """Check a parsed ``adapter_config.json`` (``where`` names it in errors)."""
    if not isinstance(raw, dict):
        raise AdapterConfigError(f"{where}: must be a JSON object")
    problems = []
    peft_type = raw.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        problems.append(f"peft_type is {peft_type!r}; only LORA adapters can be merged")
    for key, why in UNSUPPORTED_FEATURES.items():
        if not _is_off(raw.get(key)):
            problems.append(f"{key} = {raw[key]!r} is not supported by mergecore ({why})")
    for key, value in raw.items():
        known = key in USED_KEYS or key in IGNORED_KEYS or key in UNSUPPORTED_FEATURES
        if not known and not _is_off(value):
            problems.append(f"unknown key {key!r} = {value!r} (a feature mergecore does not "
                            "know; it may change the merged weights)")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        problems.append(f"init_lora_weights = {init!r}: PEFT rebuilds such an adapter's starting "
                        "point from the base weights and changes the base when it loads it, "
                        "which mergecore does not reproduce; convert the adapter with PEFT "
                        "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) "
                        "and merge the converted one")
    bias = raw.get("bias", "none")
    if bias not in (None, "none", "all", "lora_only"):
        problems.append(f"bias = {bias!r}: expected 'none', 'all' or 'lora_only'")
    if problems:
        raise AdapterConfigError(f"{where}: " + "; ".join(problems))
    modules = raw.get("modules_to_save") or ()
    if isinstance(modules, str):
        modules = (modules,)
    return LoraSettings(
        r=_number(raw, "r", where, integer=True),
        lora_alpha=float(_number(raw, "lora_alpha", where, integer=False)),
        use_rslora=bool(raw.get("use_rslora") or False),
        rank_pattern=_pattern(raw, "rank_pattern", where, integer=True),
        alpha_pattern=_pattern(raw, "alpha_pattern", where, integer=False),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out") or False),
        modules_to_save=tuple(str(m) for m in modules),
        lora_bias=bool(raw.get("lora_bias") or False),
    )


def read_settings(path: Path) -> LoraSettings:
    """Read and check the ``adapter_config.json`` at ``path``."""
    where = f"LoRA adapter config {str(path)!r}"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AdapterConfigError(f"{where}: cannot be read: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterConfigError(f"{where}: not valid JSON: {exc}") from None
    return parse_settings(raw, where)
