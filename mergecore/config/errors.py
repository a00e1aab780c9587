"""The one exception the config layer and the planner raise, and the list that feeds it.

Configuration problems are collected, not raised one at a time: a user editing a YAML for a
merge of several large models should see every mistake in one run. Each problem is one line
that names where it is (a key path such as ``slices[1].sources[0].layer_range``, a model, a
file or a tensor).
"""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A merge configuration (or the checkpoints it names) cannot be merged as written.

    ``problems`` holds one line per problem; the message lists them all.
    """

    def __init__(self, problems: Iterable[str] | str, *, source: str | None = None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems: list[str] = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            message = f"invalid merge configuration{where}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"invalid merge configuration{where} ({len(self.problems)} problems):\n{lines}"
        super().__init__(message)


class Problems:
    """An ordered, duplicate-free list of problem lines, raised at once as a ``ConfigError``."""

    def __init__(self) -> None:
        self._items: list[str] = []
        self._seen: set[str] = set()

    def add(self, where: str | None, message: str) -> None:
        """Record ``"<where>: <message>"`` (or just ``message`` when ``where`` is empty)."""
        line = f"{where}: {message}" if where else message
        if line not in self._seen:
            self._seen.add(line)
            self._items.append(line)

    def extend(self, other: Problems | Iterable[str]) -> None:
        for line in other:
            self.add(None, line)

    def __iter__(self):
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def raise_if_any(self, source: str | None = None) -> None:
        if self._items:
            raise ConfigError(self._items, source=source)
