"""open_checkpoint on real HF-layout checkpoints (transformers save_pretrained, safetensors)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from mergecore.io.checkpoint import (
    INDEX_NAME,
    open_checkpoint,
    split_model_ref,
    tokenizer_files,
)
from mergecore.io.errors import CheckpointError, SafetensorsError
from mergecore.io.reader import TensorReader


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    model = _tiny_llama()
    single = tmp_path_factory.mktemp("llama_single")
    sharded = tmp_path_factory.mktemp("llama_sharded")
    model.save_pretrained(single, safe_serialization=True)
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="100KB")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return single, sharded, state


def _check_against_state(ckpt, state) -> None:
    # every saved tensor is there (transformers may drop tied/alias keys, never add)
    assert set(ckpt.tensors) <= set(state)
    assert "model.embed_tokens.weight" in ckpt.tensors
    assert len(ckpt.tensors) >= len(state) - 1
    with TensorReader() as reader:
        for name, info in ckpt.tensors.items():
            got = reader.read_tensor(info)
            assert got.dtype == state[name].dtype and got.shape == state[name].shape
            assert torch.equal(got, state[name]), name
    # read order: file by file, by data offset within a file
    keys = [(ckpt.weight_files.index(i.file), i.data_start) for i in ckpt.tensors.values()]
    assert keys == sorted(keys)


def test_single_file_llama(llama_dirs):
    single, _, state = llama_dirs
    ckpt = open_checkpoint(single)
    assert ckpt.path == single
    assert [p.name for p in ckpt.weight_files] == ["model.safetensors"]
    assert ckpt.config is not None and ckpt.config["model_type"] == "llama"
    assert ckpt.config["hidden_size"] == 64
    _check_against_state(ckpt, state)
    # a path to the file itself works too, with the directory's config
    one = open_checkpoint(single / "model.safetensors")
    assert one.tensors == ckpt.tensors and one.config == ckpt.config


def test_sharded_llama(llama_dirs):
    _, sharded, state = llama_dirs
    assert (sharded / INDEX_NAME).is_file()
    ckpt = open_checkpoint(str(sharded))
    index = json.loads((sharded / INDEX_NAME).read_text())
    assert len(ckpt.weight_files) == len(set(index["weight_map"].values())) > 1
    assert [p.name for p in ckpt.weight_files] == sorted(set(index["weight_map"].values()))
    assert set(ckpt.tensors) == set(index["weight_map"])
    for name, info in ckpt.tensors.items():
        assert info.file.name == index["weight_map"][name]
    _check_against_state(ckpt, state)


def test_index_ignores_unlisted_files_and_tensors(llama_dirs, tmp_path):
    _, sharded, state = llama_dirs
    d = tmp_path / "m"
    d.mkdir()
    for p in sharded.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    # a stray consolidated file next to the shards (as in some Mistral repos) is not read
    safetensors.torch.save_file({"model.embed_tokens.weight": torch.zeros(2)},
                                d / "consolidated.safetensors")
    ckpt = open_checkpoint(d)
    assert all(p.name != "consolidated.safetensors" for p in ckpt.weight_files)
    _check_against_state(ckpt, state)


def test_unindexed_set_of_files(tmp_path):
    a = {"x.weight": torch.randn(3, 5), "x.bias": torch.randn(5)}
    b = {"y.weight": torch.randn(7, 2).to(torch.bfloat16)}
    safetensors.torch.save_file(b, tmp_path / "part-b.safetensors")
    safetensors.torch.save_file(a, tmp_path / "part-a.safetensors")
    (tmp_path / ".hidden.safetensors.partial").write_bytes(b"junk")
    (tmp_path / ".hidden.safetensors").write_bytes(b"junk")
    ckpt = open_checkpoint(tmp_path)
    assert [p.name for p in ckpt.weight_files] == ["part-a.safetensors", "part-b.safetensors"]
    assert ckpt.config is None
    assert set(ckpt.tensors) == set(a) | set(b)
    with TensorReader() as reader:
        for name, t in {**a, **b}.items():
            assert torch.equal(reader.read_tensor(ckpt.tensors[name]), t)


def test_tokenizer_files(tmp_path):
    names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "generation_config.json", "merges.txt", "vocab.json", "qwen.tiktoken"]
    for n in names:
        (tmp_path / n).write_text("{}")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.model").mkdir()  # a directory is not a tokenizer file
    found = tokenizer_files(tmp_path)
    assert sorted(p.name for p in found) == sorted(names)
    assert all(p.parent == tmp_path for p in found)
    assert tokenizer_files(tmp_path / "tokenizer.json") == found


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
def test_hub_id_is_refused_with_advice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for ref in ["meta-llama/Llama-3.1-8B", "gpt2", "org/model@main"]:
        with pytest.raises(CheckpointError, match="huggingface-cli download") as err:
            open_checkpoint(ref)
        assert ref in str(err.value)


def test_missing_local_path(tmp_path):
    for ref in [tmp_path / "nope", "./no/such/dir", "../x/../y", "~/definitely-not-here/m"]:
        with pytest.raises(CheckpointError, match="does not exist") as err:
            open_checkpoint(ref)
        assert str(ref) in str(err.value)


def test_pickle_only_directory(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="only safetensors checkpoints are supported") as e:
        open_checkpoint(tmp_path)
    assert "pytorch_model.bin" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(CheckpointError, match="only safetensors"):
        open_checkpoint(tmp_path / "pytorch_model.bin")


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model weights") as err:
        open_checkpoint(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_adapter_directory(tmp_path):
    safetensors.torch.save_file({"lora_A": torch.zeros(2)}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="LoRA adapter"):
        open_checkpoint(tmp_path)


def test_same_tensor_in_two_files(tmp_path):
    safetensors.torch.save_file({"w": torch.zeros(2), "a": torch.ones(1)}, tmp_path / "a.safetensors")
    safetensors.torch.save_file({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="'w' is stored twice") as err:
        open_checkpoint(tmp_path)
    assert "a.safetensors" in str(err.value) and "b.safetensors" in str(err.value)


def _sharded_copy(src: Path, dst: Path) -> dict:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return json.loads((dst / INDEX_NAME).read_text())


def test_index_names_a_missing_file(llama_dirs, tmp_path):
    d = tmp_path / "m"
    index = _sharded_copy(llama_dirs[1], d)
    victim = max(set(index["weight_map"].values()))
    (d / victim).unlink()
    with pytest.raises(CheckpointError, match="does not exist") as err:
        open_checkpoint(d)
    assert victim in str(err.value) and INDEX_NAME in str(err.value)


def test_index_names_a_tensor_missing_from_its_file(llama_dirs, tmp_path):
    d = tmp_path / "m"
    index = _sharded_copy(llama_dirs[1], d)
    index["weight_map"]["model.extra.weight"] = min(set(index["weight_map"].values()))
    (d / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'model.extra.weight'.*no such tensor"):
        open_checkpoint(d)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"metadata": {}}', "weight_map"),
    ('{"weight_map": {"a": 1}}', "weight_map"),
    ('{"weight_map": {"a": "../x.safetensors"}}', "outside the model directory"),
    ('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', "twice"),
])
def test_bad_index(tmp_path, content, message):
    (tmp_path / INDEX_NAME).write_text(content)
    with pytest.raises(CheckpointError, match=message) as err:
        open_checkpoint(tmp_path)
    assert INDEX_NAME in str(err.value)


def test_bad_config_and_bad_weights(tmp_path):
    safetensors.torch.save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="config.json.*not valid JSON"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "model.safetensors").write_bytes(b"\x10" + bytes(7) + b"{}")
    with pytest.raises(SafetensorsError, match="model.safetensors"):
        open_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------
# MODEL+ADAPTER references
# ------------------------------------------------------------------------------------------------
def test_split_model_ref(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert split_model_ref("org/model") == ("org/model", None)
    assert split_model_ref("org/model+org/lora") == ("org/model", "org/lora")
    assert split_model_ref(tmp_path / "base") == (str(tmp_path / "base"), None)

    plus = tmp_path / "model+v2"  # an existing path with '+' is never split
    plus.mkdir()
    assert split_model_ref(str(plus)) == (str(plus), None)
    assert split_model_ref(f"{plus}+adapters/x+y") == (str(plus), "adapters/x+y")
    (tmp_path / "lora+1").mkdir()
    assert split_model_ref("base/a+b+lora+1") == ("base/a+b", "lora+1")
    with pytest.raises(CheckpointError, match="ambiguous"):
        split_model_ref("a+b+c")
    for bad in ["+lora", "model+"]:
        with pytest.raises(CheckpointError, match="both"):
            split_model_ref(bad)
    assert os.getcwd() == str(tmp_path)


def test_index_is_authoritative_over_headers(tmp_path, caplog):
    """Tensors the index does not name, or names in another file, are not taken from a file."""
    safetensors.torch.save_file({"w": torch.zeros(2), "x": torch.ones(3), "z": torch.ones(1)},
                                tmp_path / "a.safetensors")
    safetensors.torch.save_file({"w": torch.full((2,), 7.0), "y": torch.ones(4)},
                                tmp_path / "b.safetensors")
    weight_map = {"w": "b.safetensors", "x": "a.safetensors", "y": "b.safetensors"}
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    with caplog.at_level("WARNING"):
        ckpt = open_checkpoint(tmp_path)
    assert {n: i.file.name for n, i in ckpt.tensors.items()} == weight_map
    assert "'z'" in caplog.text
    with TensorReader() as reader:
        assert torch.equal(reader.read_tensor(ckpt.tensors["w"]), torch.full((2,), 7.0))
