"""The Triton backend's primitives against float64 oracles written from ``backends/spec.py``.

On a machine without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
set below before triton is imported) on CPU tensors; with CUDA they run compiled on the GPU.
Every output is poisoned with NaN before the call. Selections and DARE masks must equal the
oracle exactly (stable sort / ``mergecore.rng``); values: fp32 outputs within
``2**-22 * sum|terms|``, fp16/bf16 outputs within 1 ulp of the float64 oracle rounded to the
output dtype and >= 99.9% identical.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

from mergecore import rng
from mergecore.backends import triton as tb
from mergecore.backends.spec import (
    EMPTY_TOP,
    CombineJob,
    KeepAll,
    KeepBand,
    KeepRandom,
    KeepTop,
    L1Job,
    Lerp2Job,
    SelectJob,
    TopSet,
)
from mergecore.numerics import ulp_diff
from triton_kernels import _config
from triton_kernels import select as tsel

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OTHER = {torch.float32: torch.bfloat16, torch.float16: torch.float32,
         torch.bfloat16: torch.float16}
SIZES = [1, 5 * 12 * 13, 1009, 4099]
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (compiled kernels)")


# ----------------------------------------------------------------------------- inputs


def make_models(n: int, dtype: torch.dtype, count: int, *, scale: float = 0.05,
                duplicates: bool = False, seed: int = 0):
    """A base and ``count`` fine-tunes of it with deltas of varied scale; ``duplicates`` puts
    the deltas on a 1/64 grid (many equal keys, exact fp32 arithmetic)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.5
    xs = []
    for _ in range(count):
        delta = torch.randn(n, generator=g) * scale * (torch.rand(n, generator=g) + 0.1)
        if duplicates:
            delta = torch.round(delta * 64) / 64
        xs.append((base + delta).to(dtype).to(DEVICE))
    return base.to(dtype).to(DEVICE), xs


def make_pair(n: int, dtype: torch.dtype, *, scale: float = 0.05, duplicates: bool = False,
              seed: int = 0):
    """A base and one fine-tune (see ``make_models``)."""
    base, (x,) = make_models(n, dtype, 1, scale=scale, duplicates=duplicates, seed=seed)
    return base, x


def poisoned(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n,), float("nan"), dtype=dtype, device=DEVICE)


# ----------------------------------------------------------------------------- oracles


