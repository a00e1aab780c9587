"""A PEFT LoRA adapter on disk: which base tensors it changes, checked against a model, and
the change itself, computed for one tensor at a time.

Layout: ``adapter_config.json`` (``mergecore.lora.settings``) and ``adapter_model.safetensors``
(or, from older PEFT versions, ``adapter_model.bin``, read with ``torch.load(weights_only=True)``).
Every key starts with ``base_model.model.``; without that prefix, a key names

- ``<m>.lora_A.weight`` ``(r, in)`` and ``<m>.lora_B.weight`` ``(out, r)``: a low-rank update of
  ``<m>.weight``: ``W' = W + s * (B @ A)``, transposed first with ``fan_in_fan_out``;
- ``<m>.lora_embedding_A`` ``(r, vocab)`` and ``<m>.lora_embedding_B`` ``(dim, r)``: an embedding
  update ``W' = W + s * (B @ A)^T``;
- ``<m>.lora_B.bias`` (``lora_bias``): ``bias' = bias + s * b``;
- anything else (``modules_to_save`` copies such as ``lm_head.weight``, biases saved with
  ``bias: all``, an embedding's ``base_layer.weight``): a tensor that replaces the base tensor
  of that name (``.base_layer.`` removed), before any low-rank update is added.

``s = alpha / r`` or ``alpha / sqrt(r)`` with the module's own r and alpha
(``LoraSettings.scale``). The update is computed in float32 on the device of the tensor it is
applied to, and the result is rounded once to the base tensor's dtype: the tensor a
PEFT-merged checkpoint saved in the base's dtype would hold.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergecore.lora.settings import AdapterConfigError, LoraSettings, read_settings

if TYPE_CHECKING:
    from typing_extensions import Self

    from mergecore.io.types import Checkpoint

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

_LINEAR_A, _LINEAR_B, _LINEAR_BIAS = ".lora_A.weight", ".lora_B.weight", ".lora_B.bias"
_EMBED_A, _EMBED_B = ".lora_embedding_A", ".lora_embedding_B"


class AdapterError(ValueError):
    """An adapter cannot be applied as given; the message names the adapter and the key."""


@dataclass(frozen=True)
class TensorEdit:
    """What an adapter does to one base tensor ``target``, in this order: ``replace`` it by an
    adapter tensor, add ``scale * (B @ A)`` (transposed when ``transpose``), add
    ``scale * bias``. Fields hold adapter keys (None: that step is absent)."""

    target: str
    module: str
    replace: str | None = None
    lora_a: str | None = None
    lora_b: str | None = None
    bias: str | None = None
    scale: float = 1.0
    transpose: bool = False


@dataclass
class LoraUpdate:
    """The tensors of one ``TensorEdit``, loaded (on the host or on the merge device)."""

    target: str
    shape: tuple[int, ...]
    replace: torch.Tensor | None = None
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    scale: float = 1.0
    transpose: bool = False

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this update holds."""
        return [t for t in (self.replace, self.lora_a, self.lora_b, self.bias) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LoraUpdate:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return LoraUpdate(self.target, self.shape, move(self.replace), move(self.lora_a),
                          move(self.lora_b), move(self.bias), self.scale, self.transpose)

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with the update applied: a new tensor of ``weight``'s dtype and device.

        ``weight`` may hold only the first rows of the target (a vocabulary cut to the rows
        all models share); the update is then cut the same way, after the low-rank product
        ``B @ A`` is formed at the target's full shape, so every row of the result has the same
        bits whether or not the weight was cut (a fused recipe applies the adapter before the
        cut, a single merge after it; a GEMM of fewer rows may pick another algorithm on a GPU).
        ``weight`` is never modified.
        """
        rows = weight.shape[0] if weight.dim() else None
        cut = rows is not None and rows < self.shape[0]
        if tuple(weight.shape[1:]) != self.shape[1:] or (rows is not None and
                                                         rows > self.shape[0]):
            raise AdapterError(f"tensor {self.target!r}: LoRA update of shape {list(self.shape)} "
                               f"cannot apply to a tensor of shape {list(weight.shape)}")
        src = weight if self.replace is None else self.replace
        out = src[:rows] if cut else src
        out = out.to(device=weight.device, dtype=torch.float32, copy=True)
        if self.lora_a is not None:
            a = self.lora_a.to(weight.device, torch.float32)
            b = self.lora_b.to(weight.device, torch.float32)
            delta = b @ a
            if self.transpose:
                delta = delta.T
            out.add_((delta[:rows] if cut else delta).mul_(self.scale))
        if self.bias is not None:
            bias = self.bias.to(weight.device, torch.float32)
            out.add_((bias[:rows] if cut else bias) * self.scale)
        return out.to(weight.dtype)


# ----- reading the weight file -----------------------------------------------------------------


def _load_bin(path: Path) -> Any:
    """A ``.bin`` state dict, memory-mapped when it is in torch's zip format, read whole when
    it is in the legacy format (``_use_new_zipfile_serialization=False``) mmap cannot map."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


class _Weights:
    """Shapes of the adapter's tensors (from the header alone) and reads of single tensors."""

    def __init__(self, path: Path):
        self.path = path
        self._reader = None
        self._bin: Mapping[str, torch.Tensor] | None = None
        if path.suffix == ".safetensors":
            from mergecore.io import read_header

            self.infos, _ = read_header(path)
            self.shapes = {k: (i.shape, i.is_float) for k, i in self.infos.items()}
        else:
            try:
                self._bin = _load_bin(path)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure
                raise AdapterError(f"LoRA adapter weights {str(path)!r} cannot be loaded: "
                                   f"{exc}") from None
            if not isinstance(self._bin, Mapping):
                raise AdapterError(f"LoRA adapter weights {str(path)!r} do not hold a "
                                   "state dict")
            self.shapes = {k: (tuple(v.shape), v.is_floating_point())
                           for k, v in self._bin.items()}

    def read(self, key: str) -> torch.Tensor:
        if self._bin is not None:
            return self._bin[key].clone()
        if self._reader is None:
            from mergecore.io import TensorReader

            self._reader = TensorReader(nthreads=1)
        return self._reader.read_tensor(self.infos[key])

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


# ----- the adapter --------------------------------------------------------------------------------


def _strip(name: str, suffix: str) -> str:
    return name[: -len(suffix)]


class LoraAdapter:
    """One adapter directory, opened: its settings and one ``TensorEdit`` per base tensor it
    changes (``edits``, keyed by base tensor name). Opening reads the config and the weight
    file's header only; tensors are read by ``update`` / ``apply``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self.where = f"LoRA adapter {str(path)!r}"
        if not self.path.is_dir():
            raise AdapterError(f"{self.where}: " + ("not a directory (a PEFT adapter is a "
                               "directory)" if self.path.exists() else "no such directory"))
        cfg = self.path / CONFIG_FILE
        if not cfg.is_file():
            raise AdapterError(f"{self.where}: {CONFIG_FILE} is missing (not a PEFT adapter "
                               "directory?)")
        try:
            self.settings: LoraSettings = read_settings(cfg)
        except AdapterConfigError as exc:
            raise AdapterError(str(exc)) from None
        weights = next((self.path / f for f in WEIGHT_FILES if (self.path / f).is_file()), None)
        if weights is None:
            raise AdapterError(f"{self.where}: no weights ({' or '.join(WEIGHT_FILES)})")
        try:
            self._weights = _Weights(weights)
        except (ValueError, OSError) as exc:
            raise AdapterError(f"{self.where}: {exc}") from None
        self.edits: dict[str, TensorEdit] = self._collect_edits()

    # --- key mapping ---
    def _collect_edits(self) -> dict[str, TensorEdit]:
        parts: dict[str, dict[str, str]] = {}  # target -> {role: adapter key}
        modules: dict[str, str] = {}
        problems: list[str] = []
        for key, (shape, is_float) in self._weights.shapes.items():
            if not key.startswith(PREFIX):
                problems.append(f"key {key!r} does not start with {PREFIX!r} (not a PEFT "
                                "LoRA state dict)")
                continue
            if not is_float:
                problems.append(f"key {key!r} is not a floating point tensor")
                continue
            name = key[len(PREFIX):]
            role = target = None
            for suffix, r, tail in ((_LINEAR_A, "a", ".weight"), (_LINEAR_B, "b", ".weight"),
                                    (_LINEAR_BIAS, "bias", ".bias"),
                                    (_EMBED_A, "ea", ".weight"), (_EMBED_B, "eb", ".weight")):
                if name.endswith(suffix):
                    module = _strip(name, suffix)
                    role, target = r, module + tail
                    modules[target] = module
                    break
            if role is None:
                if ".lora_" in name:
                    problems.append(f"key {key!r}: LoRA tensor of a kind mergecore does not "
                                    "merge (DoRA magnitude, AdaLoRA, a named adapter ...)")
                    continue
                role, target = "replace", name.replace(".base_layer.", ".")
                modules.setdefault(target, target.rsplit(".", 1)[0])
            slot = parts.setdefault(target, {})
            if role in slot:
                problems.append(f"keys {slot[role]!r} and {key!r} both set {role} of {target!r}")
            slot[role] = key
        edits: dict[str, TensorEdit] = {}
        for target, slot in parts.items():
            module = modules[target]
            embed = "ea" in slot or "eb" in slot
            a, b = (slot.get("ea"), slot.get("eb")) if embed else (slot.get("a"), slot.get("b"))
            if embed and ("a" in slot or "b" in slot):
                problems.append(f"module {module!r} has both linear and embedding LoRA tensors")
                continue
            if (a is None) != (b is None):
                problems.append(f"module {module!r} has {'A' if a else 'B'} but no "
                                f"{'B' if a else 'A'} LoRA matrix")
                continue
            if "bias" in slot and not self.settings.lora_bias:
                problems.append(f"key {slot['bias']!r} is a LoRA bias but lora_bias is false")
            scale = self.settings.scale(module) if (a is not None or "bias" in slot) else 1.0
            edits[target] = TensorEdit(
                target=target, module=module, replace=slot.get("replace"), lora_a=a, lora_b=b,
                bias=slot.get("bias"), scale=scale,
                transpose=embed or (a is not None and self.settings.fan_in_fan_out))
        if problems:
            raise AdapterError(f"{self.where}: " + "; ".join(problems))
        return edits

    # --- checks against a model ---
    def expected_shape(self, edit: TensorEdit) -> tuple[int, ...] | None:
        """The base tensor shape the edit fits (None for a replacement or bias alone)."""
        shapes = self._weights.shapes
        if edit.lora_a is not None:
            a, b = shapes[edit.lora_a][0], shapes[edit.lora_b][0]
            return (a[1], b[0]) if edit.transpose else (b[0], a[1])
        if edit.replace is not None:
            return shapes[edit.replace][0]
        return shapes[edit.bias][0]

    def _edit_problems(self, edit: TensorEdit, shape: tuple[int, ...]) -> list[str]:
        shapes = self._weights.shapes
        out = []
        if edit.lora_a is not None:
            a, b = shapes[edit.lora_a][0], shapes[edit.lora_b][0]
            if len(a) != 2 or len(b) != 2:
                return [(f"module {edit.module!r}: LoRA matrices of shapes {list(a)} and "
                         f"{list(b)} (only 2-D Linear/Conv1D/Embedding LoRA is supported)")]
            if a[0] != b[1]:
                return [f"module {edit.module!r}: A {list(a)} and B {list(b)} disagree on the rank"]
            want = self.settings.rank(edit.module)
            if want != a[0]:
                out.append(f"module {edit.module!r}: the config gives r = {want} (r / "
                           f"rank_pattern) but its tensors have rank {a[0]}")
            expect = self.expected_shape(edit)
            if tuple(expect) != tuple(shape):
                hint = (" (check fan_in_fan_out)" if len(shape) == 2
                        and tuple(reversed(expect)) == tuple(shape) else "")
                out.append(f"keys {edit.lora_a!r}, {edit.lora_b!r} fit a tensor of shape "
                           f"{list(expect)}, but {edit.target!r} has shape {list(shape)}{hint}")
        if edit.replace is not None and shapes[edit.replace][0] != tuple(shape):
            out.append(f"key {edit.replace!r} replaces {edit.target!r} with shape "
                       f"{list(shapes[edit.replace][0])}, the model's has {list(shape)}")
        if edit.bias is not None and shapes[edit.bias][0] != tuple(shape):
            out.append(f"key {edit.bias!r} of shape {list(shapes[edit.bias][0])} does not fit "
                       f"bias {edit.target!r} of shape {list(shape)}")
        return out

    def _edit_keys(self, edit: TensorEdit) -> str:
        keys = [k for k in (edit.lora_a, edit.lora_b, edit.replace, edit.bias) if k]
        return "key " + repr(keys[0]) if len(keys) == 1 else "keys " + ", ".join(map(repr, keys))

    def problems(self, tensors: Mapping[str, tuple[Sequence[int], bool]]) -> list[str]:
        """Every reason the adapter does not fit a model whose tensors are ``tensors``
        (``{name: (shape, is_float)}``); each line names the adapter and the key."""
        out = []
        for target, edit in self.edits.items():
            if target not in tensors:
                tied = (target.endswith("lm_head.weight")
                        and any(n.endswith("embed_tokens.weight") for n in tensors))
                hint = (" (its output layer is tied to the input embeddings; an adapter that "
                        "changes lm_head of a tied model is not supported: it would change "
                        "the shared embedding matrix)") if tied else ""
                out.append(f"{self._edit_keys(edit)} target tensor {target!r}, which the "
                           f"model does not have{hint}")
                continue
            shape, is_float = tensors[target]
            if not is_float:
                out.append(f"{self._edit_keys(edit)} target {target!r}, which is not a "
                           "floating point tensor")
                continue
            out.extend(self._edit_problems(edit, tuple(shape)))
        return [f"{self.where}: {p}" for p in out]

    # --- the update of one tensor ---
    def update(self, name: str) -> LoraUpdate | None:
        """The loaded update of base tensor ``name`` (host tensors), or None when the adapter
        leaves it unchanged."""
        edit = self.edits.get(name)
        if edit is None:
            return None

        def read(key: str | None) -> torch.Tensor | None:
            return None if key is None else self._weights.read(key)

        return LoraUpdate(target=name, shape=tuple(self.expected_shape(edit)),
                          replace=read(edit.replace), lora_a=read(edit.lora_a),
                          lora_b=read(edit.lora_b), bias=read(edit.bias), scale=edit.scale,
                          transpose=edit.transpose)

    def update_nbytes(self, name: str) -> int:
        """Bytes ``update(name)`` holds (0 when the adapter leaves ``name`` unchanged)."""
        edit = self.edits.get(name)
        if edit is None:
            return 0
        total = 0
        for key in (edit.replace, edit.lora_a, edit.lora_b, edit.bias):
            if key is not None:
                shape, _ = self._weights.shapes[key]
                n = 1
                for s in shape:
                    n *= s
                total += 4 * n
        return total

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the base model's tensor ``name``) with the adapter applied; ``tensor``
        itself when the adapter does not change it."""
        update = self.update(name)
        return tensor if update is None else update.apply(tensor)

    def close(self) -> None:
        self._weights.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def checkpoint_tensors(checkpoint: Checkpoint) -> dict[str, tuple[tuple[int, ...], bool]]:
    """``{name: (shape, is_float)}`` of an opened ``mergecore.io.Checkpoint``."""
    return {n: (i.shape, i.is_float) for n, i in checkpoint.tensors.items()}


def adapter_problems(adapter_path: str | os.PathLike, checkpoint: Checkpoint) -> list[str]:
    """Every reason the adapter at ``adapter_path`` cannot be applied to ``checkpoint`` (an
    opened ``mergecore.io.Checkpoint``): missing files, a bad config, unsupported features,
    targets the model lacks, shapes that do not fit. Reads no tensor data."""
    try:
        adapter = LoraAdapter(adapter_path)
    except AdapterError as exc:
        return [str(exc)]
    try:
        return adapter.problems(checkpoint_tensors(checkpoint))
    finally:
        adapter.close()
