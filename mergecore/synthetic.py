"""Synthetic Hugging Face-layout checkpoint families, generated offline, for tests and benchmarks.

Three generators:

* :func:`make_family` - a small base model (``base/``) and ``n_models - 1`` fine-tunes
  (``ft1/``, ``ft2/``, ...) of a real transformers architecture (llama, mistral, qwen2,
  gemma, gpt2, bert),
  each written by transformers' ``save_pretrained`` (safetensors, optionally sharded) with a
  tiny word-level tokenizer next to it. A fine-tune's tensor is ``ft = round(base + delta)``,
  with the delta built to exercise TIES/DARE selection (see :func:`_delta`).
* :func:`make_lora_adapter` - a real PEFT LoRA adapter for one of those models.
* :func:`make_bench_family` - a large LLaMA-shaped family (e.g. TinyLlama-sized, ~1.1e9
  parameters) written shard by shard with ``safetensors.torch.save_file`` and never
  instantiated as a model, for benchmarks.

Everything is deterministic in ``seed`` and does not touch the global torch RNG.
transformers and peft are imported lazily (importing this module is cheap).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ARCHS",
    "EXTRA_INT_TENSOR",
    "SHAPES",
    "UNCHANGED_IN_FT1",
    "llama_tensor_specs",
    "make_bench_family",
    "make_family",
    "make_lora_adapter",
    "model_dirs",
]

#: Architectures :func:`make_family` can build.
ARCHS = ("llama", "mistral", "qwen2", "gemma", "gpt2", "bert")

#: Name of the int64 tensor that ``extra_int_tensor=True`` adds, per architecture. For BERT it
#: is the classic (pre-4.31 transformers) persistent ``position_ids`` buffer, shape
#: ``(1, max_position_embeddings)``, values ``0..n-1``.
EXTRA_INT_TENSOR = {
    "llama": "model.position_ids",
    "mistral": "model.position_ids",
    "qwen2": "model.position_ids",
    "gemma": "model.position_ids",
    "gpt2": "transformer.position_ids",
    "bert": "embeddings.position_ids",
}

#: A tensor that fine-tune 1 leaves bit-identical to the base (its delta is all zeros), so that
#: the "zero task vector" paths (slerp of identical tensors, DARE's L1 < 1e-7 skip) are covered.
UNCHANGED_IN_FT1 = {
    "llama": "model.norm.weight",
    "mistral": "model.norm.weight",
    "qwen2": "model.norm.weight",
    "gemma": "model.norm.weight",
    "gpt2": "transformer.ln_f.weight",
    "bert": "pooler.dense.bias",
}

#: LLaMA shapes for :func:`make_bench_family` and :func:`llama_tensor_specs`. ``layers`` is the
#: real depth; callers may override it (e.g. a few 70B-shaped layers).
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 64, "intermediate": 172, "heads": 4, "kv_heads": 2, "vocab": 256,
             "layers": 2},
    "1b": {"hidden": 2048, "intermediate": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000,
           "layers": 22},
    "7b": {"hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32, "vocab": 32000,
           "layers": 32},
    "13b": {"hidden": 5120, "intermediate": 13824, "heads": 40, "kv_heads": 40, "vocab": 32000,
            "layers": 40},
    "70b": {"hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8, "vocab": 32000,
            "layers": 80},
}

_MAX_POSITIONS = 128
_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


# --------------------------------------------------------------------------------------------
# small helpers


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"synthetic checkpoints support dtype bf16/fp16/fp32, not {dtype}")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def _parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"2GB"``, ``"500MB"``, ``"64KiB"`` (HF convention)."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"shard size must be positive, got {size}")
        return size
    text = str(size).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for suffix, mult in units.items():
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            try:
                value = int(float(number) * mult)
            except ValueError:
                break
            if value <= 0:
                break
            return value
    raise ValueError(f"cannot parse shard size {size!r} (examples: 2GB, 500MB, 65536)")


def _generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator keyed by (seed, *salt); independent streams for independent purposes."""
    key = seed & 0xFFFFFFFF
    for s in salt:
        key = (key * 1_000_003 + (s & 0xFFFFFFFF) + 0x9E3779B9) % (2**63 - 1)
    return torch.Generator().manual_seed(key)


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