def keys(base: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``bits(|fl32(x) - fl32(base)|)`` as int64 (spec.py's selection key)."""
    d = x.cpu().float() - (base.cpu().float() if base is not None else 0.0)
    return d.abs().view(torch.int32).long()


def top_oracle(key: torch.Tensor, k: int) -> TopSet:
    """Canonical TopSet of the k largest keys (ties: lowest index) via a stable sort."""
    n = key.numel()
    if k <= 0:
        return EMPTY_TOP
    if k >= n:
        return TopSet(0, n)
    order = torch.sort(key, descending=True, stable=True).indices
    last = int(order[k - 1])
    t = int(key[last])
    kept_t = int((key[order[:k]] == t).sum())
    all_t = int((key == t).sum())
    return TopSet(t, n if kept_t == all_t else last + 1)


def in_top(key: torch.Tensor, ts: TopSet) -> torch.Tensor:
    idx = torch.arange(key.numel())
    return (key > ts.threshold) | ((key == ts.threshold) & (idx < ts.cutoff))


def mask_oracle(mask, key: torch.Tensor) -> torch.Tensor:
    n = key.numel()
    if isinstance(mask, KeepAll):
        return torch.ones(n, dtype=torch.bool)
    if isinstance(mask, KeepTop):
        return in_top(key, mask.top)
    if isinstance(mask, KeepBand):
        return in_top(key, mask.upper) & ~in_top(key, mask.drop)
    return torch.from_numpy(rng.keep_mask(n, mask.threshold24, mask.key0, mask.key1))


def combine_oracle(base, xs, masks, coefs, weights, mode, normalize, lam):
    """spec.py's combine in float64 (deltas are fl32(x) - fl32(base), exact in fp64).

    Returns (value, sum of |terms|) for the tolerance of fp32 outputs.
    """
    b = base.cpu().float().double() if base is not None else 0.0
    wds = []
    for x, mask, c in zip(xs, masks, coefs):
        d32 = x.cpu().float() - (base.cpu().float() if base is not None else 0.0)
        keep = mask_oracle(mask, d32.abs().view(torch.int32).long())
        wds.append(torch.where(keep, c * d32.double(), 0.0))
    n = xs[0].numel() if xs else base.numel()
    mag = sum((w.abs() for w in wds), torch.zeros(n, dtype=torch.float64))
    if mode == "sum":
        merged = sum(wds, torch.zeros(n, dtype=torch.float64))
        return b + merged, (abs(b) if base is not None else 0.0) + mag
    total = sum(wds, torch.zeros(n, dtype=torch.float64))
    num = torch.zeros(n, dtype=torch.float64)
    den = torch.zeros(n, dtype=torch.float64)
    for wd, w in zip(wds, weights):
        agree = ((wd > 0) & (total >= 0)) | ((wd < 0) & (total < 0))
        num += torch.where(agree, wd, 0.0)
        den += torch.where(agree, w, 0.0)
    use = (den != 0) & bool(normalize)
    merged = torch.where(use, num / torch.where(use, den, 1.0), num)
    scale = torch.where(use, 1.0 / torch.where(use, den, 1.0).abs(), 1.0)
    terms = abs(lam) * mag * scale * 2
    return b + lam * merged, (abs(b) if base is not None else 0.0) + terms


def assert_close(got: torch.Tensor, want64: torch.Tensor, terms, what: str) -> None:
    """The brief's tolerance. fp32: ``|err| <= 2**-22 * sum|terms|``. fp16/bf16: within 1 ulp
    of the float64 oracle rounded to the output dtype (or, where a cancelling sum puts the
    fp32 error bound above half an ulp, within that bound) and >= 99.9% identical."""
    got = got.cpu().reshape(-1)
    assert not torch.isnan(got).any(), f"{what}: unwritten (NaN) elements"
    err = (got.double() - want64.reshape(-1)).abs()
    bound = None
    if terms is not None:
        bound = 2.0**-22 * torch.as_tensor(terms, dtype=torch.float64).reshape(-1) + 1e-38
    if got.dtype == torch.float32:
        assert bound is not None
        assert bool((err <= bound).all()), f"{what}: max fp32 error {float(err.max())}"
        return
    diff = ulp_diff(got, want64.reshape(-1).to(got.dtype))
    ok = diff <= 1
    if bound is not None:
        ok |= err <= bound
    assert bool(ok.all()), f"{what}: {int(diff[~ok].max())} ulp beyond the fp32 bound"
    mismatches = int((diff != 0).sum())
    assert mismatches <= max(1, got.numel() // 1000), f"{what}: {mismatches} not identical"


def close_float(got: float, want: float, terms: float, what: str) -> None:
    """Whole-tensor sums: fp32 tile sums (tree reduction) combined in fp64."""
    assert abs(got - want) <= 2.0**-20 * terms + 1e-30, f"{what}: {got} vs {want}"


# ----------------------------------------------------------------------------- import


def test_import_compiles_nothing_and_leaves_cuda_alone():
    code = (
        "import torch, triton_kernels, mergecore.backends.triton as t\n"
        "from triton_kernels import combine, dare, select, slerp, _config\n"
        "print(torch.cuda.is_initialized())\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- slerp


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_slerp_reduce_batch_of_mixed_sizes(dtype):
    pairs = [make_pair(n, dtype, scale=1.0, seed=n) for n in SIZES]
    got = tb.slerp_reduce_many(pairs)
    for (a, b), sums in zip(pairs, got):
        a64, b64 = a.cpu().double(), b.cpu().double()
        want = (float(a64 @ a64), float(b64 @ b64), float(a64 @ b64))
        terms = (want[0], want[1], float((a64 * b64).abs().sum()))
        for name, g, w, t in zip(("aa", "bb", "ab"), sums, want, terms):
            close_float(g, w, t, f"{dtype} n={a.numel()} {name}")
    assert tb.slerp_reduce(*pairs[2]) == got[2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lerp2_all_output_dtypes(dtype):
    # slerp-like coefficients on a fine-tune; plus a cancelling pair checked in fp32 output,
    # where the bound scales with |terms| (16-bit outputs of a cancelling sum can differ from
    # the rounded float64 value by fp32 rounding alone).
    cases = [(0.6180339887, 0.4146, dtype, 0.05), (0.6180339887, 0.4146, OTHER[dtype], 0.05),
             (0.6180339887, -0.2718281828, torch.float32, 1.0)]
    for c0, c1, out_dtype, scale in cases:
        pairs = [make_pair(n, dtype, scale=scale, seed=n + 7) for n in SIZES]
        jobs = [Lerp2Job(poisoned(a.numel(), out_dtype), a, b, c0, c1) for a, b in pairs]
        tb.lerp2_many(jobs)
        for job in jobs:
            a64, b64 = job.a.cpu().double(), job.b.cpu().double()
            assert_close(job.out, c0 * a64 + c1 * b64, abs(c0 * a64) + abs(c1 * b64),
                         f"lerp2 {dtype}->{out_dtype} n={a64.numel()} c1={c1}")


def test_lerp2_single_form_writes_every_element_of_a_3d_tensor():
    a, b = make_pair(5 * 12 * 13, torch.bfloat16, scale=1.0)
    out = poisoned(5 * 12 * 13, torch.bfloat16).reshape(5, 12, 13)
    tb.lerp2(out, a.reshape(5, 12, 13), b.reshape(5, 12, 13), 0.25, 0.75)
    want = 0.25 * a.cpu().double() + 0.75 * b.cpu().double()
    assert_close(out, want, None, "lerp2 3-d")


# ----------------------------------------------------------------------------- select


def check_select(jobs):
    got = tb.select_top_many(jobs)
    for i, (job, tops) in enumerate(zip(jobs, got)):
        key = keys(job.base, job.x)
        for k, ts in zip(job.ks, tops):
            want = top_oracle(key, k)
            assert ts == want, f"job {i} n={key.numel()} k={k}: {ts} != {want}"
            assert int(in_top(key, ts).sum()) == k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strategy", ["auto", "radix"])
def test_select_top_exact_in_one_batch(dtype, strategy, monkeypatch):
    monkeypatch.setattr(_config, "SELECT_STRATEGY", strategy)
    jobs = []
    for n in SIZES:
        for dup in (False, True):
            base, x = make_pair(n, dtype, duplicates=dup, seed=n + dup)
            ks = sorted({0, 1, n // 7, n // 2, max(n - 1, 0), n})
            jobs.append(SelectJob(base, x, ks))
    check_select(jobs)


def test_select_many_tiles_and_models_sharing_a_base(monkeypatch):
    """Small tiles: tile tables, candidate regions, the index cutoff across tiles and scan
    steps, one base read for 3 models; the sampled path must hold on smooth data."""
    monkeypatch.setattr(_config, "SELECT_BLOCK", 128)
    monkeypatch.setattr(_config, "SELECT_TILES_PER_REGION", 2)
    monkeypatch.setattr(_config, "DIGIT_BLOCK", 256)
    monkeypatch.setattr(_config, "RESOLVE_BLOCK", 16)
    n = 3001
    base, xs = make_models(n, torch.bfloat16, 3, duplicates=True, seed=1)
    jobs = [SelectJob(base, xs[0], [n // 2, 17])] + [SelectJob(base, x, [n // 3]) for x in xs[1:]]
    before = tsel.STATS["sampled"]
    check_select(jobs)
    assert tsel.STATS["sampled"] - before == 4, tsel.STATS["misses"][-3:]
    monkeypatch.setattr(_config, "SELECT_STRATEGY", "radix")
    check_select(jobs)


def test_select_falls_back_to_radix_when_bounds_miss(monkeypatch):
    """Inverted bounds (an empty band) and a tiny candidate buffer miss on purpose; the
    radix fallback must give the same sets."""
    monkeypatch.setattr(_config, "SAMPLE_Z", -3.0)
    monkeypatch.setattr(_config, "SAMPLE_SLACK", 0)
    monkeypatch.setattr(_config, "SELECT_BLOCK", 256)
    monkeypatch.setattr(_config, "CAP_MIN", 1)
    monkeypatch.setattr(_config, "CAP_FACTOR", 0.0)
    monkeypatch.setattr(_config, "CAP_TIE_DIV", 1 << 40)
    monkeypatch.setattr(_config, "CAND_BUDGET", 0)
    before = tsel.STATS["fallback"]
    jobs = [SelectJob(*make_pair(n, torch.float16, duplicates=True, seed=n), [n // 3, n // 2])
            for n in (1009, 4099)]
    check_select(jobs)
    assert tsel.STATS["fallback"] - before == 4, tsel.STATS


def test_select_single_form_and_errors():
    base, x = make_pair(1009, torch.float32)
    assert tb.select_top(base, x, [0, 1009]) == [EMPTY_TOP, TopSet(0, 1009)]
    with pytest.raises(ValueError, match="k = 1010"):
        tb.select_top(base, x, [1010])
    with pytest.raises(ValueError, match=r"select job 0 \(x\): 1008 elements"):
        tb.select_top(base, x[:-1], [3])
    with pytest.raises(TypeError, match="int32"):
        tb.select_top(base, x.to(torch.int32), [3])


def test_candidate_offsets_fit_int32_up_to_the_largest_tensor():
    """region * rcap + position is stored as int32 by the scan kernel: for every size up to
    MAX_NUMEL and any budget share the candidate buffer's regions stay addressable."""
    block = _config.SELECT_BLOCK
    for n in (1 << 20, 1_200_000_000, tsel.MAX_NUMEL - 5, tsel.MAX_NUMEL):
        ntiles = -(-n // block)
        for expect, share in ((n // 100, 0), (n, n), (n // 2, 1 << 30)):
            regions, rcap = tsel._capacity(n, expect, share, ntiles)
            assert 1 <= regions <= _config.SELECT_REGIONS_MAX
            assert regions * rcap <= tsel.MAX_NUMEL, (n, expect, share, regions, rcap)
            assert rcap >= min(n, expect) // regions  # still holds the expected band


# ----------------------------------------------------------------------------- masks, L1


def random_mask(p: float, seed: int, model: int) -> KeepRandom:
    return KeepRandom(rng.threshold24(p), *rng.dare_key(seed, "model.layers.0.mlp", model))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keep_random_bit_identical_to_rng(dtype):
    """``out = 1 * x`` where kept, 0 elsewhere: kept set == mergecore.rng, word by word."""
    jobs, want = [], []
    for m, n in enumerate((1, 4, 1009, 4099)):
        x = (torch.rand(n) + 0.5).to(dtype).to(DEVICE)  # no zeros: kept <=> out != 0
        mask = random_mask((0.1, 0.5, 0.9, 0.3)[m], 42, m)
        jobs.append(CombineJob(poisoned(n, dtype), None, [x], [mask], [1.0], [1.0], "sum",
                               False, 1.0))
        want.append(rng.keep_mask(n, mask.threshold24, mask.key0, mask.key1))
    tb.combine_many(jobs)
    for job, w in zip(jobs, want):
        kept = (job.out.cpu() != 0).numpy()
        assert np.array_equal(kept, w)
        assert torch.equal(job.out.cpu()[torch.from_numpy(w)], job.xs[0].cpu()[torch.from_numpy(w)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_l1_every_mask_kind(dtype):
    n = 4099
    base, x = make_pair(n, dtype, duplicates=dtype == torch.bfloat16, seed=5)
    key = keys(base, x)
    top = top_oracle(key, n // 3)
    masks = [KeepAll(), KeepTop(top), KeepBand(top_oracle(key, n // 2), top_oracle(key, 40)),
             random_mask(0.3, 1, 0), KeepTop(EMPTY_TOP)]
    jobs = [L1Job(base, x, m) for m in masks] + [L1Job(*make_pair(1, dtype), KeepAll())]
    got = tb.masked_l1_many(jobs)
    for job, (l1, kept) in zip(jobs, got):
        d = (job.x.cpu().float() - job.base.cpu().float()).double().abs()
        keep = mask_oracle(job.mask, keys(job.base, job.x))
        total = float(d.sum())
        close_float(l1, total, total, f"L1 {job.mask}")
        close_float(kept, float((d * keep).sum()), total, f"kept L1 {job.mask}")
    assert tb.masked_l1(jobs[1].base, jobs[1].x, jobs[1].mask) == got[1]


# ----------------------------------------------------------------------------- combine


def combine_case(n: int, dtype: torch.dtype, out_dtype: torch.dtype, mode: str, seed: int,
                 *, with_base: bool = True, duplicates: bool = False) -> CombineJob:
    base, xs = make_models(n, dtype, 3, seed=seed, duplicates=duplicates)
    key = [keys(base, x) for x in xs]
    masks = [KeepTop(top_oracle(key[0], max(n // 3, 1))),
             KeepBand(top_oracle(key[1], max(n // 2, 1)), top_oracle(key[1], n // 20)),
             random_mask(0.6, seed, 2)]
    if not with_base:
        masks = [KeepAll(), random_mask(0.5, seed, 1), KeepAll()]
    if duplicates:  # dyadic coefficients: every fp32 operation is exact
        coefs, weights = [1.0, 0.5, 0.25], [1.0, 0.5, 0.5]
    else:
        coefs, weights = [0.9, -0.35, 0.6180339887], [0.7, 0.4, 0.3]
    lam = 0.8 if mode == "elect" else 1.0
    return CombineJob(poisoned(n, out_dtype), base if with_base else None, xs, masks, coefs,
                      weights, mode, mode == "elect", lam)


def check_combine(jobs):
    tb.combine_many(jobs)
    for i, job in enumerate(jobs):
        want, terms = combine_oracle(job.base, job.xs, job.masks, job.coefs, job.weights,
                                     job.mode, job.normalize, job.lam)
        assert_close(job.out, want, terms, f"combine job {i} {job.mode} "
                     f"{job.xs[0].dtype}->{job.out.dtype} n={job.out.numel()}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["sum", "elect"])
def test_combine_every_mask_kind_and_output_dtype(dtype, mode):
    jobs = [combine_case(n, dtype, od, mode, seed=n, duplicates=dup)
            for n in (5 * 12 * 13, 4099) for od in (dtype, OTHER[dtype])
            for dup in (False, True)]
    check_combine(jobs)


def test_combine_linear_without_base_and_unnormalized_elect():
    jobs = [combine_case(n, torch.bfloat16, torch.bfloat16, "sum", seed=n, with_base=False)
            for n in (1, 1009)]
    elect = combine_case(1009, torch.float16, torch.float16, "elect", seed=3)
    elect.normalize = False
    check_combine(jobs + [elect])


def test_combine_single_form_and_errors():
    job = combine_case(1009, torch.float32, torch.float32, "elect", seed=11)
    tb.combine(job.out, job.base, job.xs, job.masks, job.coefs, job.weights, job.mode,
               job.normalize, job.lam)
    want, terms = combine_oracle(job.base, job.xs, job.masks, job.coefs, job.weights,
                                 job.mode, job.normalize, job.lam)
    assert_close(job.out, want, terms, "combine single")
    with pytest.raises(ValueError, match="mode 'max'"):
        tb.combine(job.out, job.base, job.xs, job.masks, job.coefs, job.weights, "max",
                   True, 1.0)
    with pytest.raises(ValueError, match="3 models but 2 masks"):
        tb.combine(job.out, job.base, job.xs, job.masks[:2], job.coefs, job.weights, "sum",
                   True, 1.0)
    with pytest.raises(TypeError, match=r"combine job 0 \(model 1\): dtype torch.float16"):
        tb.combine(job.out, job.base, [job.xs[0], job.xs[1].half()], job.masks[:2],
                   job.coefs[:2], job.weights[:2], "sum", False, 1.0)


# ----------------------------------------------------------------------------- GPU only


@requires_cuda
@pytest.mark.parametrize("duplicates", [False, True])
def test_gpu_large_bf16_ties_path_matches_oracle(duplicates):
    """Compiled kernels at a size where the sampled bounds and candidate buffers matter.

    Smooth deltas must take the sampled path (two models sharing the base in one scan);
    deltas on a coarse grid (few distinct keys) may overflow the band and fall back."""
    n = 3_000_017
    base, (x, y) = make_models(n, torch.bfloat16, 2, duplicates=duplicates, seed=99,
                               scale=0.05 if duplicates else 0.002)
    before = tsel.STATS["sampled"]
    check_select([SelectJob(base, x, [n // 2, n // 5]), SelectJob(base, y, [n // 10])])
    if not duplicates:
        assert tsel.STATS["sampled"] - before == 3, tsel.STATS["misses"][-3:]
    job = CombineJob(poisoned(n, torch.bfloat16), base, [x, y],
                     [KeepTop(top_oracle(keys(base, x), n // 2)), random_mask(0.4, 3, 1)],
                     [1.0, 0.5], [1.0, 0.5], "elect", True, 1.0)
    check_combine([job])


@requires_cuda
def test_gpu_denormal_deltas_keep_their_keys():
    """Keys of subnormal deltas are not flushed to zero by the compiled kernels."""
    n = 4099
    base = torch.zeros(n, device=DEVICE)
    x = torch.randn(n, device=DEVICE) * 1e-39  # subnormal fp32
    check_select([SelectJob(base, x, [n // 2, 5])])
