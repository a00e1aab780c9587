"""Every merge method x backend x dtype against the float64 reference backend.

Outputs are poisoned with NaN before each call; kept sets (TIES, breadcrumbs, DARE) must be
identical to the reference; values within the docs/semantics.md tolerances.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mergecore
from mergecore import MergeError, composed, dispatch
from mergecore.backends import reference
from mergecore.backends.spec import KeepAll, KeepBand, KeepRandom, KeepTop
from mergecore.numerics import ulp_diff, within_ulp_share
from mergecore.ops import make_job, merge_many

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
METHOD_ARGS = {
    "linear": {"weights": [0.7, 0.5, -0.2]},
    "task_arithmetic": {"weights": [0.7, 0.5, 0.3], "lambda_": 0.9},
    "ties": {"weights": [1.0, 0.6, 0.3], "densities": [0.5, 0.3, 0.9]},
    "dare_linear": {"weights": [1.0, 0.5, 0.5], "densities": [0.5, 0.7, 0.2], "seed": 7},
    "dare_ties": {"weights": [1.0, 0.5, 0.5], "densities": [0.5, 0.7, 0.2], "seed": 7},
    "breadcrumbs": {"weights": [1.0, 0.5, 0.5], "densities": [0.5, 0.3, 0.8], "gammas": 0.05},
    "breadcrumbs_ties": {"weights": [1.0, 0.5, 0.5], "densities": [0.5, 0.3, 0.8], "gammas": 0.05},
    "slerp": {"t": 0.3},
    "passthrough": {"scale": 0.5},
}
CPU_SHAPES = [(1,), (5, 123, 123), (7919,), (64, 33)]
TRITON_SHAPES = [(1,), (5, 12, 13), (1009,)]


def _backend_available(name: str) -> bool:
    return dispatch.load_backend(name) is not None


def make_inputs(shape, dtype, n_models, *, duplicates=False):
    """A base and fine-tunes with deltas of varied scale; bf16-rounded values repeat often."""
    base = torch.randn(shape) * 0.5
    xs = []
    for i in range(n_models):
        scale = torch.rand(shape) ** 2 * 0.05 * (i + 1)
        delta = torch.randn(shape) * scale
        if duplicates:
            delta = torch.round(delta * 64) / 64  # many equal magnitudes -> ties at thresholds
        xs.append(base + delta)
    return base.to(dtype), [x.to(dtype) for x in xs]


def build_job(method, shape, dtype, out_dtype, *, duplicates=False):
    args = dict(METHOD_ARGS[method])
    n_models = 1 if method in ("slerp", "passthrough") else 3
    base, xs = make_inputs(shape, dtype, n_models, duplicates=duplicates)
    if method == "passthrough":
        return make_job(method, None, xs, out_dtype=out_dtype, name="w", **args)
    if method == "linear":
        return make_job(method, None, [base] + xs[:2], out_dtype=out_dtype, name="w", **args)
    if method in ("ties", "breadcrumbs", "breadcrumbs_ties") and shape == (1,):
        args["densities"] = 1.0  # k = int(p * 1) would be 0: an error (tested separately)
    return make_job(method, base, xs, out_dtype=out_dtype, name="model.layers.0.w", **args)


def near_rounding_ties(job) -> torch.Tensor:
    """Elements whose exact (float64) result lies within 2**-20 (relative) of a rounding
    boundary of the output dtype: fp32 kernels may legitimately round those either way
    (bf16 inputs and decimal weights often land exactly on a midpoint)."""
    exact = reference.merge_jobs([dataclasses.replace(job, out_dtype=torch.float64)])[0]
    eps = 2.0**-20
    return (exact * (1 + eps)).to(job.out_dtype) != (exact * (1 - eps)).to(job.out_dtype)


def fp32_error_bound(job, shape) -> torch.Tensor:
    """What fp32 arithmetic can promise: a few fp32 ulp of the sum of the operands' sizes.

    Where a result cancels (base + merged close to 0) this, not an ulp of the tiny result,
    bounds the error of any fp32 kernel."""
    inputs = ([job.base] if job.base is not None else []) + list(job.xs)
    scale = sum(t.double().abs() for t in inputs).reshape(shape) * 3
    return scale * 2.0**-22 + 1e-30


def assert_close_to_reference(job, got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got).all(), "unwritten (NaN-poisoned) or non-finite output"
    err = (got.double() - want.double()).abs()
    within_fp32 = err <= fp32_error_bound(job, got.shape)
    if got.dtype == torch.float32:
        assert bool(within_fp32.all()), f"max err {float(err.max())}"
        return
    diff = ulp_diff(got, want).reshape(got.shape)
    bad = (diff > 1) & ~within_fp32
    assert not bool(bad.any()), f"{int(bad.sum())} elements over 1 ulp, max {int(diff.max())}"
    clear = ~near_rounding_ties(job).reshape(-1)
    assert within_ulp_share(got.reshape(-1)[clear], want.reshape(-1)[clear], 0) >= 0.999


def backend_device(name: str) -> str:
    """Triton runs compiled on the GPU when there is one, else in its interpreter on the CPU."""
    return "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"


def on_device(job, device):
    """The same job with its input tensors on ``device``."""
    if device == "cpu":
        return job
    return dataclasses.replace(job, base=None if job.base is None else job.base.to(device),
                               xs=[x.to(device) for x in job.xs])


def run_backend(name, job):
    """Run one job on a backend (on its device) into a NaN-poisoned output."""
    device = backend_device(name)
    job = on_device(job, device)
    out = torch.full(job.base.shape if job.base is not None else job.xs[0].shape, float("nan"),
                     dtype=job.out_dtype, device=device)
    return merge_many([job], outs=[out], backend=name, check_finite=False)[0].cpu()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("method", list(METHOD_ARGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_method_matches_reference(backend, method, dtype):
    if not _backend_available(backend):
        pytest.fail(f"backend {backend} is not built/installed")
    shapes = CPU_SHAPES if backend == "cpu" else TRITON_SHAPES
    for shape in shapes:
        for out_dtype in (dtype, torch.bfloat16 if dtype != torch.bfloat16 else torch.float32):
            job = build_job(method, shape, dtype, out_dtype, duplicates=dtype == torch.float32)
            want = reference.merge_jobs([job])[0]
            got = run_backend(backend, job)
            assert_close_to_reference(job, got, want)


def _mask_tensor(mask, job, i):
    """Expand a primitive mask description into a bool tensor with the reference's rules."""
    n = job.numel
    if isinstance(mask, KeepAll):
        return None
    key = (job.xs[i].reshape(-1).float() - job.base.reshape(-1).float()).abs()
    key = key.view(torch.int32).long()
    idx = torch.arange(n)

    def top(ts):
        return (key > ts.threshold) | ((key == ts.threshold) & (idx < ts.cutoff))

    if isinstance(mask, KeepTop):
        return top(mask.top)
    if isinstance(mask, KeepBand):
        return top(mask.upper) & ~top(mask.drop)
    assert isinstance(mask, KeepRandom)
    return torch.from_numpy(reference.dare_keep_mask(n, job.densities[i], job.seed, job.name, i))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_kept_sets_identical_to_reference(backend, method, dtype):
    prims = dispatch.load_backend(backend)
    if prims is None:
        pytest.fail(f"backend {backend} is not built/installed")
    shape = (37, 41) if backend == "triton" else (301, 257)
    jobs = [build_job(method, shape, dtype, dtype, duplicates=True) for _ in range(2)]
    masks = composed._masks(prims, [on_device(j, backend_device(backend)) for j in jobs])
    for job, job_masks in zip(jobs, masks):
        for i, mask in enumerate(job_masks):
            want = reference.keep_mask(job, i)
            got = _mask_tensor(mask, job, i)
            if want is None:
                assert got is None
            else:
                assert torch.equal(got, want), f"{method} model {i}: kept sets differ"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_batched_mixed_sizes_and_methods(backend):
    if not _backend_available(backend):
        pytest.fail(f"backend {backend} is not built/installed")
    sizes = [(1,), (17,), (300,), (64, 9)] if backend == "triton" else [(1,), (17,), (4096,), (513, 77)]
    jobs = []
    for k, shape in enumerate(sizes * 2):
        method = ["slerp", "ties", "linear", "dare_linear", "breadcrumbs"][k % 5]
        if method == "ties" and shape == (1,):
            method = "task_arithmetic"
        jobs.append(build_job(method, shape, torch.bfloat16, torch.bfloat16))
    want = reference.merge_jobs(jobs)
    device = backend_device(backend)
    outs = [torch.full(w.shape, float("nan"), dtype=w.dtype, device=device) for w in want]
    got = merge_many([on_device(j, device) for j in jobs], outs=outs, backend=backend)
    for job, g, w in zip(jobs, got, want):
        assert_close_to_reference(job, g.cpu(), w)


