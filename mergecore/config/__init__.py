"""mergekit YAML configuration: parsing, parameter resolution, and loading a merge plan.

- ``schema``: YAML -> ``MergeConfig`` records (all problems reported at once);
- ``params``: parameter settings and their value for one tensor (mergekit's rules);
- ``methods``: the supported merge methods and their parameter specs;
- ``layout``: layer stacks found from tensor names;
- ``load``: file -> opened checkpoints -> ``mergecore.plan.MergePlan``.
"""

from mergecore.config.errors import ConfigError
from mergecore.config.load import load_merge, open_checkpoints
from mergecore.config.methods import METHODS, SUPPORTED_METHODS, MethodSpec, ParamSpec
from mergecore.config.params import Conditional, evaluate_setting, resolve_parameter
from mergecore.config.schema import (
    InputModel,
    MergeConfig,
    ModelRef,
    OutputSlice,
    SliceSource,
    load_config,
    parse_config,
    parse_documents,
    stage_dependencies,
    stage_order,
)

__all__ = [
    "METHODS",
    "SUPPORTED_METHODS",
    "Conditional",
    "ConfigError",
    "InputModel",
    "MergeConfig",
    "MethodSpec",
    "ModelRef",
    "OutputSlice",
    "ParamSpec",
    "SliceSource",
    "evaluate_setting",
    "load_config",
    "load_merge",
    "open_checkpoints",
    "parse_config",
    "parse_documents",
    "resolve_parameter",
    "stage_dependencies",
    "stage_order",
]
