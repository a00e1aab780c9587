"""mergecore: fast merging of LLM weights (SLERP, TIES, DARE, task arithmetic, breadcrumbs).

Importing mergecore loads no compiled kernel and never initializes CUDA: backends load on
first use (see ``mergecore.dispatch``).

When mergecore is the first to load torch (and with it the OpenMP runtime), it sets
``OMP_WAIT_POLICY=PASSIVE`` unless the variable is already set: a merge runs its kernels
next to its own reader and writer threads, and OpenMP threads that spin while waiting take
the CPU those threads need (measured on 2 cores: a 1.1B TIES merge 10-20% faster).
"""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mergecore.errors import MergeError, NonFiniteError
from mergecore.lora import apply_lora
from mergecore.ops import (
    batched,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    linear,
    make_job,
    merge_many,
    passthrough,
    slerp,
    slerp_batched,
    task_arithmetic,
    ties,
)

__version__ = "0.1.0"

__all__ = [
    "MergeError",
    "NonFiniteError",
    "apply_lora",
    "batched",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "linear",
    "make_job",
    "merge_many",
    "passthrough",
    "slerp",
    "slerp_batched",
    "task_arithmetic",
    "ties",
]
