"""Opening local Hugging Face-layout model directories that hold safetensors weights.

Layouts recognised, in this order (the first that applies wins, like mergekit):

1. ``model.safetensors.index.json`` + the shard files it names: the index is authoritative
   (tensors it does not name are ignored, as transformers and mergekit do);
2. ``model.safetensors``;
3. any other set of ``*.safetensors`` files in the directory (hidden files are skipped).

A path to a single ``.safetensors`` file is accepted too. Hub ids and ``.bin``/``.pt``
checkpoints are refused with a message that says what to do instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from mergecore.io.errors import CheckpointError
from mergecore.io.safetensors_format import read_header
from mergecore.io.types import Checkpoint, TensorInfo

LOG = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

#: Files that make up a tokenizer (and the generation defaults, and the processor files of
#: vision and audio models, which mergekit copies from the base for those architectures),
#: copied next to merged weights.
TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "normalizer.json",
)
TOKENIZER_GLOBS = ("*.tiktoken", "tokenization_*.py")

_TORCH_PICKLE_GLOBS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(@[\w./-]+)?")


def _looks_like_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.fullmatch(ref)) and ".." not in ref and not ref.endswith(
        (".safetensors", ".bin", ".pt", ".json"))


def _load_json(path: Path, what: str) -> Any:
    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"{what} {str(path)!r} names {key!r} twice")
            out[key] = value
        return out

    try:
        text = path.read_bytes().decode("utf-8")
        return json.loads(text, object_pairs_hook=no_dupes)
    except CheckpointError:
        raise
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{what} {str(path)!r} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None


def _weight_files_from_index(directory: Path, index_path: Path) -> tuple[list[Path],
                                                                         dict[str, Path]]:
    index = _load_json(index_path, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) for v in weight_map.values()
    ):
        raise CheckpointError(f"index {str(index_path)!r} has no 'weight_map' object of "
                              f"tensor name -> file name")
    if not weight_map:
        raise CheckpointError(f"index {str(index_path)!r} has an empty weight_map")
    tensor_file: dict[str, Path] = {}
    files: dict[str, Path] = {}
    for tensor, fname in weight_map.items():
        if fname not in files:
            rel = Path(fname)
            if not fname or rel.is_absolute() or ".." in rel.parts:
                raise CheckpointError(f"index {str(index_path)!r}: tensor {tensor!r} points "
                                      f"outside the model directory ({fname!r})")
            fpath = directory / rel
            if not fpath.is_file():
                raise CheckpointError(f"index {str(index_path)!r} names weight file {fname!r} "
                                      f"(for tensor {tensor!r}), which does not exist in "
                                      f"{str(directory)!r}")
            files[fname] = fpath
        tensor_file[tensor] = files[fname]
    return [files[k] for k in sorted(files)], tensor_file


def _weights_without_index(directory: Path) -> list[Path]:
    single = directory / WEIGHTS_NAME
    if single.is_file():
        return [single]
    files = sorted(p for p in directory.glob("*.safetensors")
                   if p.is_file() and not p.name.startswith("."))
    if files and (directory / "adapter_config.json").is_file() and all(
        p.name.startswith("adapter_model") for p in files
    ):
        raise CheckpointError(
            f"{str(directory)!r} holds a LoRA adapter (adapter_config.json), not a model; "
            f"reference it as BASE_MODEL+{directory}")
    if files:
        return files
    pickles = sorted(p.name for g in _TORCH_PICKLE_GLOBS for p in directory.glob(g))
    if pickles:
        raise CheckpointError(
            f"{str(directory)!r} holds only PyTorch pickle weights ({', '.join(pickles[:3])}"
            f"{', ...' if len(pickles) > 3 else ''}): only safetensors checkpoints are "
            f"supported; convert it first, e.g. with transformers: "
            f"AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR, "
            f"safe_serialization=True)")
    raise CheckpointError(f"{str(directory)!r} holds no model weights (no *.safetensors files)")


def open_checkpoint(ref: str | os.PathLike) -> Checkpoint:
    """Open a local model directory (or one ``.safetensors`` file) without reading weights.

    Reads every weight file's header and ``config.json`` when present. Returns a
    ``Checkpoint`` whose ``tensors`` are in read order: file by file (shards sorted by
    name), and by data offset inside a file. Raises ``CheckpointError`` naming the path for
    a missing path, a hub id, pickle-only weights, no weights, an inconsistent index or the
    same tensor in two files; ``SafetensorsError`` for a malformed weight file.
    """
    text = os.fspath(ref)
    path = Path(os.path.expanduser(text))
    if not path.exists():
        # a relative path is looked up from the current directory (as by mergekit): say so
        tried = "" if path.is_absolute() else f" (looked for {str(path.absolute())!r})"
        if _looks_like_hub_id(text):
            raise CheckpointError(
                f"model {text!r} not found: no such local directory{tried}, and hub ids are "
                f"not supported: download the model first, e.g. with `huggingface-cli download "
                f"{text.split('@')[0]} --local-dir DIR`, and pass the directory")
        raise CheckpointError(f"model path {text!r} does not exist{tried}")

    tensor_file: dict[str, Path] | None = None
    if path.is_file():
        if path.suffix != ".safetensors":
            if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
                raise CheckpointError(f"{text!r} is a PyTorch pickle: only safetensors "
                                      f"checkpoints are supported; convert it first")
            raise CheckpointError(f"{text!r} is not a .safetensors file or a model directory")
        directory, files = path.parent, [path]
    elif path.is_dir():
        directory = path
        index_path = path / INDEX_NAME
        if index_path.is_file():
            files, tensor_file = _weight_files_from_index(path, index_path)
        else:
            files = _weights_without_index(path)
    else:
        raise CheckpointError(f"model path {text!r} is neither a file nor a directory")

    tensors: dict[str, TensorInfo] = {}
    for fpath in files:
        infos, _ = read_header(fpath)
        for name, info in infos.items():
            if tensor_file is not None and tensor_file.get(name) != fpath:
                if name not in tensor_file:
                    LOG.warning("%s: tensor %r is not named by %s; ignored", fpath, name,
                                INDEX_NAME)
                continue
            if name in tensors:
                raise CheckpointError(
                    f"tensor {name!r} is stored twice, in {str(tensors[name].file)!r} and in "
                    f"{str(fpath)!r}")
            tensors[name] = info
    if tensor_file is not None:
        for name, fpath in tensor_file.items():
            if name not in tensors:
                raise CheckpointError(
                    f"index {str(directory / INDEX_NAME)!r} says tensor {name!r} is in "
                    f"{fpath.name!r}, but that file's header has no such tensor")
    if not tensors:
        raise CheckpointError(f"{text!r} holds no tensors")

    config = None
    config_path = directory / CONFIG_NAME
    if config_path.is_file():
        config = _load_json(config_path, "model config")
        if not isinstance(config, dict):
            raise CheckpointError(f"model config {str(config_path)!r} is not a JSON object")
    return Checkpoint(path=path, tensors=tensors, config=config, weight_files=list(files))


def tokenizer_files(path: str | os.PathLike) -> list[Path]:
    """The tokenizer files (and ``generation_config.json``) present in a model directory.

    ``path`` may be the directory or a file inside it. Only files that exist are returned,
    in a fixed order, ready to be copied next to a merged model's weights.
    """
    directory = Path(os.path.expanduser(os.fspath(path)))
    if directory.is_file():
        directory = directory.parent
    found = [directory / n for n in TOKENIZER_FILE_NAMES if (directory / n).is_file()]
    for pattern in TOKENIZER_GLOBS:
        found += sorted(p for p in directory.glob(pattern) if p.is_file() and p not in found)
    return found


def split_model_ref(ref: str | os.PathLike) -> tuple[str, str | None]:
    """Split ``MODEL+ADAPTER`` (mergekit's LoRA syntax) into ``(model, adapter)``.

    An existing path is never split, even if its name holds ``+``. Otherwise the split is at
    the ``+`` whose left part exists (or, failing that, whose right part exists); a string
    with a single ``+`` splits there. Returns ``(ref, None)`` when there is nothing to split.
    Raises ``CheckpointError`` for an empty side or an ambiguous reference.
    """
    text = os.fspath(ref)
    if "+" not in text or Path(os.path.expanduser(text)).exists():
        return text, None
    cuts = [i for i, ch in enumerate(text) if ch == "+"]

    def exists(s: str) -> bool:
        return bool(s) and Path(os.path.expanduser(s)).exists()

    chosen = next((i for i in cuts if exists(text[:i])), None)
    if chosen is None:
        chosen = next((i for i in cuts if exists(text[i + 1:])), None)
    if chosen is None:
        if len(cuts) > 1:
            raise CheckpointError(f"model reference {text!r} is ambiguous: several '+' and no "
                                  f"side exists as a path (expected MODEL+ADAPTER)")
        chosen = cuts[0]
    model, adapter = text[:chosen], text[chosen + 1:]
    if not model or not adapter:
        raise CheckpointError(f"model reference {text!r}: expected MODEL+ADAPTER with both "
                              f"parts non-empty")
    return model, adapter
