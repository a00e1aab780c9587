"""Random mergekit YAML configurations over one checkpoint family, for differential tests.

``random_config(rng, base, fine_tunes, layers)`` draws a method (every one mergecore runs),
a dtype and out_dtype, the ``models:`` or ``slices:`` form (two slices split at a random
layer; passthrough: one to three slices stacking random layer ranges of random models), and
parameters in every form mergekit's YAML allows: scalars, gradient lists, filter
conditionals with a default, per-model, per-slice and top-level, with YAML anchors as
``yaml.safe_dump`` writes them for repeated dicts; optionally LoRA inputs (``model+adapter``).

Parameter ranges keep the merges well conditioned, so that a test can use one error bound
for all of them: weights of normalized merges are positive (a weight sum near 0 would
amplify rounding without limit); task_arithmetic and dare_linear weights may be negative.
"""

from __future__ import annotations

import random
from typing import Any

from mergecore.config.schema import model_strings

METHODS = ("linear", "task_arithmetic", "slerp", "ties", "breadcrumbs", "breadcrumbs_ties",
           "dare_linear", "dare_ties", "passthrough")
FILTERS = ("self_attn", "mlp", "q_proj", "norm", "embed")
DTYPES = ("bfloat16", "float16", "float32")

#: Bounds of what ``random_config`` draws, for error bounds in tests.
WEIGHT_RANGE = (0.1, 1.2)
SIGNED_WEIGHT_RANGE = (-0.5, 1.2)
LAMBDA_RANGE = (0.5, 1.5)
SCALE_RANGE = (0.5, 1.5)


def _scalar(rng: random.Random, lo: float, hi: float) -> float:
    return round(rng.uniform(lo, hi), 3)


def random_value(rng: random.Random, lo: float, hi: float) -> Any:
    """A scalar, a gradient list, or filter conditionals ending in a default."""
    r = rng.random()
    if r < 0.5:
        return _scalar(rng, lo, hi)
    if r < 0.8:
        return [_scalar(rng, lo, hi) for _ in range(rng.randint(2, 5))]
    conditions: list[dict[str, Any]] = []
    for f in rng.sample(FILTERS, rng.randint(1, 2)):
        value = (_scalar(rng, lo, hi) if rng.random() < 0.6
                 else [_scalar(rng, lo, hi) for _ in range(rng.randint(2, 4))])
        conditions.append({"filter": f, "value": value})
    conditions.append({"value": _scalar(rng, lo, hi)})
    return conditions


def _delta_entries(rng: random.Random, method: str, fine_tunes: list[str]) -> list[dict]:
    signed = method in ("task_arithmetic", "dare_linear")
    entries = []
    for model in rng.sample(fine_tunes, rng.randint(1, min(3, len(fine_tunes)))):
        params: dict[str, Any] = {
            "weight": random_value(rng, *(SIGNED_WEIGHT_RANGE if signed else WEIGHT_RANGE))}
        if method != "task_arithmetic":
            params["density"] = random_value(rng, 0.2, 0.95)
        if method.startswith("breadcrumbs") and rng.random() < 0.5:
            params["gamma"] = random_value(rng, 0.0, 0.05)
        entries.append({"model": model, "parameters": params})
    return entries


