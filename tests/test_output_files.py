"""The model card names mergecore and its version in plain text, with no placeholder link, and
its metadata lists as ``base_model`` only references the Hub could know (never a local path)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergecore import __version__
from mergecore.output_files import hub_model_ids, write_model_card


def test_model_card_names_the_version_and_links_nowhere(tmp_path: Path) -> None:
    write_model_card(tmp_path, method="ties", base_model="base", models=["base", "ft"],
                     dtype="bfloat16", yaml_text="merge_method: ties\n")
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert f"merged with mergecore {__version__} (a faster drop-in for mergekit)" in card
    assert "](" not in card and "https://" not in card
    assert "- Method: **ties**" in card and "- Base model: `base`" in card


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_metadata_lists_hub_ids_and_never_a_local_path(tmp_path: Path) -> None:
    models = ["/models/llama-2-13b", "./ft", "~/ckpt/x", "runs/2024/ft", "component_1",
              "NousResearch/Llama-2-13b-hf", "Gryphe/MythoMax-L2-13b+lemonilia/limarp-llama2",
              "NousResearch/Llama-2-13b-hf"]
    write_model_card(tmp_path, method="ties", base_model=models[0], models=models,
                     dtype="bfloat16", yaml_text="merge_method: ties\n")
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    meta = _front_matter(card)
    assert meta["base_model"] == ["NousResearch/Llama-2-13b-hf", "Gryphe/MythoMax-L2-13b",
                                  "lemonilia/limarp-llama2"]
    assert meta["library_name"] == "transformers" and "mergekit" in meta["tags"]
    for local in models[:5]:  # in the body, not the metadata
        assert f"`{local}`" in card


def test_card_without_hub_ids_has_no_base_model_key(tmp_path: Path) -> None:
    write_model_card(tmp_path, method="linear", base_model=None, models=["/a/b/c", "./d"],
                     dtype="float16", yaml_text="merge_method: linear\n")
    meta = _front_matter((tmp_path / "README.md").read_text(encoding="utf-8"))
    assert "base_model" not in meta and meta["tags"]


@pytest.mark.parametrize("ref,ok", [("org/model", True), ("org/model-v1.5_x", True),
                                    ("org/", False), ("/org/model", False), ("a/b/c", False),
                                    ("org/mo--del", False), ("org/mo..del", False),
                                    ("./model", False), ("model", False), ("-org/model", False)])
def test_hub_model_id_form(ref: str, ok: bool) -> None:
    assert hub_model_ids([ref]) == ([ref] if ok else [])
