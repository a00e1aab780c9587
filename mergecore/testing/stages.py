"""Run a multi-stage recipe the slow way: every document as its own mergecore merge.

What mergekit-multi does, with mergecore: each intermediate model is written to disk and
named by its path in the documents that use it. A fused run of the same recipe must give
the same bits (docs/semantics.md: intermediates are rounded to their stage's output dtype
as if written and read back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def write_recipe(path: Path, docs: list[dict[str, Any]]) -> Path:
    """Write YAML documents to ``path`` (``---`` between them); returns ``path``."""
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def stage_by_stage(docs: list[dict[str, Any]], work: Path,
                   extra_args: tuple[str, ...] = ()) -> dict[str | None, Path]:
    """Merge every document of a recipe on its own, in dependency order, under ``work``;
    returns ``{stage name (None for the final document): output directory}``. Raises
    ``RuntimeError`` naming the stage when a merge fails."""
    from mergecore.cli import main
    from mergecore.config.schema import model_strings

    names = {d["name"] for d in docs if "name" in d}
    done: dict[str | None, Path] = {}

    def patch(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: patch(v) for k, v in value.items()}
        if isinstance(value, list):
            return [patch(v) for v in value]
        if isinstance(value, str):
            path, plus, adapter = value.partition("+")
            if path in names:
                return str(done[path]) + plus + adapter
        return value

    def uses(doc: dict[str, Any]) -> set[str]:
        return {ref.partition("+")[0] for ref in model_strings(doc)} & names

    pending = list(docs)
    while pending:
        doc = next((d for d in pending if uses(d) <= set(done)), None)
        if doc is None:
            raise RuntimeError("the recipe's stages depend on each other in a cycle")
        pending.remove(doc)
        name = doc.get("name")
        body = patch({k: v for k, v in doc.items() if k != "name"})
        out = work / f"stage-{name or 'final'}"
        config = write_recipe(work / f"stage-{name or 'final'}.yml", [body])
        if main(["merge", str(config), str(out), "--quiet", *extra_args]) != 0:
            raise RuntimeError(f"stage {name or 'final'!r} failed to merge on its own")
        done[name] = out
    return done


__all__ = ["stage_by_stage", "write_recipe"]