@pytest.mark.slow
def test_cpu_large_tensor_over_2_pow_24():
    if not _backend_available("cpu"):
        pytest.fail("backend cpu is not built")
    n = (1 << 24) + 3
    for method in ("ties", "slerp"):
        job = build_job(method, (n,), torch.bfloat16, torch.bfloat16)
        want = reference.merge_jobs([job])[0]
        got = run_backend("cpu", job)
        assert_close_to_reference(job, got, want)


def test_public_batched_forms_equal_their_single_calls_with_per_tensor_parameters():
    """`mergecore.batched` / `slerp_batched` with a parameter per entry (per-model ones as a
    list of lists) give bit for bit what one call per tensor gives, DARE streams keyed by
    `names` included."""
    shapes = [(7,), (33, 5), (1000,)]
    bases = [torch.randn(s).bfloat16() for s in shapes]
    lists = [[(b.float() + 0.05 * torch.randn(b.shape)).bfloat16() for _ in range(2)]
             for b in bases]
    weights = [[1.0, 0.5], [0.3, 0.7], [1.0, 1.0]]
    densities = [[0.2, 0.4], [0.5, 0.5], [0.9, 0.3]]
    names = ["a.weight", "b.weight", "c.weight"]
    got = mergecore.batched("ties", bases, lists, weights=weights, densities=densities,
                            names=names)
    for j in range(3):
        want = mergecore.ties(bases[j], lists[j], weights[j], densities[j], name=names[j])
        assert torch.equal(got[j], want), names[j]
    got = mergecore.batched("dare_ties", bases, lists, weights=weights, densities=densities,
                            seed=7, names=names)
    for j in range(3):
        want = mergecore.dare_ties(bases[j], lists[j], weights[j], densities[j], seed=7,
                                   name=names[j])
        assert torch.equal(got[j], want), names[j]
    ts = [0.1, 0.5, 1.3]
    got = mergecore.slerp_batched(bases, [xs[0] for xs in lists], t=ts)
    for j in range(3):
        assert torch.equal(got[j], mergecore.slerp(bases[j], lists[j][0], ts[j]))
    with pytest.raises(MergeError, match="'densities' has 2 entries for 3 merges"):
        mergecore.batched("ties", bases, lists, weights=weights, densities=[[0.5], [0.5]])
