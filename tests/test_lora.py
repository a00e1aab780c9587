"""LoRA adapters applied on the fly, against PEFT's own ``merge_and_unload``.

The reference is PEFT itself: the base model loaded in float64, the adapter loaded with
``PeftModel.from_pretrained`` and merged with ``merge_and_unload`` (an exact float64 merge),
then rounded to the base's dtype. mergecore's result must be within 1 ulp of it everywhere
and identical on at least 99.9% of the elements (docs/semantics.md, "Tolerances", LoRA).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mergecore.config import ConfigError, load_merge
from mergecore.lora import AdapterError, LoraAdapter, apply_lora
from mergecore.merge import MergeOptions, run_merge
from mergecore.synthetic import make_family, make_lora_adapter
from mergecore.testing.mergekit_harness import load_state, ulp_diff

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LLAMA_FULL = {"r": 4, "alpha": 8,
              "target_modules": ("q_proj", "v_proj", "down_proj", "embed_tokens"),
              "rank_pattern": {"layers.1.self_attn.q_proj": 2, "down_proj": 6},
              "alpha_pattern": {"v_proj": 3.0}, "modules_to_save": ("lm_head",), "seed": 1}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base, ft1, ft2 = make_family(root / "llama", n_models=3, layers=2, hidden=32, vocab=128,
                                 dtype="bfloat16", seed=3)
    (fp32,) = make_family(root / "llama32", n_models=1, layers=2, hidden=32, vocab=128,
                          dtype="float32", seed=7)
    (gpt2,) = make_family(root / "gpt2", arch="gpt2", n_models=1, layers=2, hidden=32,
                          vocab=128, dtype="bfloat16", seed=4)
    return {
        "base": base, "ft1": ft1, "ft2": ft2, "gpt2": gpt2, "fp32": fp32,
        "full32": make_lora_adapter(fp32, root / "ad-full32", **LLAMA_FULL),
        "plain": make_lora_adapter(base, root / "ad-plain", seed=2),
        "full": make_lora_adapter(base, root / "ad-full", **LLAMA_FULL),
        "rslora": make_lora_adapter(base, root / "ad-rslora", r=8, alpha=4, use_rslora=True,
                                    target_modules=("k_proj", "o_proj", "up_proj"), seed=5),
        "gpt2_ad": make_lora_adapter(gpt2, root / "ad-gpt2", r=4, alpha=16,
                                     target_modules=("c_attn", "c_proj", "c_fc"), seed=6),
        "root": root,
    }


def peft_merged(model_dir: Path, adapter_dir: Path, dtype: torch.dtype | None = None
                ) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload of the adapter into the model, loaded as ``dtype``."""
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, cfg.architectures[0])
    model = cls.from_pretrained(model_dir, dtype=dtype) if dtype else cls.from_pretrained(model_dir)
    merged = peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def assert_lora_tolerance(ours: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """docs/semantics.md: every element within 1 ulp, at least 99.9% identical."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, name
    d = ulp_diff(ours, ref)
    assert int(d.max()) <= 1, f"{name}: {int(d.max())} ulp"
    assert float((d == 0).double().mean()) >= 0.999, f"{name}: {(d != 0).sum()} differ"


@pytest.mark.parametrize("model,adapter", [("base", "plain"), ("base", "full"),
                                           ("ft1", "rslora"), ("gpt2", "gpt2_ad")])
def test_apply_lora_matches_peft_merge_and_unload(models, model, adapter):
    state = load_state(models[model])
    ours = apply_lora(state, models[adapter])
    ref64 = peft_merged(models[model], models[adapter], torch.float64)
    changed = 0
    for name, tensor in state.items():
        if name not in ref64:  # GPT-2's tied lm_head is not in the checkpoint
            continue
        ref = ref64[name].to(tensor.dtype)
        assert_lora_tolerance(ours[name], ref, name)
        changed += not torch.equal(ours[name], tensor)
    with LoraAdapter(models[adapter]) as ad:
        assert changed == len(ad.edits) > 0  # every targeted tensor really changed


def test_fp32_model_gets_the_bits_of_peft_merge_and_unload(models):
    """In float32 PEFT adds ``(B @ A) * s`` to ``W`` with the same float32 operations in the
    same order, so the results are identical, not merely close."""
    state = load_state(models["fp32"])
    ours = apply_lora(state, models["full32"])
    theirs = peft_merged(models["fp32"], models["full32"])
    for name in state:
        assert torch.equal(ours[name], theirs[name]), name


def test_lora_bias_and_saved_biases_match_peft(models, tmp_path):
    """``lora_bias`` (a bias on B, added as ``s * b``) and ``bias: lora_only`` (the targeted
    layers' biases saved in the adapter, replacing the base's), on GPT-2 Conv1D layers."""
    model = transformers.GPT2LMHeadModel.from_pretrained(models["gpt2"])
    cfg = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["c_attn", "c_fc"],
                          fan_in_fan_out=True, lora_bias=True, bias="lora_only")
    pm = peft.get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(p + 0.02 * torch.randn(p.shape, generator=gen))
    pm.save_pretrained(tmp_path / "ad")
    state = load_state(models["gpt2"])
    ours = apply_lora(state, tmp_path / "ad")
    ref64 = peft_merged(models["gpt2"], tmp_path / "ad", torch.float64)
    with LoraAdapter(tmp_path / "ad") as ad:
        assert ad.edits["transformer.h.0.attn.c_attn.bias"].bias is not None
        assert ad.edits["transformer.h.0.attn.c_attn.bias"].replace is not None
    for name in state:
        if name in ref64:
            assert_lora_tolerance(ours[name], ref64[name].to(state[name].dtype), name)
    assert not torch.equal(ours["transformer.h.1.mlp.c_fc.bias"],
                           state["transformer.h.1.mlp.c_fc.bias"])


def test_full_adapter_covers_patterns_embedding_and_modules_to_save(models):
    with LoraAdapter(models["full"]) as ad:
        e = ad.edits
        assert e["model.embed_tokens.weight"].transpose and e["model.embed_tokens.weight"].lora_a
        assert e["lm_head.weight"].replace and e["lm_head.weight"].lora_a is None
        assert e["model.layers.1.self_attn.q_proj.weight"].scale == 8 / 2  # rank_pattern r=2
        assert e["model.layers.0.self_attn.q_proj.weight"].scale == 8 / 4
        assert e["model.layers.0.mlp.down_proj.weight"].scale == 8 / 6
        assert e["model.layers.0.self_attn.v_proj.weight"].scale == 3 / 4  # alpha_pattern
    with LoraAdapter(models["rslora"]) as ad:
        assert ad.edits["model.layers.0.self_attn.k_proj.weight"].scale == 4 / 8 ** 0.5
    with LoraAdapter(models["gpt2_ad"]) as ad:
        assert ad.settings.fan_in_fan_out
        assert all(e.transpose for e in ad.edits.values())


def test_update_of_the_common_vocabulary_rows_is_the_cut_full_update(models):
    state = load_state(models["base"])
    with LoraAdapter(models["full"]) as ad:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            full = ad.apply(name, state[name])
            cut = ad.apply(name, state[name][:100])
            # the same bits: the low-rank product is formed at full shape, then cut
            assert torch.equal(cut, full[:100])


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip-bin", "legacy-bin"])
def test_bin_adapter_gives_the_same_result(models, tmp_path, zipfile):
    """adapter_model.bin in torch's zip format (memory-mapped) or its legacy format (which
    mmap cannot map; PEFT loads it, so does mergecore)."""
    from safetensors.torch import load_file

    src = models["full"]
    dst = tmp_path / "ad-bin"
    dst.mkdir()
    shutil.copy(src / "adapter_config.json", dst)
    torch.save(load_file(str(src / "adapter_model.safetensors")), dst / "adapter_model.bin",
               _use_new_zipfile_serialization=zipfile)
    state = load_state(models["base"])
    a, b = apply_lora(state, src), apply_lora(state, dst)
    assert all(torch.equal(a[k], b[k]) for k in state)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq"])
def test_an_adapter_whose_init_changes_the_base_is_refused_naming_the_key(init):
    from mergecore.lora.settings import AdapterConfigError, parse_settings

    with pytest.raises(AdapterConfigError, match=f"init_lora_weights = '{init}'.*convert"):
        parse_settings({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                        "init_lora_weights": init}, "cfg")
    for harmless in (True, False, "gaussian", "eva", "orthogonal"):
        parse_settings({"r": 4, "lora_alpha": 8, "init_lora_weights": harmless}, "cfg")


def test_r_and_lora_alpha_left_out_take_peft_defaults():
    from mergecore.lora.settings import parse_settings

    settings = parse_settings({"peft_type": "LORA", "r": 4}, "cfg")
    assert settings.lora_alpha == 8 and settings.scale("q_proj") == 2.0
    assert parse_settings({"peft_type": "LORA"}, "cfg").r == 8


# ----- through `mergecore merge` ----------------------------------------------------------------


def _merge(cfg: dict, out: Path, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    run_merge(path, out, MergeOptions(quiet=True))
    return out


def test_ties_with_an_adapter_input_equals_ties_with_the_peft_merged_model(models, tmp_path):
    """The on-the-fly LoRA input gives the same bits as first writing PEFT's merged model."""
    base, ft1, ft2 = models["base"], models["ft1"], models["ft2"]
    cls = transformers.LlamaForCausalLM
    merged = peft.PeftModel.from_pretrained(cls.from_pretrained(ft1), str(models["plain"]))
    merged.merge_and_unload().save_pretrained(tmp_path / "ft1-merged")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ft1 / f, tmp_path / "ft1-merged")

    def cfg(ft1_ref: str) -> dict:
        return {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
                "out_dtype": "bfloat16", "parameters": {"normalize": True},
                "models": [{"model": ft1_ref, "parameters": {"weight": 0.7, "density": 0.5}},
                           {"model": str(ft2), "parameters": {"weight": 0.5, "density": 0.4}}]}

    fly = load_state(_merge(cfg(f"{ft1}+{models['plain']}"), tmp_path / "fly", tmp_path / "a.yml"))
    disk = load_state(_merge(cfg(str(tmp_path / "ft1-merged")), tmp_path / "disk",
                             tmp_path / "b.yml"))
    plain = load_state(_merge(cfg(str(ft1)), tmp_path / "plain", tmp_path / "c.yml"))
    assert fly.keys() == disk.keys()
    for name in fly:
        assert torch.equal(fly[name], disk[name]), name
    assert not torch.equal(fly["model.layers.0.self_attn.q_proj.weight"],
                           plain["model.layers.0.self_attn.q_proj.weight"])