def random_config(rng: random.Random, base: str, fine_tunes: list[str], layers: int,
                  method: str | None = None, adapters: list[str] | None = None
                  ) -> dict[str, Any]:
    """One random configuration (a dict ready for ``yaml.safe_dump``); see the module
    docstring. ``method`` fixes the merge method. With ``adapters`` (LoRA adapter
    directories that fit the family), a fine-tune is sometimes referenced as
    ``model+adapter``."""
    if adapters:
        fine_tunes = [f"{m}+{rng.choice(adapters)}" if rng.random() < 0.25 else m
                      for m in fine_tunes]
    models = [base, *fine_tunes]
    method = method or rng.choice(METHODS)
    cfg: dict[str, Any] = {"merge_method": method}
    if rng.random() < 0.7:
        cfg["dtype"] = rng.choice(DTYPES)
    if rng.random() < 0.3:
        cfg["out_dtype"] = rng.choice(DTYPES)
    top: dict[str, Any] = {}
    if method == "linear":
        entries = [{"model": m, "parameters": {"weight": random_value(rng, *WEIGHT_RANGE)}}
                   for m in rng.sample(models, rng.randint(2, 3))]
    elif method == "slerp":
        pair = rng.sample(models, 2)
        cfg["base_model"] = pair[0]
        top["t"] = random_value(rng, 0.0, 1.0)
        entries = [{"model": m} for m in pair]
    elif method == "passthrough":
        entries = []
    else:
        cfg["base_model"] = base
        entries = _delta_entries(rng, method, fine_tunes)
        if rng.random() < 0.25:
            entries.append({"model": base})
        if rng.random() < 0.3:
            top["lambda"] = _scalar(rng, *LAMBDA_RANGE)
        if method != "task_arithmetic" and rng.random() < 0.4:
            top["normalize"] = rng.choice([True, False])
        if method.startswith("dare") and rng.random() < 0.4:
            top["rescale"] = rng.choice([True, False])
        if method.startswith("dare"):
            cfg["random_seed"] = rng.randint(0, 2**31 - 1)
    if top:
        cfg["parameters"] = top
    if method == "passthrough":
        slices = []
        for _ in range(rng.randint(1, 3)):
            start = rng.randint(0, layers - 1)
            source: dict[str, Any] = {"model": rng.choice(models),
                                      "layer_range": [start, rng.randint(start + 1, layers)]}
            if rng.random() < 0.5:
                source["parameters"] = {"scale": random_value(rng, *SCALE_RANGE)}
            slices.append({"sources": [source]})
        cfg["slices"] = slices
    elif rng.random() < 0.5:
        cut = rng.randint(1, layers - 1)
        slices = []
        for lo, hi in ((0, cut), (cut, layers)):
            sources = [{**e, "layer_range": [lo, hi]} for e in entries]
            if cfg.get("base_model") and all(e["model"] != cfg["base_model"] for e in entries):
                sources.append({"model": cfg["base_model"], "layer_range": [lo, hi]})
            slices.append({"sources": sources})
        cfg["slices"] = slices
    else:
        cfg["models"] = entries
    return cfg


def _model_paths(node: Any) -> set[str]:
    """The model paths (``+adapter`` dropped) a config document names."""
    return {ref.partition("+")[0] for ref in model_strings(node)}


def random_recipe(rng: random.Random, base: str, fine_tunes: list[str], layers: int,
                  adapters: list[str] | None = None) -> list[dict[str, Any]]:
    """A random multi-stage recipe (mergekit-multi's format): one or two named intermediate
    stages, then the final document, which uses at least one stage. Every document is a
    ``random_config`` whose models may be earlier stages (as the base too); LoRA adapters
    only on checkpoints (mergecore refuses them on a stage). Intermediate stages keep the
    family's layer count (no passthrough), so any later document can slice them."""
    docs: list[dict[str, Any]] = []
    names: list[str] = []
    n_stages = rng.randint(1, 2)
    for k in range(n_stages + 1):
        final = k == n_stages
        methods = METHODS if final else tuple(m for m in METHODS if m != "passthrough")
        for _ in range(50):
            checkpoints = [f"{m}+{rng.choice(adapters)}" if adapters and rng.random() < 0.2
                           else m for m in fine_tunes]
            pool = checkpoints + names
            stage_base = rng.choice([base, *names])
            cfg = random_config(rng, stage_base, [m for m in pool if m != stage_base], layers,
                                method=rng.choice(methods))
            if not final or _model_paths(cfg) & set(names):
                break
        else:
            raise RuntimeError("no final document that uses a stage was drawn")
        if not final:
            cfg = {"name": f"stage{k + 1}", **cfg}
            names.append(cfg["name"])
        docs.append(cfg)
    return docs


__all__ = ["METHODS", "random_config", "random_recipe", "random_value"]
