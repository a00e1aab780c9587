"""Drop-ins for ``peft.utils.merge_utils``, computed by mergecore's kernels.

Same names, signatures and results (within tolerance) as PEFT's ``task_arithmetic``,
``magnitude_prune``, ``ties``, ``dare_linear`` and ``dare_ties``. PEFT's task tensors carry no
base (they are LoRA factors or delta weights), so every input is a delta ``t_i`` and:

* ``task_arithmetic``: ``sum_i w_i t_i``.
* ``magnitude_prune``: ``sum_i w_i top_k(t_i)`` with ``k = int(density * numel)``.
* ``dare_linear``: ``sum_i w_i keep_i(t_i) / density`` (each entry kept with probability
  ``density``; PEFT's rescale is ``1 / density``, not mergekit's L1 rescale).
* ``ties`` / ``dare_ties``: prune each ``t_i`` (as above), elect a sign per entry from the
  *unweighted* pruned tensors (``"total"``: the sign of their sum, ``>= 0`` counts as +;
  ``"frequency"``: the sign of the sum of their signs), then
  ``sum_i w_i p_i agree_i / max(1, sum_i agree_i)`` (PEFT divides by the number of agreeing
  tensors, not by their weights as mergekit does).

Pruning and the weighted sums run in mergecore's kernels (top-k by radix selection, DARE masks
from the counter-based stream); the TIES sign election and disjoint mean (a rule PEFT has and
mergekit has not) run in torch, in fp32, one tensor at a time.

Where results legitimately differ from PEFT's: DARE masks come from mergecore's stream, seeded
from torch's default CPU generator (so ``torch.manual_seed`` makes them reproducible, but they
are not ``torch.bernoulli``'s masks: compare them statistically); among entries of equal
magnitude at the top-k threshold mergecore keeps the lowest indices (``torch.topk`` keeps an
unspecified subset); sums are computed in fp32 and rounded once (PEFT elects signs in the task
tensors' dtype); ``dare_*`` with ``density == 0`` raises (PEFT divides by zero and returns NaN).

Use them in ``add_weighted_adapter`` with :func:`using_mergecore`::

    with mergecore.integrations.peft.using_mergecore():
        model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "ab", combination_type="ties",
                                   density=0.5)
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch

from mergecore import ops
from mergecore.integrations._deps import require

PEFT_MINIMUM = "0.10"
PEFT_BELOW = "1.0"

_merge_utils = require("peft", "peft.utils.merge_utils", PEFT_MINIMUM, PEFT_BELOW,
                       "mergecore.integrations.peft")

#: The ``peft.utils.merge_utils`` functions this module replaces.
FUNCTIONS = ("task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties")

_SEED_BOUND = 1 << 62


def _weights(task_tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> list[float]:
    values = torch.as_tensor(weights).reshape(-1).tolist()
    if len(values) == 1:
        values = values * len(task_tensors)
    if len(values) != len(task_tensors):
        raise ValueError(f"{len(values)} weights for {len(task_tensors)} task tensors")
    return [float(v) for v in values]


def _out_dtype(task_tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.dtype:
    """PEFT's result dtype: task tensors multiplied by a weights tensor promote to both."""
    dtype = torch.as_tensor(weights).dtype
    for tensor in task_tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _check_density(density: float) -> bool:
    """True when pruning happens (PEFT: density >= 1 warns and prunes nothing; < 0 is an error)."""
    if density >= 1:
        warnings.warn(f"density {density} >= 1: nothing is pruned", UserWarning, stacklevel=3)
        return False
    if density < 0:
        raise ValueError(f"density must be >= 0, got {density}")
    return True


def _seed() -> int:
    return int(torch.randint(0, _SEED_BOUND, (1,)).item())


def _zeros_like(task_tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    first = task_tensors[0]
    return torch.zeros(first.shape, dtype=first.dtype, device=first.device)


def _keeps_nothing(density: float, numel: int) -> bool:
    return int(density * numel) == 0


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i t_i`` (PEFT's ``task_arithmetic``)."""
    return ops.linear(task_tensors, _weights(task_tensors, weights), normalize=False,
                      out_dtype=_out_dtype(task_tensors, weights), name="peft.task_arithmetic")


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor,
                    density: float) -> torch.Tensor:
    """``sum_i w_i top_k(t_i)``, ``k = int(density * numel)`` largest magnitudes of each."""
    if not _check_density(density):
        return task_arithmetic(task_tensors, weights)
    out_dtype = _out_dtype(task_tensors, weights)
    if _keeps_nothing(density, task_tensors[0].numel()):
        return torch.zeros(task_tensors[0].shape, dtype=out_dtype, device=task_tensors[0].device)
    # breadcrumbs with gamma 0 keeps the top int(density * n) of |t - 0|, then sums
    return ops.breadcrumbs(_zeros_like(task_tensors), task_tensors,
                           _weights(task_tensors, weights), density, 0.0, out_dtype=out_dtype,
                           name="peft.magnitude_prune")


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor,
                density: float) -> torch.Tensor:
    """``sum_i w_i keep_i(t_i) / density``, entries kept with probability ``density``."""
    if not _check_density(density):
        return task_arithmetic(task_tensors, weights)
    if density == 0:
        raise ValueError("dare_linear with density 0 keeps no entry and divides by 0")
    return ops.dare_linear(_zeros_like(task_tensors), task_tensors,
                           _weights(task_tensors, weights), density, seed=_seed(),
                           name="peft.dare_linear", rescale="inverse_density",
                           out_dtype=_out_dtype(task_tensors, weights))