def test_same_model_with_and_without_adapter_in_one_linear_merge(models, tmp_path):
    """The plain input and the adapter input share the base's bytes; the update must not
    leak into the plain one. linear 0.5/0.5 of W and W' is (W + W') / 2."""
    base, ad = models["base"], models["full"]
    cfg = {"merge_method": "linear", "dtype": "float32", "out_dtype": "float32",
           "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                      {"model": f"{base}+{ad}", "parameters": {"weight": 0.5}}]}
    out = load_state(_merge(cfg, tmp_path / "out", tmp_path / "c.yml"))
    state = load_state(base)
    with_ad = apply_lora(state, ad)
    for name, w in state.items():
        expect = ((w.double() + with_ad[name].double()) / 2).float()
        assert ulp_diff(out[name], expect).max() <= 1, name


@requires_cuda
def test_adapter_input_on_cuda_matches_cpu(models, tmp_path):
    """On the GPU the update is computed on the device (after the copy of its factors)."""
    cfg = {"merge_method": "linear", "dtype": "float32", "out_dtype": "bfloat16",
           "models": [{"model": f"{models['base']}+{models['full']}",
                       "parameters": {"weight": 0.6}},
                      {"model": str(models["ft2"]), "parameters": {"weight": 0.4}}]}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    run_merge(path, tmp_path / "cpu", MergeOptions(quiet=True))
    run_merge(path, tmp_path / "cuda", MergeOptions(quiet=True, device="cuda"))
    cpu, gpu = load_state(tmp_path / "cpu"), load_state(tmp_path / "cuda")
    for name in cpu:
        assert_lora_tolerance(gpu[name], cpu[name], name)


# ----- validation -------------------------------------------------------------------------------


def _adapter_copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    cfg_path = dst / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(config_changes)
    cfg_path.write_text(json.dumps(cfg))
    return dst


def _problems(model: Path, adapter: Path, tmp_path: Path) -> str:
    cfg = {"merge_method": "linear", "models": [
        {"model": f"{model}+{adapter}", "parameters": {"weight": 1.0}}]}
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as exc:
        load_merge(path)
    return str(exc.value)


@pytest.mark.parametrize("change,needle", [
    ({"use_dora": True}, "use_dora"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
    ({"some_future_feature": {"on": 1}}, "some_future_feature"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"r": 8}, "rank 4"),
    ({"rank_pattern": {"q_proj": 3}}, "r = 3"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
])
def test_bad_adapter_config_is_reported_with_adapter_and_key(models, tmp_path, change, needle):
    bad = _adapter_copy(models["plain"], tmp_path / "bad", **change)
    message = _problems(models["base"], bad, tmp_path)
    assert str(bad) in message and needle in message


def test_unknown_key_that_is_off_is_accepted(models, tmp_path):
    ok = _adapter_copy(models["plain"], tmp_path / "ok", some_future_feature=None)
    with LoraAdapter(ok) as ad:
        assert ad.edits


def test_adapter_for_another_model_is_refused_before_reading(models, tmp_path):
    other = make_family(tmp_path / "wide", n_models=1, layers=2, hidden=48, vocab=128)[0]
    message = _problems(other, models["plain"], tmp_path)
    assert "lora_A.weight" in message and "has shape" in message
    message = _problems(models["gpt2"], models["plain"], tmp_path)
    assert "does not have" in message and "q_proj" in message


def test_missing_adapter_files(models, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "adapter_config.json is missing" in _problems(models["base"], empty, tmp_path)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(models["plain"] / "adapter_config.json", no_weights)
    assert "no weights" in _problems(models["base"], no_weights, tmp_path)
    with pytest.raises(AdapterError, match="no such directory"):
        LoraAdapter(tmp_path / "nowhere")


def test_cli_refuses_a_bad_adapter_and_writes_nothing(models, tmp_path):
    bad = _adapter_copy(models["plain"], tmp_path / "bad", use_dora=True)
    cfg = {"merge_method": "ties", "base_model": str(models["base"]),
           "models": [{"model": f"{models['ft1']}+{bad}",
                       "parameters": {"weight": 1.0, "density": 0.5}}]}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "mergecore", "merge", str(path),
                           str(tmp_path / "out")], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "use_dora" in proc.stderr and str(bad) in proc.stderr
    assert not (tmp_path / "out").exists()


def test_adapter_on_a_model_with_a_larger_vocabulary(models, tmp_path):
    """The update is cut to the common rows in a mergekit-style merge, and kept whole where a
    BlockMerge document keeps model 1's vocabulary."""
    big, small = make_family(tmp_path / "fam", n_models=2, layers=2, hidden=32,
                             vocab_sizes=[136, 128], dtype="float32", seed=8)
    ad = make_lora_adapter(big, tmp_path / "ad", **LLAMA_FULL)
    with_ad = apply_lora(load_state(big), ad)
    other = load_state(small)
    cfg = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": str(small),
           "models": [{"model": f"{big}+{ad}", "parameters": {"weight": 0.5}},
                      {"model": str(small), "parameters": {"weight": 0.5}}]}
    out = load_state(_merge(cfg, tmp_path / "common", tmp_path / "a.yml"))
    blend = {"model_path1": f"{big}+{ad}", "model_path2": str(small), "out_dtype": "float32",
             "operations": [{"operation": "all", "gradient_values": [0.5]}]}
    kept = load_state(_merge(blend, tmp_path / "first", tmp_path / "b.yml"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        n = other[name].shape[0]
        expect = ((with_ad[name][:n].double() + other[name].double()) / 2).float()
        assert out[name].shape[0] == n and ulp_diff(out[name], expect).max() <= 1, name
        assert kept[name].shape[0] == 136 and ulp_diff(kept[name][:n], expect).max() <= 1
        assert torch.equal(kept[name][n:], with_ad[name][n:]), name