def model_dirs(out_dir: str | os.PathLike, n_models: int) -> list[Path]:
    """The directories of a family: ``[out_dir/base, out_dir/ft1, ..., out_dir/ft{n-1}]``."""
    root = Path(out_dir)
    return [root / "base"] + [root / f"ft{i}" for i in range(1, n_models)]


def _fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


# --------------------------------------------------------------------------------------------
# tokenizer


def _special_tokens(arch: str) -> dict[str, str]:
    if arch == "bert":
        return {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                "sep_token": "[SEP]", "mask_token": "[MASK]"}
    return {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def _vocab_tokens(arch: str, vocab: int, base_vocab: int) -> list[str]:
    """Token strings, id order: specials, letters/digits, ``w<i>``; ids past ``base_vocab``
    (a fine-tune's extra tokens) are ``<extra_<i>>``."""
    specials = list(_special_tokens(arch).values())
    words = specials + list("abcdefghijklmnopqrstuvwxyz0123456789")
    i = 0
    while len(words) < base_vocab:
        words.append(f"w{i}")
        i += 1
    words = words[:base_vocab]
    words += [f"<extra_{j}>" for j in range(max(0, vocab - base_vocab))]
    return words[:vocab]


def _save_tokenizer(arch: str, vocab: int, base_vocab: int, out: Path) -> None:
    """A word-level fast tokenizer with exactly ``vocab`` entries, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = _vocab_tokens(arch, vocab, base_vocab)
    specials = _special_tokens(arch)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                         unk_token=specials["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=_MAX_POSITIONS,
                                  **specials)
    tok.save_pretrained(str(out))


# --------------------------------------------------------------------------------------------
# make_family


def _arch_config(arch: str, *, hidden: int, layers: int, vocab: int,
                 intermediate: int | None, dtype: torch.dtype) -> Any:
    import transformers

    heads = max(1, hidden // 16)
    while hidden % heads:
        heads -= 1
    common_dtype = {"dtype": dtype} if _transformers_major() >= 5 else {"torch_dtype": dtype}
    if arch in ("llama", "mistral"):
        kv = heads // 2 if heads % 2 == 0 else heads
        cls = transformers.LlamaConfig if arch == "llama" else transformers.MistralConfig
        return cls(hidden_size=hidden, intermediate_size=intermediate or (hidden * 8) // 3,
                   num_hidden_layers=layers, num_attention_heads=heads,
                   num_key_value_heads=kv, vocab_size=vocab,
                   max_position_embeddings=_MAX_POSITIONS, bos_token_id=1, eos_token_id=2,
                   pad_token_id=3, tie_word_embeddings=False,
                   architectures=["LlamaForCausalLM" if arch == "llama"
                                  else "MistralForCausalLM"], **common_dtype)
    if arch == "qwen2":  # biases on q/k/v: 1-D per-layer tensors beside the matrices
        kv = heads // 2 if heads % 2 == 0 else heads
        return transformers.Qwen2Config(
            hidden_size=hidden, intermediate_size=intermediate or (hidden * 8) // 3,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
            vocab_size=vocab, max_position_embeddings=_MAX_POSITIONS, bos_token_id=1,
            eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
            architectures=["Qwen2ForCausalLM"], **common_dtype)
    if arch == "gemma":  # tied embeddings: no lm_head.weight in the files
        return transformers.GemmaConfig(
            hidden_size=hidden, intermediate_size=intermediate or hidden * 4,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1,
            head_dim=hidden // heads, vocab_size=vocab, max_position_embeddings=_MAX_POSITIONS,
            bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=True,
            architectures=["GemmaForCausalLM"], **common_dtype)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads,
                                       n_inner=intermediate, vocab_size=vocab,
                                       n_positions=_MAX_POSITIONS, bos_token_id=1,
                                       eos_token_id=2, pad_token_id=3,
                                       architectures=["GPT2LMHeadModel"], **common_dtype)
    if arch == "bert":
        return transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers,
                                       num_attention_heads=heads,
                                       intermediate_size=intermediate or 4 * hidden,
                                       vocab_size=vocab, max_position_embeddings=_MAX_POSITIONS,
                                       pad_token_id=0, architectures=["BertModel"],
                                       **common_dtype)
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _model_class(config: Any) -> Any:
    import transformers

    return getattr(transformers, config.architectures[0])


def _save_pretrained(model: Any, out: Path, shard_size: int | str | None) -> None:
    import inspect

    kwargs: dict[str, Any] = {}
    params = inspect.signature(model.save_pretrained).parameters
    if "safe_serialization" in params:  # transformers 4.x; 5.x always writes safetensors
        kwargs["safe_serialization"] = True
    if shard_size is not None:
        kwargs["max_shard_size"] = shard_size
    model.save_pretrained(str(out), **kwargs)


def _is_norm(name: str) -> bool:
    low = name.lower()
    return any(k in low for k in ("norm", "ln_", ".ln", "layernorm"))


def _base_tensor(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """A base tensor in fp32: norm scales ~ 1 + 0.1 N(0,1), biases 0.02 N(0,1), matrices
    0.02 N(0,1) with 0.5% outliers x6 (heavy tails, like trained LLM weights)."""
    x = torch.randn(shape, generator=gen)
    if len(shape) == 1 and _is_norm(name) and name.endswith("weight"):
        return 1.0 + 0.1 * x
    x = 0.02 * x
    if x.numel() >= 64:
        x = torch.where(torch.rand(shape, generator=gen) < 0.005, 6.0 * x, x)
    return x


def _delta(base: torch.Tensor, shared: torch.Tensor, noise: float,
           gen: torch.Generator) -> torch.Tensor:
    """A fine-tune's task vector for one tensor (fp32).

    ``delta = noise * m * rms(base) * (0.6 * shared + 0.8 * own)``, where ``shared`` is a
    N(0,1) direction common to all fine-tunes of the family (so fine-tunes partly agree in
    sign), ``own`` is N(0,1) private to this fine-tune, and ``m`` is drawn per (model, tensor)
    log-uniformly in [0.25, 8] (varied magnitudes: with noise=0.02 the relative change spans
    0.5%..16%, so slerp's both branches occur). Then 1% of entries are multiplied by 5
    (outliers that TIES' top-k must keep), and a fraction in [5%, 40%] of entries is set to
    exactly 0 (entries identical to the base after rounding).
    """
    shape = base.shape
    m = math.exp(_uniform(gen, math.log(0.25), math.log(8.0)))
    rms = float(base.double().pow(2).mean().sqrt()) or 1.0
    own = torch.randn(shape, generator=gen)
    d = (noise * m * rms) * (0.6 * shared + 0.8 * own)
    u = torch.rand(shape, generator=gen)
    d = torch.where(u < 0.01, 5.0 * d, d)
    zero_frac = _uniform(gen, 0.05, 0.40)
    return torch.where(torch.rand(shape, generator=gen) < zero_frac, torch.zeros_like(d), d)


def _resize_rows(t: torch.Tensor, rows: int, gen: torch.Generator) -> torch.Tensor:
    """``t`` with its first axis cut or extended to ``rows`` (new rows: 0.02 N(0,1))."""
    if rows <= t.shape[0]:
        return t[:rows].clone()
    extra = 0.02 * torch.randn((rows - t.shape[0],) + tuple(t.shape[1:]), generator=gen)
    return torch.cat([t, extra], dim=0)


def _add_int_tensor(model_dir: Path, name: str, value: torch.Tensor) -> None:
    """Add an int tensor to a saved checkpoint: into ``model.safetensors``, or into the last
    shard of a sharded one, keeping the index's weight map and total size consistent."""
    from safetensors.torch import load_file, save_file

    index_path = model_dir / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        shard = max(index["weight_map"].values())
    else:
        index, shard = None, "model.safetensors"
    path = model_dir / shard
    tensors = load_file(str(path))
    if name in tensors:
        raise ValueError(f"{path}: tensor {name!r} already exists")
    tensors[name] = value.contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    if index is not None:
        index["weight_map"][name] = shard
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        meta = index.setdefault("metadata", {})
        meta["total_size"] = int(meta.get("total_size", 0)) + value.numel() * value.element_size()
        if "total_parameters" in meta:  # transformers >= 5 also records the parameter count
            meta["total_parameters"] = int(meta["total_parameters"]) + value.numel()
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def make_family(
    out_dir: str | os.PathLike,
    *,
    arch: str = "llama",
    n_models: int = 3,
    hidden: int = 64,
    layers: int = 4,
    vocab: int = 256,
    intermediate: int | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    seed: int = 0,
    noise: float = 0.02,
    shard_size: int | str | None = None,
    vocab_sizes: Sequence[int] | None = None,
    extra_int_tensor: bool = False,
) -> list[Path]:
    """Write a base model and ``n_models - 1`` fine-tunes of ``arch``; return their directories.

    Layout: ``out_dir/base``, ``out_dir/ft1``, ... (see :func:`model_dirs`); each holds
    ``config.json``, ``model.safetensors`` (or shards + ``model.safetensors.index.json`` when
    ``shard_size`` is given, in HF units: an int of bytes or ``"64KB"``), ``generation_config.json``
    (causal LMs; ``BertModel`` cannot generate and has none), and a word-level tokenizer
    (``tokenizer.json``, ``tokenizer_config.json``) whose size equals the model's vocabulary.
    An existing directory of the same name is replaced.

    Values: base tensors are random (:func:`_base_tensor`); for fine-tune ``i`` and tensor ``t``,
    ``ft_i[t] = round_dtype(base[t] + delta_i[t])`` with ``delta`` from :func:`_delta` (mixed
    magnitudes and signs, outliers, entries exactly equal to the base). Fine-tune 1 leaves
    :data:`UNCHANGED_IN_FT1` ``[arch]`` identical to the base.

    ``vocab_sizes`` (one per model, base first) gives models different vocabularies: the first
    ``min`` rows of vocabulary-sized tensors are base + delta, extra rows are fresh random, and the
    tokenizer gains tokens ``<extra_j>``. ``extra_int_tensor`` adds the int64 tensor
    :data:`EXTRA_INT_TENSOR` ``[arch]`` (``arange``, shape ``(1, 128)``) to every model's files.
    Runs offline; about a second for the default sizes.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    if n_models < 1:
        raise ValueError(f"n_models must be >= 1, got {n_models}")
    if hidden < 4 or layers < 1:
        raise ValueError(f"hidden must be >= 4 and layers >= 1 (got {hidden}, {layers})")
    if noise < 0 or not math.isfinite(noise):
        raise ValueError(f"noise must be a finite number >= 0, got {noise}")
    dt = _as_dtype(dtype)
    sizes = [vocab] * n_models if vocab_sizes is None else [int(v) for v in vocab_sizes]
    if len(sizes) != n_models:
        raise ValueError(f"vocab_sizes has {len(sizes)} entries for {n_models} models")
    min_vocab = len(_special_tokens(arch)) + 3
    if min(sizes) < min_vocab:
        raise ValueError(f"vocabulary sizes must be >= {min_vocab}, got {sizes}")
    dirs = model_dirs(out_dir, n_models)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _write_family(arch, dirs, sizes, hidden=hidden, layers=layers,
                      intermediate=intermediate, dtype=dt, seed=seed, noise=noise,
                      shard_size=shard_size)
    if extra_int_tensor:
        name = EXTRA_INT_TENSOR[arch]
        for d in dirs:
            _add_int_tensor(d, name, torch.arange(_MAX_POSITIONS, dtype=torch.int64)[None])
    return dirs


def _write_family(arch: str, dirs: list[Path], sizes: list[int], *, hidden: int, layers: int,
                  intermediate: int | None, dtype: torch.dtype, seed: int, noise: float,
                  shard_size: int | str | None) -> None:
    """Build, fill and save each model of the family in turn (base first)."""
    base_vocab = sizes[0]
    gen = _generator(seed, 0)
    base_sd: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    for i, (model_dir, v) in enumerate(zip(dirs, sizes)):
        config = _arch_config(arch, hidden=hidden, layers=layers, vocab=v,
                              intermediate=intermediate, dtype=dtype)
        model = _model_class(config)(config).to(dtype)
        mgen = _generator(seed, 1000 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if i == 0:
                    value = _base_tensor(name, param.shape, gen).to(dtype)
                    base_sd[name] = value
                    shared[name] = torch.randn(param.shape, generator=gen)
                else:
                    value = _finetune_tensor(name, param.shape, base_sd, shared, noise,
                                             mgen, unchanged=(i == 1 and
                                                              name == UNCHANGED_IN_FT1[arch]))
                    value = value.to(dtype)
                param.copy_(value)
        _fresh_dir(model_dir)
        _save_pretrained(model, model_dir, shard_size)
        _save_tokenizer(arch, v, base_vocab, model_dir)
        del model


def _finetune_tensor(name: str, shape: torch.Size, base_sd: dict[str, torch.Tensor],
                     shared: dict[str, torch.Tensor], noise: float, gen: torch.Generator,
                     *, unchanged: bool) -> torch.Tensor:
    base = base_sd[name].float()
    sh = shared[name]
    if base.shape != shape:  # a vocabulary-sized tensor of a model with another vocabulary
        if base.shape[1:] != shape[1:]:
            raise ValueError(f"tensor {name!r}: shape {tuple(shape)} differs from the base's "
                             f"{tuple(base.shape)} on a non-vocabulary axis")
        base = _resize_rows(base, shape[0], gen)
        sh = _resize_rows(sh, shape[0], gen)
    if unchanged:
        return base
    return base + _delta(base, sh, noise, gen)


# --------------------------------------------------------------------------------------------
# LoRA adapter


def make_lora_adapter(
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    r: int = 4,
    alpha: float = 8,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    seed: int = 0,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    modules_to_save: Sequence[str] | None = None,
) -> Path:
    """Write a PEFT LoRA adapter for the model in ``base_dir`` to ``out_dir``; return ``out_dir``.

    Built with ``peft.LoraConfig`` + ``get_peft_model`` on the loaded base model (its
    ``config.architectures[0]`` class); every ``lora_A`` is set to ``N(0,1)/sqrt(in)`` and every
    ``lora_B`` to ``0.02 N(0,1)`` (non-zero, so the adapter changes the weights:
    ``W' = W + s * B @ A`` with ``s = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``).
    The adapter is saved with ``save_pretrained`` (``adapter_config.json``,
    ``adapter_model.safetensors``); ``base_model_name_or_path`` is ``base_dir``.

    ``rank_pattern`` / ``alpha_pattern`` / ``modules_to_save`` go to ``LoraConfig`` as they are.
    An embedding among ``target_modules`` gets ``lora_embedding_A = N(0,1)/sqrt(r)`` and
    ``lora_embedding_B = 0.02 N(0,1)``; a ``modules_to_save`` copy is the base tensor plus
    ``0.01 N(0,1)`` (so that it differs from the base).
    """
    import transformers
    from peft import LoraConfig, get_peft_model

    base_dir = Path(base_dir)
    config = transformers.AutoConfig.from_pretrained(str(base_dir))
    if not getattr(config, "architectures", None):
        raise ValueError(f"{base_dir / 'config.json'} names no architectures")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(config).from_pretrained(str(base_dir))
        lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules),
                          use_rslora=use_rslora, lora_dropout=0.0, bias="none",
                          fan_in_fan_out=config.model_type == "gpt2",
                          rank_pattern=dict(rank_pattern or {}),
                          alpha_pattern=dict(alpha_pattern or {}),
                          modules_to_save=list(modules_to_save) if modules_to_save else None)
        peft_model = get_peft_model(model, lora)
        gen = _generator(seed, 7)
        n = 0
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if ".lora_A." in name:
                    param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1]))
                    n += 1
                elif ".lora_embedding_A." in name:
                    param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[0]))
                    n += 1
                elif ".lora_B." in name or ".lora_embedding_B." in name:
                    param.copy_(0.02 * torch.randn(param.shape, generator=gen))
                elif ".modules_to_save." in name:
                    noise = 0.01 * torch.randn(param.shape, generator=gen)
                    param.copy_(param.float() + noise)
        if n == 0:
            raise ValueError(f"no module of {base_dir} matches target_modules {target_modules}")
    out = Path(out_dir)
    _fresh_dir(out)
    peft_model.save_pretrained(str(out))
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


# --------------------------------------------------------------------------------------------
# large benchmark families


def _shape_preset(params: str | dict[str, int], layers: int | None) -> dict[str, int]:
    if isinstance(params, dict):
        shape = dict(params)
    else:
        try:
            shape = dict(SHAPES[params.lower()])
        except KeyError:
            raise ValueError(f"unknown shape preset {params!r}; choose one of "
                             f"{sorted(SHAPES)} or pass a dict") from None
    missing = {"hidden", "intermediate", "heads", "kv_heads", "vocab", "layers"} - set(shape)
    if missing:
        raise ValueError(f"shape preset lacks {sorted(missing)}")
    if layers is not None:
        shape["layers"] = int(layers)
    if shape["hidden"] % shape["heads"] or shape["heads"] % shape["kv_heads"]:
        raise ValueError(f"inconsistent heads in {shape}")
    if shape["layers"] < 1:
        raise ValueError(f"layers must be >= 1, got {shape['layers']}")
    return shape


def llama_tensor_specs(params: str | dict[str, int] = "1b",
                       layers: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor of a LLaMA causal LM, in transformers' ``state_dict``
    order (embeddings; per layer q, k, v, o, gate, up, down, input and post-attention norms;
    final norm; untied ``lm_head``)."""
    s = _shape_preset(params, layers)
    h, i, v = s["hidden"], s["intermediate"], s["vocab"]
    kv = (h // s["heads"]) * s["kv_heads"]
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        specs += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def _plan_shards(specs: list[tuple[str, tuple[int, ...]]], itemsize: int,
                 shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    return shards


class _Pool:
    """Random values drawn once, tiled into tensors in chunks at random offsets.

    Drawing 3e9 normal variates costs about a minute on two cores; copying from a 16M-entry
    pool runs at memory speed. Each chunk of ``chunk`` elements (4M: large, because every torch
    call is a parallel region whose start-up dominates small chunks on a busy machine) starts at
    an independent random offset, so tensors do not repeat one pattern in step.
    """

    def __init__(self, values: torch.Tensor, gen: torch.Generator, chunk: int = 1 << 22):
        self.values = values
        self.gen = gen
        self.chunk = min(chunk, values.numel() // 2)

    def _offsets(self, count: int) -> list[int]:
        hi = self.values.numel() - self.chunk
        return torch.randint(0, hi + 1, (count,), generator=self.gen).tolist()

    def fill(self, out: torch.Tensor) -> None:
        """``out[:] = pool values``."""
        flat = out.view(-1)
        n = flat.numel()
        for j, off in enumerate(self._offsets(-(-n // self.chunk))):
            s = j * self.chunk
            e = min(n, s + self.chunk)
            flat[s:e].copy_(self.values[off:off + e - s])

    def add(self, base: torch.Tensor, out: torch.Tensor) -> None:
        """``out[:] = round(base + pool values)``."""
        src, flat = base.view(-1), out.view(-1)
        n = flat.numel()
        for j, off in enumerate(self._offsets(-(-n // self.chunk))):
            s = j * self.chunk
            e = min(n, s + self.chunk)
            torch.add(src[s:e], self.values[off:off + e - s], out=flat[s:e])


def _delta_pool(size: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """fp32 deltas for bench fine-tunes: N(0,1) * 0.02 * noise * m, m log-uniform in [0.25, 8]
    per block of 4096 entries, 1% outliers x5, 20% exact zeros."""
    block = 4096
    size = -(-size // block) * block
    m = torch.exp(torch.empty(size // block).uniform_(math.log(0.25), math.log(8.0),
                                                       generator=gen))
    d = torch.randn(size // block, block, generator=gen) * (0.02 * noise) * m[:, None]
    d = d.view(-1)
    u = torch.rand(size, generator=gen)
    d = torch.where(u < 0.01, 5.0 * d, d)
    return torch.where(u > 0.80, torch.zeros_like(d), d)


def make_bench_family(
    out_dir: str | os.PathLike,
    *,
    params: str | dict[str, int] = "1b",
    layers: int | None = None,
    n_models: int = 3,
    dtype: torch.dtype | str = torch.bfloat16,
    seed: int = 0,
    noise: float = 0.02,
    shard_size: int | str = "1GB",
    tokenizer: bool = True,
) -> list[Path]:
    """Write a LLaMA-shaped base and ``n_models - 1`` fine-tunes without building the model.

    ``params`` is a key of :data:`SHAPES` (``"1b"`` is TinyLlama-shaped: hidden 2048,
    intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000, about 1.1e9 parameters,
    2.2 GB per model in bf16) or a dict with the same keys; ``layers`` overrides the depth (e.g.
    ``params="70b", layers=2`` writes two real 70B-shaped layers plus embeddings and head).
    Directories as in :func:`model_dirs`; each gets ``config.json`` (a transformers
    ``LlamaConfig``), safetensors shards of at most ``shard_size`` (``model.safetensors`` if one
    shard suffices, else ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``),
    and, with ``tokenizer``, a word-level tokenizer of the model's vocabulary.

    Values: matrices 0.02 N(0,1), norm weights 1 + 0.1 N(0,1); a fine-tune is
    ``round(base + delta)`` with deltas from :func:`_delta_pool` for matrices (mixed magnitudes,
    outliers, 20% exact zeros) and ``noise * N(0,1)`` (20% exact zeros) for norm weights. Random values are tiled from pools (see :class:`_Pool`), so generation
    runs at memory speed; shard ``k`` of every model is built in one reused buffer per model
    and written with ``safetensors.torch.save_file``. Peak memory is about
    ``n_models * shard_size`` plus 200 MB of pools.
    """
    from safetensors.torch import save_file

    if n_models < 1:
        raise ValueError(f"n_models must be >= 1, got {n_models}")
    dt = _as_dtype(dtype)
    shape = _shape_preset(params, layers)
    specs = llama_tensor_specs(shape)
    itemsize = torch.empty((), dtype=dt).element_size()
    shards = _plan_shards(specs, itemsize, _parse_size(shard_size))
    dirs = model_dirs(out_dir, n_models)
    for d in dirs:
        _fresh_dir(d)
        _write_llama_config(d, shape, dt)
        if tokenizer:
            _save_tokenizer("llama", shape["vocab"], shape["vocab"], d)

    gen = _generator(seed, 11)
    largest = max(math.prod(shp) for _, shp in specs)
    pool_n = min(1 << 24, max(1 << 16, 1 << (2 * largest - 1).bit_length()))  # small for tiny
    base_pool = _Pool((0.02 * torch.randn(pool_n, generator=gen)).to(dt), gen)
    delta_pools = [_Pool(_delta_pool(pool_n, noise, gen).to(dt), gen) for _ in dirs[1:]]

    max_elems = max(sum(math.prod(s) for _, s in shard) for shard in shards)
    buffers = [torch.empty(max_elems, dtype=dt) for _ in dirs]
    n_shards = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        fname = ("model.safetensors" if n_shards == 1
                 else f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors")
        per_model: list[dict[str, torch.Tensor]] = [{} for _ in dirs]
        offset = 0
        for name, shp in shard:
            n = math.prod(shp)
            views = [b[offset:offset + n].view(shp) for b in buffers]
            offset += n
            if len(shp) == 1:  # norms: small, drawn directly
                views[0].copy_(1.0 + 0.1 * torch.randn(shp, generator=gen))
                for view in views[1:]:  # relative change ~ noise, 20% exact zeros
                    delta = noise * torch.randn(shp, generator=gen)
                    delta[torch.rand(shp, generator=gen) < 0.2] = 0.0
                    view.copy_(views[0].float() + delta)
            else:
                base_pool.fill(views[0])
                for pool, view in zip(delta_pools, views[1:]):
                    pool.add(views[0], view)
            for m, view in enumerate(views):
                per_model[m][name] = view
            weight_map[name] = fname
            total += n * itemsize
        for d, tensors in zip(dirs, per_model):
            save_file(tensors, str(d / fname), metadata={"format": "pt"})
    if n_shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        for d in dirs:
            (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return dirs


def _write_llama_config(model_dir: Path, shape: dict[str, int], dtype: torch.dtype) -> None:
    import transformers

    dtype_kw = {"dtype": dtype} if _transformers_major() >= 5 else {"torch_dtype": dtype}
    config = transformers.LlamaConfig(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"], **dtype_kw)
    config.save_pretrained(str(model_dir))