def _pruned(task_tensors: Sequence[torch.Tensor], density: float,
            method: Literal["magnitude", "random"]) -> list[torch.Tensor]:
    """Each task tensor pruned (and, for DARE, divided by density) in its own dtype, all in one
    batched mergecore call."""
    if not _check_density(density):
        return list(task_tensors)
    zeros = _zeros_like(task_tensors)
    names = [f"peft.prune.{i}" for i in range(len(task_tensors))]
    singles = [[t] for t in task_tensors]
    if method == "magnitude":
        if _keeps_nothing(density, zeros.numel()):
            return [torch.zeros_like(t) for t in task_tensors]
        return ops.batched("breadcrumbs", [zeros] * len(singles), singles, weights=1.0,
                           densities=density, gammas=0.0, names=names)
    if density == 0:
        raise ValueError("dare_ties with density 0 keeps no entry and divides by 0")
    return ops.batched("dare_linear", [zeros] * len(singles), singles, weights=1.0,
                       densities=density, rescale="inverse_density", seed=_seed(), names=names)


def _disjoint_mean(pruned: Sequence[torch.Tensor], weights: list[float],
                   majority_sign_method: str, out_dtype: torch.dtype) -> torch.Tensor:
    """PEFT's TIES combine: sign elected from the unweighted pruned tensors, weighted sum of the
    agreeing ones divided by how many agree (at least 1)."""
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', "
                         f"not {majority_sign_method!r}")
    elect = torch.zeros(pruned[0].shape, dtype=torch.float32, device=pruned[0].device)
    for p in pruned:
        elect += p.float() if majority_sign_method == "total" else p.sign().float()
    positive = elect >= 0
    del elect
    num = torch.zeros_like(positive, dtype=torch.float32)
    count = torch.zeros_like(num)
    for p, w in zip(pruned, weights):
        agree = torch.where(positive, p > 0, p < 0)
        num.add_(torch.where(agree, p.float() * w, 0.0))
        count.add_(agree)
    return num.div_(count.clamp_(min=1.0)).to(out_dtype)


def ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """TIES as PEFT defines it: magnitude-prune, elect signs unweighted, disjoint mean."""
    pruned = _pruned(task_tensors, density, "magnitude")
    return _disjoint_mean(pruned, _weights(task_tensors, weights), majority_sign_method,
                          _out_dtype(task_tensors, weights))


def dare_ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """DARE-TIES as PEFT defines it: random prune with ``1 / density`` rescale, then TIES."""
    pruned = _pruned(task_tensors, density, "random")
    return _disjoint_mean(pruned, _weights(task_tensors, weights), majority_sign_method,
                          _out_dtype(task_tensors, weights))


@contextmanager
def using_mergecore() -> Iterator[list[str]]:
    """Within the block, PEFT (``add_weighted_adapter`` and any PEFT module that imported these
    functions from ``peft.utils.merge_utils``) calls mergecore's versions; PEFT's are put back
    on exit, also on error. Yields the ``module.function`` names replaced. Affects the whole
    process (not thread-local)."""
    for module in ("peft.tuners.lora.model",):
        try:
            importlib.import_module(module)
        except ImportError:  # pragma: no cover - an older PEFT layout
            pass
    ours = {name: globals()[name] for name in FUNCTIONS}
    originals = {name: getattr(_merge_utils, name) for name in FUNCTIONS}
    replaced = []
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "peft" or module_name.startswith("peft.")):
            continue
        for name, original in originals.items():
            if getattr(module, name, None) is original:
                replaced.append((module, name, original))
    try:
        for module, name, _ in replaced:
            setattr(module, name, ours[name])
        yield [f"{module.__name__}.{name}" for module, name, _ in replaced]
    finally:
        for module, name, original in replaced:
            setattr(module, name, original)
