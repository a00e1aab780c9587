"""mergecore: fast merging of LLM weights (SLERP, TIES, DARE, task arithmetic, breadcrumbs).

Importing mergecore loads no compiled kernel and never initializes CUDA: backends load on
first use (see ``mergecore.dispatch``).
"""

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
