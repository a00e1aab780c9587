"""The C++ CPU backend's primitives against float64 oracles written from spec.py's text.

Every kernel runs on fresh random inputs (also bf16 inputs with many repeated values, so
selection ties at the threshold happen), odd shapes, every input and output dtype, with the
output poisoned with NaN before the call. Tolerances (docs/semantics.md): bf16/fp16 outputs within
1 ulp of the float64 oracle rounded to the output dtype and >= 99.9% identical; fp32 outputs
within 2**-22 * (sum of |terms|) per element.
"""

from __future__ import annotations

import errno
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mergecore import rng
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

cpu = pytest.importorskip("mergecore.backends.cpu", reason="mergecore._C is not built")
_C = cpu._C

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["f32", "f16", "bf16"]
SIZES = [1, 2, 5, 7, 127, 4099, 5 * 123 * 123, 100_003]


# ----- inputs and oracles -------------------------------------------------------------------


def rand(n: int, dtype: torch.dtype, scale: float = 1.0, dup: bool = False) -> torch.Tensor:
    """Fresh random values; ``dup`` draws from a few dozen values so that many are equal."""
    if dup:
        v = torch.randint(-12, 13, (n,)).float() * (scale / 8)
    else:
        v = torch.randn(n) * scale
    return v.to(dtype)


def near(base: torch.Tensor, rel: float = 0.02, dup: bool = False) -> torch.Tensor:
    """A fine-tune-like model: base plus a small random delta, rounded to base's dtype."""
    if dup:
        return (base.float() + torch.randint(-3, 4, base.shape).float() / 64).to(base.dtype)
    return (base.float() + rel * torch.randn(base.shape)).to(base.dtype)


def poisoned(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n,), float("nan"), dtype=dtype)


def f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()


