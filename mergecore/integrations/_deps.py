"""Importing the tool an integration plugs into, with a clear error when it is missing."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from types import ModuleType


class MissingIntegrationError(ImportError):
    """The tool an integration needs is not installed, or not a supported version."""


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"0.1.5"`` -> ``(0, 1, 5)``; pre-release and local suffixes are ignored."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def require(distribution: str, module: str, minimum: str, below: str, feature: str) -> ModuleType:
    """Import ``module`` of ``distribution`` whose version must be in ``[minimum, below)``.

    Raises :class:`MissingIntegrationError` naming ``feature``, the supported range and the
    pip command when the module cannot be imported or its installed version is outside it.
    """
    supported = f">={minimum},<{below}"
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        raise MissingIntegrationError(
            f"{feature} needs {distribution} {supported}, which is not installed "
            f"(pip install '{distribution}{supported}'): {exc}"
        ) from exc
    try:
        installed = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return imported  # imported from a source tree: no version to check
    if not _version_tuple(minimum) <= _version_tuple(installed) < _version_tuple(below):
        raise MissingIntegrationError(
            f"{feature} supports {distribution} {supported}; version {installed} is installed "
            f"(pip install '{distribution}{supported}')"
        )
    return imported
