"""mergecore as the compute backend of other merge tools.

* :mod:`mergecore.integrations.mergekit`: mergekit merge-method objects (``linear``, ``slerp``,
  ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``breadcrumbs``,
  ``breadcrumbs_ties``) that carry mergekit's own specs and run mergecore's kernels.
* :mod:`mergecore.integrations.mergekit_cli`: ``mergecore mergekit-yaml``, mergekit's own CLI
  with those methods in place of its built-ins, in that process only.
* :mod:`mergecore.integrations.peft`: drop-ins for ``peft.utils.merge_utils`` and a context
  manager that makes ``add_weighted_adapter`` use them.

Nothing here is imported by ``import mergecore``, and importing these modules changes nothing
in mergekit or PEFT: replacing their functions is always an explicit, scoped call. Each module
needs its tool installed and raises :class:`MissingIntegrationError` (an ``ImportError``) naming
the supported versions when it is not.
"""

from mergecore.integrations._deps import MissingIntegrationError

__all__ = ["MissingIntegrationError"]
