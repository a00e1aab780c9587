"""Where the layers are in a checkpoint, found from its tensor names alone.

A *layer stack* is a prefix ``P`` such that the checkpoint holds tensors named
``P.<N>.<rest>`` for every ``N`` in ``0 .. L-1`` (``model.layers``, ``transformer.h``,
``encoder.layer``, ``model.decoder.layers`` ...). ``<N>`` is the first ``.<digits>.`` in a
name (so ``model.layers.3.mlp.experts.7.w1`` belongs to layer 3 of ``model.layers``).
Prefixes whose numbers are not ``0 .. L-1`` (an ``nn.Sequential`` with gaps, say) are not
layer stacks: their tensors are ordinary non-layer tensors. The *main* stack is the one with
the most layers (then the most tensors, then the first in the checkpoint), unless one stack has
exactly the layer count config.json gives.

Non-layer tensors are split into those that come before the layers (embeddings) and those
after (final norm, ``lm_head``); safetensors files sort names, so the split is made from the
names (``is_pre_layer_name``). It decides only which slice supplies a tensor in the
``slices:`` form and the output order; both groups are evaluated at ``u = 0``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

_LAYER_INDEX = re.compile(r"\.(\d+)\.")

#: A name part that marks an output-side tensor (checked first).
_POST_MARKERS = ("lm_head", "embed_out", "final", "norm_f", "ln_f", "pooler", "classifier",
                 "score", "cls.", "output", "vocab_", "post", "head.")
#: A name part that marks an input-side tensor (embeddings and what comes with them).
_PRE_MARKERS = ("embed", "wte", "wpe", "tok_emb", "position_ids", "pos_emb", "rotary",
                "relative_pe", "patch", "shared.", "_pre", "pre_", "conv1", "conv2",
                "mm_input_projection", "mm_soft_emb_norm", "visual.", "vision",
                "multi_modal_projector", "mm_projector")

#: config.json keys that hold the number of layers, in the order they are looked for.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def is_pre_layer_name(name: str) -> bool:
    """True for a non-layer tensor that belongs before the layers (an embedding)."""
    low = name.lower()
    if any(m in low for m in _POST_MARKERS):
        return False
    return any(m in low for m in _PRE_MARKERS)


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """``"model.layers.3.mlp.w"`` -> ``("model.layers", 3, "mlp.w")``; None without a number."""
    m = _LAYER_INDEX.search(name)
    if m is None:
        return None
    return name[: m.start()], int(m.group(1)), name[m.end():]


@dataclass
class LayerStack:
    """``prefix.<0..num_layers-1>.<rest>``; ``rests[i]`` are layer i's rests, in checkpoint
    order."""

    prefix: str
    num_layers: int
    rests: list[list[str]]

    def name(self, index: int, rest: str) -> str:
        return f"{self.prefix}.{index}.{rest}"

    @property
    def num_tensors(self) -> int:
        return sum(len(r) for r in self.rests)


@dataclass
class ModelLayout:
    """The layer structure of one checkpoint."""

    stacks: dict[str, LayerStack] = field(default_factory=dict)  # in checkpoint order
    main: LayerStack | None = None
    pre: list[str] = field(default_factory=list)  # non-layer names before the layers
    post: list[str] = field(default_factory=list)  # non-layer names after the layers

    @property
    def num_layers(self) -> int:
        return self.main.num_layers if self.main is not None else 0


def detect_layout(names: Iterable[str], expected_layers: int | None = None) -> ModelLayout:
    """Find the layer stacks and the pre/post non-layer tensors among ``names``.

    ``expected_layers`` (config.json's layer count, when known) picks the main stack when
    one stack has exactly that many layers (a vision tower may have more than the text
    model); otherwise the main stack is the largest.
    """
    names = list(names)
    by_prefix: dict[str, dict[int, list[str]]] = {}
    parsed: dict[str, tuple[str, int, str]] = {}
    for name in names:
        parts = split_layer_name(name)
        if parts is None:
            continue
        prefix, idx, rest = parts
        parsed[name] = parts
        by_prefix.setdefault(prefix, {}).setdefault(idx, []).append(rest)
    layout = ModelLayout()
    for prefix, layers in by_prefix.items():
        n = max(layers) + 1
        if len(layers) == n:
            layout.stacks[prefix] = LayerStack(prefix, n, [layers[i] for i in range(n)])
    if layout.stacks:
        order = list(layout.stacks)
        candidates = [s for s in layout.stacks.values() if s.num_layers == expected_layers]
        layout.main = max(candidates or layout.stacks.values(),
                          key=lambda s: (s.num_layers, s.num_tensors, -order.index(s.prefix)))
    for name in names:
        parts = parsed.get(name)
        if parts is not None and parts[0] in layout.stacks:
            continue
        (layout.pre if is_pre_layer_name(name) else layout.post).append(name)
    return layout


def config_layer_count(config: dict[str, Any] | None) -> tuple[str, int] | None:
    """The ``(key, value)`` of the layer count in a config.json (a top-level key, else one
    in ``text_config``, written ``text_config.KEY``); None when there is none."""
    if not isinstance(config, dict):
        return None
    for scope, label in ((config, ""), (config.get("text_config"), "text_config.")):
        if not isinstance(scope, dict):
            continue
        for key in LAYER_COUNT_KEYS:
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return label + key, value
    return None


def config_vocab_size(config: dict[str, Any] | None) -> int | None:
    """``vocab_size`` of a config.json (top level, else ``text_config``)."""
    if not isinstance(config, dict):
        return None
    for scope in (config, config.get("text_config")):
        if isinstance(scope, dict):
            value = scope.get("vocab_size")
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def set_config_value(config: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set ``a.b`` style keys in a nested dict (the parents must exist)."""
    *parents, last = dotted_key.split(".")
    scope = config
    for p in parents:
        scope = scope[p]
    scope[last] = value