def keys_of(base: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """spec.py's key: bits(|fl32(x) - fl32(base)|) as int64 (computed in fp32 on purpose)."""
    d = x.float() if base is None else x.float() - base.float()
    return d.abs().view(torch.int32).to(torch.int64)


def in_topset(keys: torch.Tensor, top: TopSet) -> torch.Tensor:
    idx = torch.arange(keys.numel())
    return (keys > top.threshold) | ((keys == top.threshold) & (idx < top.cutoff))


def ref_keep(mask, keys: torch.Tensor) -> torch.Tensor:
    """Boolean keep vector of a mask, straight from spec.py."""
    n = keys.numel()
    if isinstance(mask, KeepAll):
        return torch.ones(n, dtype=torch.bool)
    if isinstance(mask, KeepTop):
        return in_topset(keys, mask.top)
    if isinstance(mask, KeepBand):
        return in_topset(keys, mask.upper) & ~in_topset(keys, mask.drop)
    keep = rng.keep_mask(n, mask.threshold24, mask.key0, mask.key1)
    return torch.from_numpy(keep)


def ref_topset(keys: torch.Tensor, k: int, order: torch.Tensor | None = None) -> TopSet:
    """The canonical TopSet of the exact top-k set (see cpu.select_top_many); ``order`` is
    the stable descending sort of the keys, if already known."""
    n = keys.numel()
    if k == 0:
        return EMPTY_TOP
    if k == n:
        return TopSet(0, n)
    if order is None:
        order = torch.sort(keys, descending=True, stable=True).indices
    threshold = int(keys[order[k - 1]])
    equal = torch.nonzero(keys == threshold).flatten()
    kept_equal = k - int((keys > threshold).sum())
    cutoff = n if kept_equal == equal.numel() else int(equal[kept_equal - 1]) + 1
    return TopSet(threshold, cutoff)


def near_rounding_ties(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elements whose exact result lies within 2**-20 (relative) of a rounding boundary of
    dtype: an fp32 computation may round those either way (bf16 inputs with decimal weights
    often land exactly on a midpoint)."""
    eps = 2.0**-20
    return (ref * (1 + eps)).to(dtype) != (ref * (1 - eps)).to(dtype)


def check_close(got: torch.Tensor, ref: torch.Tensor, terms: torch.Tensor, what: str) -> None:
    """The project's tolerance of an fp32-arithmetic result against its float64 oracle.

    fp32 output: |err| <= 2**-22 * (sum of |terms|) per element. bf16/fp16 output: within
    1 ulp of the oracle rounded to the output dtype (or, where the result cancels, within the
    fp32 bound), and >= 99.9% identical among the elements not near a rounding tie."""
    assert not torch.isnan(got).any(), f"{what}: unwritten (NaN) elements"
    assert got.shape == ref.shape
    if got.numel() == 0:
        return
    err = (got.double() - ref).abs()
    within_fp32 = err <= 2.0**-22 * terms + 1e-300
    if got.dtype == torch.float32:
        assert bool(within_fp32.all()), (
            f"{what}: {int((~within_fp32).sum())} fp32 elements off, worst err/bound "
            f"{float((err / (2.0**-22 * terms + 1e-300)).max()):.3g}"
        )
        return
    diff = ulp_diff(got, ref.to(got.dtype))
    bad = (diff > 1) & ~within_fp32
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} elements over 1 ulp"
    clear = ~near_rounding_ties(ref, got.dtype)
    if int(clear.sum()) >= 1000:
        share = float((diff[clear] == 0).double().mean())
        assert share >= 0.999, f"{what}: only {share:.5f} identical"


@pytest.fixture
def threads():
    """Restore the thread count after a test that changes it."""
    before = cpu.get_num_threads()
    yield
    cpu.set_num_threads(before)


# ----- conversions ---------------------------------------------------------------------------


def _identity(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """out = 1*x + 1*(-0) through lerp2, an exact identity in fp32 (-0 stays -0): exercises
    the load -> fp32 -> store conversions."""
    out = poisoned(x.numel(), out_dtype)
    cpu.lerp2(out, x, torch.full_like(x, -0.0), 1.0, 1.0)
    return out


@pytest.mark.parametrize("src", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_widening_is_exact_for_every_bit_pattern(src):
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    x = bits.view(src)
    got = _identity(x, torch.float32)
    want = x.float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))
    # the sign of a NaN survives
    assert torch.equal(torch.signbit(got[nan]), torch.signbit(want[nan]))


@pytest.mark.parametrize("dst", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_narrowing_rounds_to_nearest_even(dst):
    # random bit patterns over every exponent, plus halfway cases and the range edges
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    raw = torch.randint(-(1 << 31), (1 << 31) - 1, (1 << 20,), generator=g, dtype=torch.int64)
    x = raw.to(torch.int32).view(torch.float32)
    narrow_bits = 13 if dst == torch.float16 else 16
    exact = (x.view(torch.int32) >> narrow_bits) << narrow_bits
    halfway = (exact | (1 << (narrow_bits - 1))).view(torch.float32)
    specials = torch.tensor(
        [0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 6.1e-5, 5.96e-8, 2.98e-8, 2.99e-8,
         1e-8, -3e-6, 3.4e38, -3.4e38, float("inf"), float("-inf"), float("nan"), 1e-45,
         1.1754942e-38],
        dtype=torch.float32,
    )
    x = torch.cat([x, halfway, specials])
    got = _identity(x, dst)
    want = x.to(dst)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    mismatch = got[~nan].view(torch.int16) != want[~nan].view(torch.int16)
    assert not mismatch.any(), f"{int(mismatch.sum())} values round differently from torch"


# ----- lerp2 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dt_in", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("dt_out", DTYPES, ids=DT_IDS)
def test_lerp2(n, dt_in, dt_out):
    a, b = rand(n, dt_in), rand(n, dt_in, scale=3.0)
    c0, c1 = 0.3, -1.7
    out = poisoned(n, dt_out)
    cpu.lerp2(out, a, b, c0, c1)
    ref = c0 * f64(a) + c1 * f64(b)
    check_close(out, ref, abs(c0 * f64(a)) + abs(c1 * f64(b)), f"lerp2 n={n}")


# ----- slerp_reduce / masked_l1 --------------------------------------------------------------


def _sum_bound(terms_abs: torch.Tensor) -> float:
    """A rigorous bound for the fp32 block sums: each of the 32 lanes of a 4096-block adds
    128 terms (error <= 129 u sum|t| with the products' rounding), blocks added in fp64."""
    return 130 * 2.0**-24 * float(terms_abs.sum()) + 1e-300


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
def test_slerp_reduce(n, dt):
    a, b = rand(n, dt), rand(n, dt, scale=0.5)
    aa, bb, ab = cpu.slerp_reduce(a, b)
    a64, b64 = f64(a), f64(b)
    for got, prod in ((aa, a64 * a64), (bb, b64 * b64), (ab, a64 * b64)):
        assert abs(got - float(prod.sum())) <= _sum_bound(prod.abs())


def _masks_for(base, x, n):
    keys = keys_of(base, x)
    k1, k2 = max(1, n // 3), max(1, n // 10)
    top = cpu.select_top(base, x, [k1, k2])
    return keys, [
        KeepAll(),
        KeepTop(top[0]),
        KeepBand(top[0], top[1]),
        KeepRandom(rng.threshold24(0.3), *rng.dare_key(7, "layer.weight", 1)),
    ]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("dup", [False, True], ids=["rand", "dup"])
def test_masked_l1(n, dt, dup):
    base = rand(n, dt, dup=dup)
    x = near(base, dup=dup)
    keys, masks = _masks_for(base, x, n)
    d = (x.float() - base.float()).double().abs()  # |fl32(x) - fl32(base)|, exact in f64
    for mask in masks:
        keep = ref_keep(mask, keys)
        l1_all, l1_kept = cpu.masked_l1(base, x, mask)
        assert abs(l1_all - float(d.sum())) <= _sum_bound(d)
        assert abs(l1_kept - float((d * keep).sum())) <= _sum_bound(d * keep), mask


def test_masked_l1_without_base():
    x = rand(9999, torch.float32)
    l1_all, l1_kept = cpu.masked_l1(None, x, KeepAll())
    assert l1_all == l1_kept
    assert abs(l1_all - float(f64(x).abs().sum())) <= _sum_bound(f64(x).abs())


# ----- select_top ----------------------------------------------------------------------------


def _check_select(base, x, ks, tops):
    keys = keys_of(base, x)
    n = keys.numel()
    order = torch.sort(keys, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n)
    for k, top in zip(ks, tops):
        assert isinstance(top, TopSet)
        got = in_topset(keys, top)
        assert torch.equal(got, rank < k), f"k={k} of n={n}: wrong set for {top}"
        assert top == ref_topset(keys, k, order), f"k={k} of n={n}: not the canonical TopSet"


def _ks(n: int) -> list[int]:
    ks = {0, 1, n // 2, n - 1, n, max(0, n // 3), int(0.01 * n), int(0.9 * n)}
    ks |= {int(v) for v in torch.randint(0, n + 1, (3,))}
    return sorted(ks)


@pytest.mark.parametrize("n", SIZES + [65_536, 65_537, 300_007])
@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("dup", [False, True], ids=["rand", "dup"])
def test_select_top(n, dt, dup):
    base = rand(n, dt, dup=dup)
    x = near(base, dup=dup)
    ks = _ks(n)
    _check_select(base, x, ks, cpu.select_top(base, x, ks))


@pytest.mark.parametrize("small_n,grain", [(0, 512), (0, 1536), (0, 0), (1 << 20, 0)])
@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("dup", [False, True], ids=["rand", "dup"])
def test_select_top_every_path(select_tuning, small_n, grain, dt, dup):
    """Force the large-job path (pure and impure bins, many chunks) and the small path."""
    select_tuning(small_n, grain)
    n = 40_009
    base = rand(n, dt, dup=dup)
    x = near(base, dup=dup)
    ks = _ks(n)
    _check_select(base, x, ks, cpu.select_top(base, x, ks))


def test_select_top_impure_bin_with_heavy_ties(select_tuning):
    """One high-bits bin holding many equal keys plus a few other keys (pass 2 with ties)."""
    select_tuning(0, 1024)
    n = 50_000
    base = torch.zeros(n)
    x = torch.full((n,), 1.0)
    x[torch.randint(0, n, (40,))] = 1.0 + 2.0**-20  # same bin (key >> 16), other low bits
    x[torch.randint(0, n, (40,))] = 1.0 - 2.0**-20
    x[torch.randint(0, n, (500,))] = 3.0
    ks = [1, 500, 520, 600, 10_000, 49_000, n - 1]
    _check_select(base, x, ks, cpu.select_top(base, x, ks))


def test_select_top_all_equal_and_zero_deltas(select_tuning):
    for small_n in (1 << 16, 0):
        select_tuning(small_n, 2048)
        n = 30_011
        base = rand(n, torch.bfloat16)
        for x in (base.clone(), base + 1):  # every key 0 / every key equal after rounding
            ks = [1, 2, n // 2, n - 1]
            _check_select(base, x, ks, cpu.select_top(base, x, ks))


def test_select_top_special_values():
    n = 10_007
    base = rand(n, torch.float32)
    x = near(base)
    x[17] = float("inf")
    x[5000] = float("nan")
    x[9000] = -float("inf")
    base[123] = 1e-42  # subnormal
    x[123] = 0.0
    ks = [1, 2, 3, 4, n // 2]
    _check_select(base, x, ks, cpu.select_top(base, x, ks))


def test_select_top_without_base():
    x = rand(7777, torch.bfloat16, dup=True)
    ks = [0, 1, 100, 7776, 7777]
    _check_select(None, x, ks, cpu.select_top(None, x, ks))


def test_select_top_rejects_bad_k():
    x = rand(10, torch.float32)
    with pytest.raises(ValueError, match="outside"):
        cpu.select_top(x, x, [11])
    with pytest.raises(ValueError, match="outside"):
        cpu.select_top(x, x, [-1])


# ----- combine -------------------------------------------------------------------------------


def ref_combine(job: CombineJob) -> tuple[torch.Tensor, torch.Tensor]:
    """spec.py's combine in float64: (result, sum of |terms| for the fp32 tolerance).

    Values are float64; the elected sign is spec.py's discrete decision: the fp32 terms
    ``fl32(fl32(coef) * d32)`` summed in fp64 in model order, and agreement by their signs."""
    n = job.out.numel()
    b32 = torch.zeros(n) if job.base is None else job.base.float()
    b = b32.double()
    wds, wds32 = [], []
    for x, mask, c in zip(job.xs, job.masks, job.coefs):
        d = x.double() - b
        d32 = x.float() - b32
        keep = ref_keep(mask, keys_of(job.base, x))
        wds.append(torch.where(keep, c * d, 0.0))
        wds32.append(torch.where(keep, torch.tensor(c, dtype=torch.float32) * d32, 0.0))
    zero = torch.zeros(n, dtype=torch.float64)
    total = sum(wds, zero)
    mag = sum((w.abs() for w in wds), zero)
    if job.mode == "sum":
        return b + total, b.abs() + mag
    positive = sum((w.double() for w in wds32), zero) >= 0
    num, den, num_abs = zero.clone(), zero.clone(), zero.clone()
    for wd, wd32, w in zip(wds, wds32, job.weights):
        agree = torch.where(positive, wd32 > 0, wd32 < 0)
        num += torch.where(agree, wd, 0.0)
        num_abs += torch.where(agree, wd.abs(), 0.0)
        den += torch.where(agree, w, 0.0)
    if job.normalize:
        safe = torch.where(den != 0, den, 1.0)
        merged = torch.where(den != 0, num / safe, num)
        merged_abs = torch.where(den != 0, num_abs / safe.abs(), num_abs)
    else:
        merged, merged_abs = num, num_abs
    return b + job.lam * merged, b.abs() + abs(job.lam) * merged_abs


def check_combine(job: CombineJob) -> None:
    """The tolerance against the oracle, for every element (no election may differ)."""
    ref, terms = ref_combine(job)
    check_close(job.out, ref, terms, f"combine {job.mode}")


def _combine_job(n, dt_in, dt_out, nmodels, mode, dup, mask_kinds, has_base=True,
                 normalize=True, lam=0.7):
    base = rand(n, dt_in, dup=dup)
    xs = [near(base, dup=dup) for _ in range(nmodels)]
    masks = []
    for i, (x, kind) in enumerate(zip(xs, mask_kinds)):
        b = base if has_base else None
        if kind == "all":
            masks.append(KeepAll())
        elif kind == "top":
            masks.append(KeepTop(cpu.select_top(b, x, [max(1, n // 4)])[0]))
        elif kind == "band":
            up, drop = cpu.select_top(b, x, [max(1, n // 2), n // 20])
            masks.append(KeepBand(up, drop))
        else:
            masks.append(KeepRandom(rng.threshold24(0.4), *rng.dare_key(3, "t", i)))
    coefs = [0.75, -0.5, 1.25, 2.0][:nmodels]
    weights = [1.0, 0.5, 2.0, 0.25][:nmodels]
    out = poisoned(n, dt_out)
    return CombineJob(out, base if has_base else None, xs, masks, coefs, weights, mode,
                      normalize, lam)


MASK_SETS = [
    ("all", "all", "all"),
    ("top", "top", "top"),
    ("band", "random", "top"),
    ("random", "random", "random"),
]


@pytest.mark.parametrize("n", [1, 3, 5 * 123 * 123, 100_003])
@pytest.mark.parametrize("dt_in", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("dt_out", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mode", ["sum", "elect"])
@pytest.mark.parametrize("masks", MASK_SETS, ids=["-".join(m) for m in MASK_SETS])
def test_combine(n, dt_in, dt_out, mode, masks):
    job = _combine_job(n, dt_in, dt_out, 3, mode, False, masks)
    cpu.combine_many([job])
    check_combine(job)


@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mode", ["sum", "elect"])
@pytest.mark.parametrize("nmodels", [1, 2, 4])
@pytest.mark.parametrize("normalize", [True, False])
def test_combine_dup_values(dt, mode, nmodels, normalize):
    masks = ("top", "band", "random", "all")[:nmodels]
    job = _combine_job(20_011, dt, dt, nmodels, mode, True, masks, normalize=normalize)
    cpu.combine_many([job])
    check_combine(job)


@pytest.mark.parametrize("mode", ["sum", "elect"])
def test_combine_without_base(mode):
    job = _combine_job(12_345, torch.bfloat16, torch.float32, 2, mode, False, ("all", "random"),
                       has_base=False)
    cpu.combine_many([job])
    check_combine(job)


def test_combine_keep_random_is_the_reference_stream():
    """KeepRandom masks are bit-identical to mergecore.rng, at every offset and tail length."""
    for n in (1, 3, 4, 5, 511, 513, 70_001):
        key0, key1 = rng.dare_key(11, f"w{n}", 2)
        thr = rng.threshold24(0.37)
        out = poisoned(n, torch.float32)
        ones = torch.ones(n)
        cpu.combine(out, None, [ones], [KeepRandom(thr, key0, key1)], [1.0], [1.0], "sum",
                    False, 1.0)
        want = torch.from_numpy(rng.keep_mask(n, thr, key0, key1)).float()
        assert torch.equal(out, want), n


def test_keep_bits_cache_written_by_masked_l1_and_read_by_combine():
    """KeepRandom.bits: masked_l1 stores the reference keep decisions (bit j & 7 of byte
    j >> 3), over several parallel blocks and odd tails, and combine reads them instead of
    the Philox stream: same output as without the cache, and a changed cache changes it."""
    for n in (1, 5, 8, 13, 4096 + 3, 3 * 4096 * 16 + 7):
        key0, key1 = rng.dare_key(5, f"w{n}", 1)
        thr = rng.threshold24(0.3)
        base, x = rand(n, torch.bfloat16), None
        x = near(base)
        bits = torch.full(((n + 7) // 8 + 2,), 0xA5, dtype=torch.uint8)  # poisoned, 2 spare
        plain, cached = KeepRandom(thr, key0, key1), KeepRandom(thr, key0, key1, bits=bits)
        assert cpu.masked_l1(base, x, cached) == cpu.masked_l1(base, x, plain)
        keep = rng.keep_mask(n, thr, key0, key1).astype(bool)
        unpacked = np.unpackbits(bits.numpy()[: (n + 7) // 8], bitorder="little")[:n]
        assert np.array_equal(unpacked.astype(bool), keep), n
        assert bits[-2:].tolist() == [0xA5, 0xA5]  # nothing past ceil(n / 8) written
        outs = []
        for mask in (plain, cached):
            out = poisoned(n, torch.float32)
            cpu.combine(out, base, [x], [mask], [1.0], [1.0], "sum", False, 1.0)
            outs.append(out)
        assert torch.equal(outs[0].view(torch.int32), outs[1].view(torch.int32)), n
        bits[:] = 0  # a cache that keeps nothing: combine follows it, not the stream
        out = poisoned(n, torch.float32)
        cpu.combine(out, base, [x], [cached], [1.0], [1.0], "sum", False, 1.0)
        assert torch.equal(out, base.float()), n


def test_keep_bits_cache_must_be_large_enough():
    n = 100
    x = rand(n, torch.float32)
    small = KeepRandom(1 << 23, 1, 2, bits=torch.zeros(12, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least 13 bytes"):
        cpu.masked_l1(None, x, small)


@pytest.mark.parametrize("impl", ["avx512", "avx2", "generic"])
def test_philox_implementations_match_the_reference(impl):
    """Every Philox implementation gives mergecore.rng's words: at counters where the low
    word wraps inside a vector, and at lengths that end inside a vector (the tail goes to the
    next narrower implementation)."""
    if impl not in _C.PHILOX_IMPLS:
        pytest.skip(f"this CPU cannot run the {impl} Philox (it runs {_C.PHILOX_IMPLS})")
    starts = (0, 4, 4 * ((1 << 32) - 5), 4 * ((1 << 32) - 13))
    for start in starts:
        for n in (4 * 1000, 4, 4 * 15, 4 * 17, 4 * 23):
            buf = torch.full((n,), -1, dtype=torch.int32)
            _C._philox_words(0x12345678, 0x9ABCDEF0, start, n, buf.data_ptr(), impl)
            want = rng.random_words(n, 0x12345678, 0x9ABCDEF0, start=start)
            assert np.array_equal(buf.numpy().view(np.uint32), want), (start, n)


def test_philox_dispatch_takes_the_widest_implementation():
    assert _C.PHILOX_IMPLS[-1] == "generic"
    assert len(set(_C.PHILOX_IMPLS)) == len(_C.PHILOX_IMPLS)


def test_combine_elect_zero_sum_and_no_agreement():
    """S == 0 elects +; with no agreeing model den == 0 and merged = num = 0 -> out = base."""
    base = torch.tensor([1.0, 1.0, 1.0, 2.0])
    x0 = torch.tensor([2.0, 1.0, 0.0, 2.0])  # d0 = +1, 0, -1, 0
    x1 = torch.tensor([0.0, 1.0, 2.0, 2.0])  # d1 = -1, 0, +1, 0
    out = poisoned(4, torch.float32)
    cpu.combine(out, base, [x0, x1], [KeepAll(), KeepAll()], [1.0, 1.0], [1.0, 1.0], "elect",
                True, 1.0)
    # element 0: S = 0 -> elected +, model 0 agrees: merged = 1 / 1 -> 2
    # element 2: S = 0 -> elected +, model 1 agrees -> 2; element 1/3: no deltas -> base
    assert out.tolist() == [2.0, 1.0, 2.0, 2.0]


def test_combine_in_place_on_base():
    base = rand(3001, torch.float32)
    x = near(base)
    want = poisoned(3001, torch.float32)
    cpu.combine(want, base, [x], [KeepAll()], [0.5], [1.0], "sum", False, 1.0)
    cpu.combine(base, base, [x], [KeepAll()], [0.5], [1.0], "sum", False, 1.0)
    assert torch.equal(base, want)


# ----- batches, threads, size ------------------------------------------------------------------

BATCH_SIZES = [1, 3, 4096, 70_001, 5 * 123 * 123, 17, 0, 262_147]


def _batch(dt_in, dt_out):
    tensors = []
    for n in BATCH_SIZES:
        base = rand(n, dt_in)
        tensors.append((base, near(base), near(base)))
    return tensors


@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
def test_batches_of_mixed_sizes(dt):
    """Each batched primitive equals its single form per job (and so the oracle)."""
    tensors = _batch(dt, dt)
    sel = [SelectJob(b, x, [len(b) // 4, len(b) // 40]) for b, x, _ in tensors]
    tops = cpu.select_top_many(sel)
    for job, t in zip(sel, tops):
        assert t == cpu.select_top(job.base, job.x, job.ks)
        _check_select(job.base, job.x, job.ks, t)
    l1 = [L1Job(b, x, KeepTop(t[0])) for (b, x, _), t in zip(tensors, tops)]
    assert cpu.masked_l1_many(l1) == [cpu.masked_l1(j.base, j.x, j.mask) for j in l1]
    pairs = [(b, x) for b, x, _ in tensors]
    assert cpu.slerp_reduce_many(pairs) == [cpu.slerp_reduce(a, b) for a, b in pairs]
    lerps = [Lerp2Job(poisoned(len(b), dt), b, x, 0.25, 0.75) for b, x, _ in tensors]
    cpu.lerp2_many(lerps)
    for j in lerps:
        ref = 0.25 * f64(j.a) + 0.75 * f64(j.b)
        check_close(j.out, ref, 0.25 * f64(j.a).abs() + 0.75 * f64(j.b).abs(), "lerp2_many")
    combines = [
        CombineJob(poisoned(len(b), dt), b, [x, y], [KeepTop(t[0]), KeepBand(t[0], t[1])],
                   [1.0, 0.5], [1.0, 1.0], mode, True, 1.0)
        for (b, x, y), t, mode in zip(tensors, tops, ["sum", "elect"] * len(tensors))
    ]
    cpu.combine_many(combines)
    for job in combines:
        check_combine(job)


def _everything(tensors):
    sel = [SelectJob(b, x, [len(b) // 3, len(b) // 50]) for b, x, _ in tensors]
    tops = cpu.select_top_many(sel)
    l1 = cpu.masked_l1_many([L1Job(b, x, KeepRandom(1 << 23, 5, 6)) for b, x, _ in tensors])
    dots = cpu.slerp_reduce_many([(b, x) for b, x, _ in tensors])
    outs = []
    for (b, x, y), t in zip(tensors, tops):
        for mode in ("sum", "elect"):
            out = poisoned(len(b), torch.bfloat16)
            cpu.combine(out, b, [x, y], [KeepTop(t[0]), KeepRandom(1 << 22, 1, 2)],
                        [1.0, 0.5], [1.0, 2.0], mode, True, 0.9)
            outs.append(out)
        out = poisoned(len(b), torch.float16)
        cpu.lerp2(out, b, x, 0.4, 0.6)
        outs.append(out)
    return tops, l1, dots, outs


def test_results_do_not_depend_on_thread_count(threads):
    tensors = _batch(torch.bfloat16, torch.bfloat16)
    results = []
    for n in (1, 2, 3):
        cpu.set_num_threads(n)
        assert cpu.get_num_threads() == n
        results.append(_everything(tensors))
    for other in results[1:]:
        assert other[0] == results[0][0]
        assert other[1] == results[0][1]  # reductions: fixed blocks -> bit-identical
        assert other[2] == results[0][2]
        for a, b in zip(other[3], results[0][3]):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.slow
def test_large_tensor_2_24_plus_3():
    n = (1 << 24) + 3
    base = rand(n, torch.bfloat16)
    x = near(base)
    k = n // 5
    top = cpu.select_top(base, x, [k])[0]
    keys = keys_of(base, x)
    assert int(in_topset(keys, top).sum()) == k
    assert top == ref_topset(keys, k)
    job = CombineJob(poisoned(n, torch.bfloat16), base, [x], [KeepTop(top)], [1.0], [1.0],
                     "elect", True, 1.0)
    cpu.combine_many([job])
    check_combine(job)
    d = (x.float() - base.float()).double().abs()
    l1_all, _ = cpu.masked_l1(base, x, KeepAll())
    assert abs(l1_all - float(d.sum())) <= _sum_bound(d)


# ----- argument checks -----------------------------------------------------------------------


def test_rejects_bad_tensors():
    x = torch.randn(16)
    with pytest.raises(ValueError, match="contiguous"):
        cpu.slerp_reduce(torch.randn(4, 8).t(), torch.randn(8, 4))
    with pytest.raises(TypeError, match="float64"):
        cpu.slerp_reduce(x.double(), x.double())
    with pytest.raises(ValueError, match="xs\\[1\\]: has 15 elements, expected 16"):
        cpu.combine(torch.empty(16), x, [x, x[:15]], [KeepAll()] * 2, [1, 1], [1, 1], "sum",
                    False, 1.0)
    with pytest.raises(ValueError, match="mode"):
        cpu.combine(torch.empty(16), x, [x], [KeepAll()], [1], [1], "mean", False, 1.0)
    with pytest.raises(ValueError, match="masks"):
        cpu.combine(torch.empty(16), x, [x], [], [1], [1], "sum", False, 1.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        cpu.lerp2(torch.empty(16), np.zeros(16, dtype=np.float32), x, 1.0, 1.0)
    with pytest.raises(ValueError, match="threshold24"):
        cpu.masked_l1(x, x, KeepRandom((1 << 24) + 1, 0, 0))
    with pytest.raises(ValueError):
        cpu.set_num_threads(0)


def test_empty_tensors():
    e = torch.empty(0, dtype=torch.bfloat16)
    assert cpu.select_top(e, e, [0]) == [EMPTY_TOP]
    assert cpu.slerp_reduce(e, e) == (0.0, 0.0, 0.0)
    assert cpu.masked_l1(e, e, KeepAll()) == (0.0, 0.0)
    cpu.combine(e, e, [e], [KeepAll()], [1.0], [1.0], "elect", True, 1.0)
    cpu.lerp2(e, e, e, 0.5, 0.5)


# ----- threads setting and import ----------------------------------------------------------


def _run_python(code: str, env: dict[str, str]) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full_env = {**os.environ, **env, "PYTHONPATH": root + os.pathsep + os.environ.get(
        "PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_default_thread_count_from_environment():
    code = "from mergecore.backends import cpu; print(cpu.get_num_threads())"
    assert _run_python(code, {"MERGECORE_NUM_THREADS": "3"}) == "3"
    want = str(len(os.sched_getaffinity(0)))
    assert _run_python(code, {"MERGECORE_NUM_THREADS": ""}) == want


def test_import_mergecore_loads_torch_only_when_the_api_is_used():
    code = """
        import sys
        import mergecore
        before = "torch" in sys.modules
        from mergecore import ties, MergeError
        import torch
        out = mergecore.linear([torch.ones(3), torch.zeros(3)], [1.0, 1.0])
        print(before, sorted(dir(mergecore)) == sorted(set(dir(mergecore))),
              all(hasattr(mergecore, n) for n in mergecore.__all__), out.tolist())
        """
    assert _run_python(code, {}) == "False True True [0.5, 0.5, 0.5]"


# Python run first by the subprocess tests below: makes `import mergecore._C` fail.
BLOCK_EXTENSION = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "mergecore._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
"""


def test_import_fails_cleanly_without_the_extension():
    code = BLOCK_EXTENSION + textwrap.dedent("""
        try:
            import mergecore.backends.cpu
        except ImportError as exc:
            print("ImportError:", exc)
        """)
    out = _run_python(code, {})
    assert out.startswith("ImportError:") and "build_ext --inplace" in out


# ----- file IO -------------------------------------------------------------------------------


def test_pread_pwrite_roundtrip(tmp_path):
    n = (20 << 20) + 12345  # large enough to be split across threads
    src = torch.randint(0, 256, (n,), dtype=torch.uint8)
    path = tmp_path / "blob.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert _C.pwrite_from(fd, 4096, n, src.data_ptr()) == n
        assert _C.pwrite_from(fd, 0, 0, 0) == 0
        for nthreads in (1, 4):
            dst = torch.zeros(n, dtype=torch.uint8)
            assert _C.pread_into(fd, 4096, n, dst.data_ptr(), nthreads) == n
            assert torch.equal(dst, src)
        part = torch.zeros(1000, dtype=torch.uint8)
        assert _C.pread_into(fd, 4096 + 777, 1000, part.data_ptr(), 2) == 1000
        assert torch.equal(part, src[777:1777])
        # past the end of the file: a short count, not an error
        tail = torch.zeros(n, dtype=torch.uint8)
        assert _C.pread_into(fd, 4096 + 100, n, tail.data_ptr(), 4) == n - 100
        assert torch.equal(tail[: n - 100], src[100:])
    finally:
        os.close(fd)


def test_pread_errors_raise_oserror_with_errno(tmp_path):
    buf = torch.zeros(16, dtype=torch.uint8)
    fd = os.open(tmp_path / "x", os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    with pytest.raises(OSError) as info:
        _C.pread_into(fd, 0, 16, buf.data_ptr(), 1)  # closed descriptor
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        _C.pwrite_from(fd, 0, 16, buf.data_ptr())
    assert info.value.errno == errno.EBADF
    path = tmp_path / "d"
    path.mkdir()
    dfd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(IsADirectoryError):
            _C.pread_into(dfd, 0, 16, buf.data_ptr(), 1)
    finally:
        os.close(dfd)


def test_kernels_release_the_gil(threads):
    """A Python thread keeps running while a long kernel call is in progress."""
    import threading
    import time

    cpu.set_num_threads(1)
    n = 1 << 23
    base = rand(n, torch.float32)
    x = near(base)
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    th = threading.Thread(target=ticker)
    th.start()
    try:
        time.sleep(0.01)
        t0 = time.perf_counter()
        for _ in range(3):
            cpu.select_top(base, x, [n // 3])
        t1 = time.perf_counter()
    finally:
        stop.set()
        th.join()
    during = [t for t in ticks if t0 < t < t1]
    assert len(during) >= max(3, int((t1 - t0) / 0.01)), (len(during), t1 - t0)


def test_math_helpers_are_consistent():
    """The oracle's own pieces: threshold24 edges and the canonical TopSet of a tie."""
    assert rng.threshold24(0.0) == 0 and rng.threshold24(1.0) == 1 << 24
    keys = torch.tensor([5, 7, 7, 7, 1])
    assert ref_topset(keys, 2) == TopSet(7, 3)
    assert ref_topset(keys, 3) == TopSet(7, 5)
    assert math.isclose(float(in_topset(keys, TopSet(7, 3)).sum()), 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_count_nonfinite_matches_torch(dtype):
    """NaN, +Inf and -Inf planted at random places (the last element too) in tensors of odd
    lengths, one of them split over many chunks, are counted exactly; finite extremes are not."""
    tensors = []
    for n in (1, 17, 1_000_003):
        t = rand(n, dtype)
        where = torch.randperm(n)[: max(1, n // 1000)]
        t[where] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype).repeat(
            len(where))[: len(where)]
        t[-1] = float("nan")
        tensors.append(t)
    finite = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max, 0.0, -0.0], dtype=dtype)
    tensors.append(finite)
    want = [int((~torch.isfinite(t)).sum()) for t in tensors]
    assert cpu.count_nonfinite_many(tensors) == want
    assert want[-1] == 0 and want[2] > 1


def test_without_the_extension_the_reference_backend_serves_with_one_warning():
    """No compiled `mergecore._C`: `import mergecore` works, every CPU merge runs on the float64
    reference backend (same results as forcing it), and exactly one RuntimeWarning says so."""
    code = BLOCK_EXTENSION + textwrap.dedent("""
        import warnings
        import torch, mergecore
        torch.manual_seed(0)
        base = torch.randn(1000).bfloat16()
        xs = [(base.float() + 0.01 * torch.randn(1000)).bfloat16() for _ in range(2)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs = [mergecore.ties(base, xs, [1.0, 0.5], [0.5, 0.3]) for _ in range(3)]
            outs.append(mergecore.slerp(base, xs[0], 0.3))
        mine = [w for w in caught if "backend is not available" in str(w.message)]
        jobs = [mergecore.make_job("ties", base, xs, weights=[1.0, 0.5], densities=[0.5, 0.3]),
                mergecore.make_job("slerp", base, xs[:1], t=0.3)]
        want = mergecore.merge_many(jobs, backend="reference")
        same = all(torch.equal(o, want[0]) for o in outs[:3]) and torch.equal(outs[3], want[1])
        print(len(mine), mine[0].category.__name__, "blocked for the test" in str(mine[0].message),
              same)
        """)
    assert _run_python(code, {"MERGECORE_BACKEND": ""}) == "1 RuntimeWarning True True"


@pytest.mark.slow
def test_whole_tensor_reductions_stay_exact_at_1_2e9_elements():
    """The reductions behind slerp and DARE's rescale over 1.2e9 bf16 elements (the largest
    tensor the kernels are specified for): constant inputs make every exact sum an integer
    that float64 holds, while a plain fp32 accumulator would stop growing at 2**24."""
    n = 1_200_000_000
    a = torch.ones(n, dtype=torch.bfloat16)
    b = torch.full((n,), 0.5, dtype=torch.bfloat16)
    aa, bb, ab = cpu.slerp_reduce(a, b)
    assert (aa, bb, ab) == (float(n), n / 4, n / 2)
    l1, kept = cpu.masked_l1(b, a, KeepAll())  # d = a - b = 0.5 everywhere
    assert (l1, kept) == (n / 2, n / 2)
