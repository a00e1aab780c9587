"""The reference backend against docs/semantics.md's edge cases and against mergekit 0.1.5."""

from __future__ import annotations

import math

import pytest
import torch

import mergecore
from mergecore.backends import reference
from mergecore.errors import MergeError, NonFiniteError
from mergecore.methods import slerp_coefficients
from mergecore.numerics import within_ulp_share

merge_tensors = pytest.importorskip("mergekit.merge_methods.api").merge_tensors


@pytest.fixture(autouse=True)
def _reference_only(monkeypatch):
    monkeypatch.setenv("MERGECORE_BACKEND", "reference")


def family(shape=(96, 67), n=3, dtype=torch.bfloat16, noise=0.02):
    base = torch.randn(shape)
    xs = [base + noise * torch.randn(shape) * torch.rand(shape) for _ in range(n)]
    return base.to(dtype), [x.to(dtype) for x in xs]


# ----- slerp edge cases -------------------------------------------------------------------


def test_slerp_zero_tensor_takes_the_slerp_branch_with_theta_half_pi():
    a = torch.zeros(10, dtype=torch.float32)
    b = torch.randn(10)
    t = 0.3
    s0, s1 = slerp_coefficients(0.0, float(b @ b), 0.0, t)
    assert s0 == pytest.approx(math.sin(0.7 * math.pi / 2))
    assert s1 == pytest.approx(math.sin(0.3 * math.pi / 2))
    out = mergecore.slerp(a, b, t)
    torch.testing.assert_close(out, (s1 * b.double()).float())


def test_slerp_identical_and_antiparallel_take_the_lerp_branch():
    a = torch.randn(1000)
    assert slerp_coefficients(1.0, 1.0, 1.0, 0.25) == (0.75, 0.25)
    assert slerp_coefficients(1.0, 1.0, -1.0, 0.25) == (0.75, 0.25)
    torch.testing.assert_close(mergecore.slerp(a, a, 0.4), a)
    torch.testing.assert_close(mergecore.slerp(a, -a, 0.25), (0.75 * a.double() - 0.25 * a.double()).float())


def test_slerp_t0_gives_base_and_t_outside_unit_interval_extrapolates():
    a, (b,) = family(n=1, dtype=torch.float32, noise=1.0)
    torch.testing.assert_close(mergecore.slerp(a, b, 0.0), a)
    a64, b64 = a.double(), b.double()
    _s0, s1 = slerp_coefficients(float((a64 * a64).sum()), float((b64 * b64).sum()),
                                float((a64 * b64).sum()), 1.5)
    assert s1 > 1.0  # extrapolation, no clamping
    # the merge itself extrapolates: sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b
    # over the flattened tensors, computed here in float64 from the angle
    cos = float((a64 * b64).sum() / (a64.norm() * b64.norm()))
    theta = math.acos(cos)
    want = (math.sin(-0.5 * theta) * a64 + math.sin(1.5 * theta) * b64) / math.sin(theta)
    for backend in ("reference", "cpu"):
        job = mergecore.make_job("slerp", a, [b], t=1.5)
        (out,) = mergecore.merge_many([job], backend=backend)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


# ----- trimming edge cases ----------------------------------------------------------------


def test_ties_density_zero_or_tiny_is_an_error_naming_the_tensor():
    base, xs = family(shape=(10,))
    with pytest.raises(MergeError, match="model.norm.weight"):
        mergecore.ties(base, xs, [1, 1, 1], 0.0, name="model.norm.weight")
    with pytest.raises(MergeError, match="k = int"):
        mergecore.ties(base, xs, [1, 1, 1], 0.05, name="model.norm.weight")


def test_ties_density_one_keeps_everything():
    """Density 1 trims nothing: every delta entry is kept (the kept sets are all-true) and
    the result is the sign-elected disjoint mean of the untrimmed deltas."""
    base, xs = family()
    job = mergecore.make_job("ties", base, xs, weights=[1.0, 1.0, 1.0], densities=1.0)
    for i in range(len(xs)):
        mask = reference.keep_mask(job, i)  # None: nothing trimmed
        assert mask is None or bool(mask.all())
    b = base.double()
    d = torch.stack([x.double() - b for x in xs])
    sign = torch.where(d.sum(0) >= 0, 1.0, -1.0)
    agree = (d.sign() == sign) & (d != 0)
    count = agree.sum(0)
    merged = b + torch.where(count > 0, (d * agree).sum(0) / count.clamp(min=1), 0.0)
    out = mergecore.ties(base, xs, [1.0, 1.0, 1.0], 1.0, out_dtype=torch.float64)
    assert torch.allclose(out, merged, rtol=1e-6, atol=1e-6)


def test_all_zero_deltas_give_the_base():
    base, _ = family()
    for method in ("ties", "dare_ties", "breadcrumbs", "task_arithmetic"):
        args = [[1.0, 0.5], 0.5] if method != "task_arithmetic" else [[1.0, 0.5]]
        out = getattr(mergecore, method)(base, [base.clone(), base.clone()], *args)
        assert torch.equal(out, base), method


def test_ties_keeps_exactly_k_with_lowest_index_tie_break():
    base = torch.zeros(10)
    x = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.5, 3.0, 0.1, 0.2, 0.3])
    job = mergecore.make_job("ties", base, [x], weights=[1.0], densities=0.3)
    keep = reference.keep_mask(job, 0)
    assert keep.tolist() == [False, True, True, False, True] + [False] * 5


def test_breadcrumbs_with_gamma_rounding_to_zero_drops_nothing_from_the_top():
    base = torch.zeros(50)
    x = torch.arange(1, 51, dtype=torch.float32)
    job = mergecore.make_job("breadcrumbs", base, [x], weights=[1.0], densities=0.2, gammas=0.01)
    keep = reference.keep_mask(job, 0)
    assert keep.sum() == 10 and keep[-10:].all()  # int(0.01*50) = 0 dropped from the top


