"""Test and benchmark helpers: running mergekit 0.1.5 as the oracle, and comparing outputs.

Nothing here is imported by ``import mergecore``; the helpers need mergekit installed only when
:func:`run_mergekit_yaml` / :func:`run_mergekit_batch` are called.
"""

from mergecore.testing.mergekit_harness import (
    ComparisonReport,
    MergekitError,
    TensorComparison,
    compare_outputs,
    load_state,
    mergekit_env,
    run_mergekit_batch,
    run_mergekit_multi,
    run_mergekit_multi_batch,
    run_mergekit_yaml,
    ulp_diff,
)

__all__ = [
    "ComparisonReport",
    "MergekitError",
    "TensorComparison",
    "compare_outputs",
    "load_state",
    "mergekit_env",
    "run_mergekit_batch",
    "run_mergekit_multi",
    "run_mergekit_multi_batch",
    "run_mergekit_yaml",
    "ulp_diff",
]
