"""``mergecore mergekit-yaml``: mergekit's own CLI, with mergecore computing the methods it has.

:func:`replaced_methods` puts :func:`mergecore.integrations.mergekit.method` objects in place of
mergekit's built-ins in mergekit's method registry for the duration of a ``with`` block, and
puts mergekit's back afterwards (also on error). Everything else (YAML parsing, parameter
resolution, loading, tokenizers, writing, the model card) is mergekit's, so the output layout and
every flag are mergekit's; methods mergecore does not implement stay mergekit's. Nothing is
replaced unless this is called: importing mergecore changes nothing in mergekit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from mergecore.integrations import mergekit as integration
from mergecore.integrations._deps import MissingIntegrationError


def _registry_table() -> dict:
    table = getattr(integration._registry, "_METHODS", None)
    if not isinstance(table, dict):
        raise MissingIntegrationError(
            "mergecore mergekit-yaml needs the method registry of mergekit "
            f">={integration.MERGEKIT_MINIMUM},<{integration.MERGEKIT_BELOW} "
            "(mergekit.merge_methods.registry._METHODS); this mergekit has none")
    return table


@contextmanager
def replaced_methods(names: Sequence[str] = integration.SUPPORTED_METHODS) -> Iterator[list[str]]:
    """Within the block, mergekit resolves each of ``names`` to mergecore's method; yields the
    names replaced. Not thread-safe: other threads of this process see the replacement too."""
    table = _registry_table()
    saved = {name: table[name] for name in names if name in table}
    try:
        for name in saved:
            table[name] = integration.method(name)
        yield list(saved)
    finally:
        table.update(saved)


def run_mergekit_yaml(argv: Sequence[str]) -> int:
    """Run ``mergekit-yaml *argv`` in this process with mergecore's methods; its exit status."""
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    with replaced_methods():
        try:
            mergekit_yaml.main(args=list(argv), prog_name="mergecore mergekit-yaml",
                               standalone_mode=True)
        except SystemExit as exc:
            code = exc.code
            return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