def test_nan_input_is_a_clear_error():
    base, xs = family()
    xs[1] = xs[1].clone()
    xs[1].view(-1)[5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"'layers.3.w'.*tensors\[1\] has 1 NaN"):
        mergecore.task_arithmetic(base, xs, [1, 1, 1], name="layers.3.w")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "breadcrumbs_ties"])
def test_nan_input_of_a_sparsifying_merge_is_an_error_even_when_the_output_is_finite(
        method, backend, monkeypatch):
    """A NaN delta entry has the largest magnitude key: breadcrumbs trims it, TIES keeps it
    but it never agrees with the elected sign, DARE may drop it; the merge alone would hide it."""
    monkeypatch.setenv("MERGECORE_BACKEND", backend)
    base, xs = family()
    xs[1] = xs[1].clone()
    xs[1].view(-1)[7] = float("nan")
    params = {"densities": 0.5, "seed": 1} if method == "dare_ties" else {"densities": 0.5}
    job = mergecore.make_job(method, base, xs, weights=[1, 1, 1], name="layers.3.w", **params)
    with pytest.raises(NonFiniteError, match=r"'layers.3.w'.*tensors\[1\] has 1 NaN"):
        mergecore.merge_many([job])


def test_linear_zero_weight_sum_with_normalize_is_an_error():
    _, xs = family()
    with pytest.raises(MergeError, match="weight sum"):
        mergecore.linear(xs[:2], [1.0, -1.0])


def test_dare_mask_is_keyed_by_seed_name_and_model_only():
    n = 5000
    base, xs = family(shape=(n,), n=2)
    a = mergecore.dare_linear(base, xs, [1, 1], 0.5, seed=3, name="w")
    b = mergecore.batched("dare_linear", [base, base], [xs, xs], weights=[1.0, 1.0],
                          densities=0.5, seed=3, names=["other", "w"])[1]
    assert torch.equal(a, b)
    c = mergecore.dare_linear(base, xs, [1, 1], 0.5, seed=4, name="w")
    assert not torch.equal(a, c)
    keep = reference.dare_keep_mask(n, 0.5, 3, "w", 0)
    assert abs(keep.mean() - 0.5) < 0.03


# ----- against mergekit 0.1.5's own functions ----------------------------------------------

MERGEKIT_CASES = [
    ("linear", {"weight": [0.6, 0.4, 0.3]}, 0.999),
    ("task_arithmetic", {"weight": [0.6, 0.4], "lambda": 0.8}, 0.999),
    ("ties", {"weight": [1.0, 0.5], "density": [0.5, 0.3]}, 0.95),
    ("ties", {"weight": [1.0, 0.5], "density": [0.5, 0.3], "normalize": False}, 0.95),
    ("breadcrumbs", {"weight": [1.0, 0.5], "density": [0.6, 0.4], "gamma": 0.02}, 0.95),
    ("breadcrumbs_ties", {"weight": [1.0, 0.5], "density": [0.6, 0.4], "gamma": 0.02}, 0.95),
    ("slerp", {"t": 0.35}, 0.999),
]


@pytest.mark.parametrize("method,params,share", MERGEKIT_CASES, ids=lambda v: str(v)[:40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_reference_matches_mergekit_functions(method, params, share, dtype):
    # Fine-tune deltas of ~0.1-0.5% of the weights, as in real fine-tunes: mergekit rounds every
    # intermediate to the input dtype, so larger relative deltas move more entries past 1 ulp.
    base, xs = family(n=3 if method == "linear" else 2, dtype=dtype, noise=0.005)
    if method == "slerp":
        xs = xs[:1]
    inputs = ([] if method == "linear" else [base]) + xs
    theirs = merge_tensors(inputs, method, parameters=params,
                           base_index=None if method == "linear" else 0)
    ours_kwargs = {}
    if method == "slerp":
        ours = mergecore.slerp(base, xs[0], params["t"])
    else:
        ours_kwargs = {"weights": params["weight"]}
        if "density" in params:
            ours_kwargs["densities"] = params["density"]
        if "gamma" in params:
            ours_kwargs["gammas"] = params["gamma"]
        if "lambda" in params:
            ours_kwargs["lambda_"] = params["lambda"]
        if "normalize" in params:
            ours_kwargs["normalize"] = params["normalize"]
        job = mergecore.make_job(method, None if method == "linear" else base, xs, **ours_kwargs)
        ours = mergecore.merge_many([job])[0]
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    # bf16/fp16: docs/semantics.md's 1-ulp shares. fp32: mergekit's own fp32 arithmetic (several
    # roundings in another order) lands a few fp32 ulp from the correctly rounded result.
    n_ulp = 4 if dtype == torch.float32 else 1
    assert within_ulp_share(ours, theirs, n_ulp) >= share


def test_dare_statistics_match_mergekit():
    """DARE masks differ by design (mergekit uses torch.bernoulli): compare statistics."""
    base, xs = family(shape=(256, 256), n=2, dtype=torch.float32)
    params = {"weight": [1.0, 1.0], "density": [0.3, 0.3]}
    theirs = merge_tensors([base] + xs, "dare_linear", parameters=params, base_index=0)
    ours = mergecore.dare_linear(base, xs, [1.0, 1.0], 0.3, seed=1)
    d_theirs, d_ours = (theirs - base), (ours - base)
    assert float((d_ours != 0).float().mean()) == pytest.approx(
        float((d_theirs != 0).float().mean()), abs=0.02)
    assert float(d_ours.abs().sum()) == pytest.approx(float(d_theirs.abs().sum()), rel=0.03)
