"""The model card names mergecore and its version in plain text, with no placeholder link."""

from __future__ import annotations

from pathlib import Path

from mergecore import __version__
from mergecore.output_files import write_model_card


def test_model_card_names_the_version_and_links_nowhere(tmp_path: Path) -> None:
    write_model_card(tmp_path, method="ties", base_model="base", models=["base", "ft"],
                     dtype="bfloat16", yaml_text="merge_method: ties\n")
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert f"merged with mergecore {__version__} (a faster drop-in for mergekit)" in card
    assert "](" not in card and "https://" not in card
    assert "- Method: **ties**" in card and "- Base model: `base`" in card
