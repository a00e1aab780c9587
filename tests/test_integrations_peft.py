"""mergecore.integrations.peft against peft.utils.merge_utils, and inside add_weighted_adapter.

Deterministic functions agree within 1 ulp (fp32 compute in both); magnitude pruning keeps the
same sets, up to which members of a group of equal magnitudes at the threshold are kept (the
kept magnitudes are then identical as multisets). DARE masks are random in both (different
generators), so DARE is compared by its statistics.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

pytest.importorskip("peft")

from peft.utils import merge_utils

import mergecore.integrations.peft as mp
from mergecore.testing.mergekit_harness import ulp_diff

SHAPES = ((37, 53), (1001,), (3, 4, 9))
WEIGHTS = torch.tensor([0.7, -0.3, 1.2])


def _tensors(shape, dtype, n=3):
    return [torch.randn(shape).to(dtype) for _ in range(n)]


def test_same_signatures_as_peft():
    for name in mp.FUNCTIONS:
        assert inspect.signature(getattr(mp, name), eval_str=True) == inspect.signature(
            getattr(merge_utils, name)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [("task_arithmetic", ()), ("magnitude_prune", (0.4,)),
                                  ("ties", (0.4,)), ("ties", (0.25, "frequency")),
                                  ("ties", (1.0,))], ids=str)
def test_deterministic_functions_match_peft(case, dtype):
    name, extra = case
    for shape in SHAPES:
        tensors = _tensors(shape, dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = getattr(merge_utils, name)(tensors, WEIGHTS, *extra)
            ours = getattr(mp, name)(tensors, WEIGHTS, *extra)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        close = float((ulp_diff(ours, theirs) <= 1).double().mean())
        # fp32 values have no magnitude ties: identical sets; bf16/fp16 ties at the threshold
        # are kept by index in mergecore and arbitrarily by torch.topk
        assert close >= (1.0 if dtype == torch.float32 else 0.98), (name, shape, close)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_magnitude_pruning_keeps_the_same_sets(dtype):
    one = torch.ones(1)
    for density in (0.01, 0.3, 0.77):
        for shape in SHAPES:
            (t,) = _tensors(shape, dtype, 1)
            theirs = merge_utils.magnitude_prune([t], one, density)
            ours = mp.magnitude_prune([t], one, density)
            kept_theirs, kept_ours = theirs != 0, ours != 0
            assert int(kept_ours.sum()) == int(kept_theirs.sum()) == int(density * t.numel())
            if dtype == torch.float32:
                assert torch.equal(kept_ours, kept_theirs)
            else:  # the same magnitudes kept, equal ones possibly at other indices
                assert torch.equal(ours[kept_ours].abs().sort().values,
                                   theirs[kept_theirs].abs().sort().values)
                assert torch.equal(t.float()[kept_ours].abs().sort().values,
                                   t.float()[kept_theirs].abs().sort().values)


def test_edge_densities_follow_peft():
    tensors = _tensors((5, 3), torch.float32)
    for density in (0.0, 0.05):  # keeps int(density * 15) == 0 entries: zeros
        assert torch.equal(mp.magnitude_prune(tensors, WEIGHTS, density),
                           merge_utils.magnitude_prune(tensors, WEIGHTS, density))
    with pytest.warns(UserWarning):
        full = mp.dare_linear(tensors, WEIGHTS, 1.0)
    assert torch.allclose(full, merge_utils.task_arithmetic(tensors, WEIGHTS))
    with pytest.raises(ValueError, match="density"):
        mp.ties(tensors, WEIGHTS, -0.1)
    with pytest.raises(ValueError, match="divides by 0"):
        mp.dare_ties(tensors, WEIGHTS, 0.0)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_statistics_match_peft(name):
    """Both keep each entry with probability density and rescale by 1/density: the share of
    non-zero outputs, the mean |output| and the mean output agree; one model with weight 1 gives
    exactly t / density on the kept entries."""
    tensors = _tensors((256, 256), torch.float32)
    stats = []
    for impl in (getattr(merge_utils, name), getattr(mp, name)):
        out = impl(tensors, WEIGHTS, 0.4)
        stats.append((float((out != 0).double().mean()), float(out.abs().double().mean()),
                      float(out.double().mean())))
    (nz_a, mag_a, mean_a), (nz_b, mag_b, mean_b) = stats
    assert nz_b == pytest.approx(nz_a, abs=0.01)
    assert mag_b == pytest.approx(mag_a, rel=0.03)
    assert abs(mean_b - mean_a) < 0.03 * mag_a
    (t,) = _tensors((300, 301), torch.float32, 1)
    out = getattr(mp, name)([t], torch.ones(1), 0.4)
    kept = out != 0
    assert float(kept.double().mean()) == pytest.approx(0.4, abs=0.01)
    assert torch.allclose(out[kept], t[kept] / 0.4, rtol=2e-7, atol=0)


def test_dare_is_reproducible_under_torch_manual_seed():
    tensors = _tensors((64, 32), torch.float32)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(mp.dare_ties(tensors, WEIGHTS, 0.5))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


# ----- add_weighted_adapter on a small real PEFT model -----------------------------------------


def _peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                      init_lora_weights=False)
    peft_model = get_peft_model(model, lora, adapter_name="a")
    peft_model.add_adapter("b", LoraConfig(r=4, lora_alpha=16,
                                           target_modules=["q_proj", "v_proj", "up_proj"],
                                           init_lora_weights=False))
    return peft_model


def _adapter_state(model, adapter):
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if f".{adapter}." in k and "lora_" in k}


@pytest.mark.parametrize("combination", ["linear", "ties", "magnitude_prune", "ties_svd"])
def test_add_weighted_adapter_one_line_change(combination):
    model = _peft_model()
    kwargs = {"combination_type": combination, "density": 0.5}
    model.add_weighted_adapter(["a", "b"], [0.7, 0.4], "peft_merged", **kwargs)
    with mp.using_mergecore() as replaced:
        model.add_weighted_adapter(["a", "b"], [0.7, 0.4], "mergecore_merged", **kwargs)
    assert "peft.tuners.lora.model.ties" in replaced
    theirs = _adapter_state(model, "peft_merged")
    ours = _adapter_state(model, "mergecore_merged")
    assert len(theirs) == len(ours) == 2 * 3 * 2  # A and B of 3 modules in 2 layers
    for key, value in theirs.items():
        mine = ours[key.replace("peft_merged", "mergecore_merged")]
        assert torch.allclose(mine, value, rtol=1e-5, atol=1e-6), key
    # PEFT's own functions are back
    from peft.tuners.lora import model as lora_model

    assert lora_model.ties is merge_utils.ties and merge_utils.ties.__module__.startswith("peft")


def test_add_weighted_adapter_dare_uses_mergecore_stream():
    model = _peft_model()
    merged = []
    for run in range(2):
        torch.manual_seed(11)
        with mp.using_mergecore():
            model.add_weighted_adapter(["a", "b"], [0.7, 0.4], f"dare{run}",
                                       combination_type="dare_ties", density=0.5)
        merged.append(_adapter_state(model, f"dare{run}"))
    for key, value in merged[0].items():
        assert torch.equal(value, merged[1][key.replace("dare0", "dare1")])


def test_clear_error_without_peft():
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name == "peft" or name.startswith("peft."):
                    raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
        sys.meta_path.insert(0, Blocker())
        import mergecore
        from mergecore.integrations import MissingIntegrationError
        try:
            import mergecore.integrations.peft
        except MissingIntegrationError as exc:
            print(exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert "mergecore.integrations.peft needs peft >=0.10,<1.0" in proc.stdout
