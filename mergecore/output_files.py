"""The non-tensor files of a merged model: config.json, tokenizer, model card, the YAML."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from mergecore.io.writer import atomic_write, atomic_write_bytes

MODEL_CARD_TEMPLATE = """---
{base_models}library_name: transformers
tags:
- mergekit
- mergecore
- merge
---
# {title}

This model was merged with mergecore {version} (a faster drop-in for mergekit),
from the configuration below.

## Merge details

- Method: **{method}**{base_line}
- Models merged:
{model_lines}
- Output dtype: {dtype}

## Configuration

```yaml
{yaml}
```
"""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary name, removed on any failure
    (``mergecore.io.writer.atomic_write_bytes``): never a truncated file under ``path``."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=True)


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a temporary name (``atomic_write``: removed on any
    failure or interruption); an OS error is an ``OutputFileError`` naming both files."""
    def fill(out: BinaryIO) -> None:
        with open(src, "rb") as fh:
            shutil.copyfileobj(fh, out)

    atomic_write(dst, fill, fsync=True, what=f"copying {str(src)!r} to {str(dst)!r}")


def write_config_json(out_dir: Path, config: dict[str, Any] | None) -> None:
    """The output model's config.json (already updated by the planner)."""
    if config is not None:
        atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


# a Hugging Face Hub model id: owner/name, letters, digits, '_', '-', '.', no '--' or '..'
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def hub_model_ids(models: Iterable[str]) -> list[str]:
    """The references among ``models`` that have the form of a Hub model id (``owner/name``),
    the model and the adapter of ``model+adapter`` each on its own: what the card's
    ``base_model`` metadata may list. Local paths (absolute, ``./``, ``~``, deeper than two
    parts) and recipe stage names are left out: the Hub refuses a card whose ``base_model``
    is not a model id. mergekit lists only the references the Hub knows; mergecore runs
    offline and lists those of the Hub's form."""
    ids = []
    for ref in models:
        for part in str(ref).split("+"):
            if _HUB_ID.fullmatch(part) and "--" not in part and ".." not in part \
                    and not part.endswith("."):
                ids.append(part)
    return list(dict.fromkeys(ids))


def write_model_card(out_dir: Path, *, method: str, base_model: str | None,
                     models: Iterable[str], dtype: str, yaml_text: str) -> None:
    """A README.md that states the method, the inputs, the mergecore version and the YAML;
    its metadata's ``base_model`` lists the inputs named by Hub ids (:func:`hub_model_ids`)
    and is left out when there is none."""
    from mergecore import __version__

    models = list(dict.fromkeys(models))
    ids = hub_model_ids(models)
    base_models = "base_model:\n" + "".join(f"- {m}\n" for m in ids) if ids else ""
    text = MODEL_CARD_TEMPLATE.format(
        title=out_dir.name,
        version=__version__,
        base_models=base_models,
        method=method,
        base_line=f"\n- Base model: `{base_model}`" if base_model else "",
        model_lines="\n".join(f"  - `{m}`" for m in models),
        dtype=dtype,
        yaml=yaml_text.strip(),
    )
    atomic_write_text(out_dir / "README.md", text)


def write_config_yaml(out_dir: Path, yaml_text: str) -> None:
    """The merge configuration as given, saved like mergekit does."""
    atomic_write_text(out_dir / "mergekit_config.yml", yaml_text)


def copy_tokenizer(out_dir: Path, files: Iterable[Path]) -> list[str]:
    """Copy tokenizer (and generation config) files next to the weights; returns their names."""
    copied = []
    for src in files:
        src = Path(src)
        if src.is_file():
            _copy_atomic(src, out_dir / src.name)
            copied.append(src.name)
    return copied


def remove_side_files(out_dir: Path, names: Iterable[str]) -> None:
    """Delete the side files ``names`` from ``out_dir`` (those present), after a run that
    stopped before its output was complete: only its shards and manifest stay."""
    for name in names:
        try:
            (out_dir / name).unlink(missing_ok=True)
        except OSError:
            pass
