"""The C++ backend's fast paths give exactly what its general paths give.

- Top-k of a large single-k job goes through a sampled bracket (one pass over the data)
  before falling back to the two-pass histogram select: both must return the canonical
  TopSet (the exact top-k, lowest index first among equal keys), also when the bracket
  misses and the fallback runs.
- TIES' elect combine with top/all masks runs one fused loop per tile: its output must be
  bit-identical to the general multi-pass path.
"""

from __future__ import annotations

import pytest
import torch

from mergecore.backends.spec import CombineJob, KeepAll, KeepTop, SelectJob
from tests.test_cpu_primitives import (
    DT_IDS,
    DTYPES,
    check_combine,
    keys_of,
    near,
    poisoned,
    rand,
    ref_topset,
)

cpu = pytest.importorskip("mergecore.backends.cpu", reason="mergecore._C is not built")
_C = cpu._C

NEVER = 1 << 63


@pytest.fixture
def bracket_limit():
    """Set the smallest job size that may take the sampled bracket; restored afterwards."""
    before = _C._select_bracket_min_n(0)
    _C._select_bracket_min_n(before)
    yield _C._select_bracket_min_n
    _C._select_bracket_min_n(before)


def _select_one(base, x, k):
    return cpu.select_top_many([SelectJob(base, x, [k])])[0][0]


def _stats_delta(fn):
    before = _C._select_bracket_stats()
    result = fn()
    after = _C._select_bracket_stats()
    return result, (after[0] - before[0], after[1] - before[1])


@pytest.mark.parametrize("n", [65_537, 300_007, 1_048_583])
@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("dup", [False, True], ids=["rand", "dup"])
def test_bracket_gives_the_canonical_topset(n, dt, dup, bracket_limit):
    bracket_limit(0)
    base = rand(n, dt, dup=dup)
    x = near(base, dup=dup)
    keys = keys_of(base, x)
    order = torch.sort(keys, descending=True, stable=True).indices
    ks = {1, 2, n // 2, n - 1, int(0.01 * n), int(0.9 * n), int(0.3 * n)}
    for k in sorted(ks):
        top, (settled, missed) = _stats_delta(lambda k=k: _select_one(base, x, k))
        assert top == ref_topset(keys, k, order), f"k={k}"
        assert settled + missed == 1, "a large single-k job must try the bracket"
        bracket_limit(NEVER)
        assert _select_one(base, x, k) == top, f"k={k}: histogram path differs"
        bracket_limit(0)


@pytest.mark.parametrize("chunk", [512, 4096, 0])
def test_bracket_threshold_on_a_frequent_key(chunk, bracket_limit, select_tuning):
    """Most deltas are exactly zero or one value: the threshold is a bracket end held by many
    entries, located through the per-chunk counts (chunk boundaries anywhere)."""
    bracket_limit(0)
    select_tuning(1 << 16, chunk)
    n = 200_003
    base = torch.zeros(n)
    x = torch.zeros(n)
    x[torch.randperm(n)[: n // 3]] = 0.5
    x[torch.randperm(n)[:1000]] = torch.randn(1000)
    keys = keys_of(base, x)
    order = torch.sort(keys, descending=True, stable=True).indices
    for k in (1, 999, 1000, 5000, n // 3, n // 2, n - 1):
        top, (settled, _) = _stats_delta(lambda k=k: _select_one(base, x, k))
        assert top == ref_topset(keys, k, order), f"k={k}"
        assert settled == 1, f"k={k}: the bracket should hold on this data"


def _sampled_positions(n: int) -> torch.Tensor:
    """The entries the bracket's sample reads (mirrors sample_bracket in
    csrc/select_bracket.cpp: S = clamp(n / 256, 8192, 2**18) keys in runs of 8, one run at
    splitmix64(r) % (stride - 7) inside each stride)."""
    mask64 = (1 << 64) - 1

    def splitmix64(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & mask64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask64
        return x ^ (x >> 31)

    runs = min(max(n // 256, 8192), 1 << 18) // 8
    stride = n // runs
    starts = [r * stride + splitmix64(r) % (stride - 8 + 1) for r in range(runs)]
    return (torch.tensor(starts)[:, None] + torch.arange(8)[None, :]).flatten()


def test_bracket_miss_falls_back_exactly(bracket_limit):
    """Large deltas everywhere except where the sample looks: the bracket misses, the
    histogram path answers, and the result is still exact."""
    bracket_limit(0)
    n = 1 << 20
    base = torch.zeros(n)
    x = 1.0 + torch.rand(n)
    x[_sampled_positions(n)] = 1e-3 * torch.rand(8192)
    keys = keys_of(base, x)
    k = n // 2
    top, (settled, missed) = _stats_delta(lambda: _select_one(base, x, k))
    assert missed == 1 and settled == 0
    assert top == ref_topset(keys, k)


def test_bracket_special_values(bracket_limit):
    bracket_limit(0)
    n = 131_101
    base = rand(n, torch.float32)
    x = near(base)
    x[17] = float("inf")
    x[5000] = float("nan")
    x[90_000] = -float("inf")
    base[123] = 1e-42
    x[123] = 0.0
    keys = keys_of(base, x)
    for k in (1, 2, 3, 4, n // 2, n - 2):
        assert _select_one(base, x, k) == ref_topset(keys, k), k


def test_bracket_in_a_batch_with_other_jobs(bracket_limit):
    """Bracketed, multi-k and small jobs in one call each get their own exact sets."""
    bracket_limit(0)
    jobs, refs = [], []
    for n, ks in [(100_003, [50_001]), (7, [3]), (90_001, [10, 80_000]), (70_001, [1])]:
        base = rand(n, torch.bfloat16, dup=True)
        x = near(base, dup=True)
        keys = keys_of(base, x)
        jobs.append(SelectJob(base, x, ks))
        refs.append([ref_topset(keys, k) for k in ks])
    assert cpu.select_top_many(jobs) == refs


# ----- the fused elect combine ----------------------------------------------------------------


def _elect_job(n, dt_in, dt_out, nmodels, masks, has_base, normalize, dup):
    base = rand(n, dt_in, dup=dup)
    xs = [near(base, dup=dup) for _ in range(nmodels)]
    mk = []
    for x, kind in zip(xs, masks):
        if kind == "all":
            mk.append(KeepAll())
        else:
            mk.append(KeepTop(cpu.select_top(base if has_base else None, x, [n // 3])[0]))
    coefs = [0.75, -0.5, 1.25, 2.0][:nmodels]
    weights = [1.0, 0.5, 2.0, 0.3][:nmodels]
    return CombineJob(poisoned(n, dt_out), base if has_base else None, xs, mk, coefs, weights,
                      "elect", normalize, 0.7)


@pytest.mark.parametrize("nmodels", [1, 2, 3, 4])
@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("has_base", [True, False], ids=["base", "nobase"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("dup", [False, True], ids=["rand", "dup"])
def test_fused_elect_is_bit_identical_to_the_general_path(nmodels, dt, has_base, normalize,
                                                          dup):
    masks = ("top", "all", "top", "all")[:nmodels]
    job = _elect_job(20_011, dt, torch.float32, nmodels, masks, has_base, normalize, dup)
    before = _C._combine_fused_elect(False)
    try:
        cpu.combine_many([job])
        general = job.out.clone()
        job.out.fill_(float("nan"))
        _C._combine_fused_elect(True)
        cpu.combine_many([job])
    finally:
        _C._combine_fused_elect(before)
    assert torch.equal(job.out.view(torch.int32), general.view(torch.int32))
    check_combine(job)


@pytest.mark.parametrize("dt_out", DTYPES, ids=DT_IDS)
def test_fused_elect_output_dtypes(dt_out):
    job = _elect_job(5 * 123 * 123, torch.bfloat16, dt_out, 3, ("top", "top", "all"), True, True,
                     False)
    cpu.combine_many([job])
    check_combine(job)


# ----- NaN/Inf counted in the kernels' own pass ------------------------------------------------


def _with_specials(t: torch.Tensor, where: list[int]) -> torch.Tensor:
    t = t.clone()
    for k, i in enumerate(where):
        t[i] = (float("nan"), float("inf"), -float("inf"))[k % 3]
    return t


def _true_counts(job: CombineJob) -> tuple[int, int]:
    b = torch.zeros(job.out.numel()) if job.base is None else job.base.float()
    deltas = sum(int((~torch.isfinite(x.float() - b)).sum()) for x in job.xs)
    return int((~torch.isfinite(job.out.float())).sum()), deltas


@pytest.mark.parametrize("masks", [("top", "all"), ("top", "all", "top"), ("band", "random"),
                                   ("all", "all")], ids=["fused2", "fused3", "general", "sum"])
@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
def test_combine_counts_nonfinite_outputs_and_deltas(masks, dt):
    from tests.test_cpu_primitives import _combine_job

    mode = "sum" if masks == ("all", "all") else "elect"
    n = 30_011
    job = _combine_job(n, dt, dt, len(masks), mode, False, masks)
    assert cpu.combine_many([job]) == [_true_counts(job)] == [(0, 0)]
    job.xs[0].copy_(_with_specials(job.xs[0], [5, 20_000]))
    job.base.copy_(_with_specials(job.base, [7]))
    job.out.fill_(float("nan"))
    (got,) = cpu.combine_many([job])
    want = _true_counts(job)
    assert got == want and want[1] >= 3 + len(masks) - 1


def test_combine_counts_a_finite_overflow_of_the_output_dtype():
    """Finite fp32 inputs whose merge exceeds fp16's range: the stored fp16 output is Inf."""
    base = torch.zeros(4097)
    x = torch.full((4097,), 40_000.0)
    out = poisoned(4097, torch.float16)
    job = CombineJob(out, base, [x, x], [KeepAll(), KeepAll()], [1.0, 1.0], [1.0, 1.0], "sum",
                     False, 1.0)
    assert cpu.combine_many([job]) == [(4097, 0)]


def test_lerp2_counts_nonfinite_outputs():
    from mergecore.backends.spec import Lerp2Job

    a = rand(70_001, torch.bfloat16)
    b = _with_specials(rand(70_001, torch.bfloat16), [3, 60_000])
    out = poisoned(70_001, torch.bfloat16)
    assert cpu.lerp2_many([Lerp2Job(out, a, b, 0.25, 0.75)]) == [2]


def test_merge_jobs_reports_the_kernels_counts():
    """composed.merge_jobs hands the C++ counts to its caller, so ops skips its own pass."""
    from mergecore import composed
    from mergecore.ops import make_job

    base = rand(50_000, torch.bfloat16)
    xs = [near(base) for _ in range(2)]
    bad = _with_specials(xs[1], [11])
    jobs = [make_job("ties", base, xs, weights=[1, 1], densities=[0.5, 0.5], name="good"),
            make_job("ties", base, [xs[0], bad], weights=[1, 1], densities=[0.5, 0.5],
                     name="bad"),
            make_job("slerp", base, [xs[0]], t=0.3, name="s")]
    counts = [composed.NonFiniteCounts() for _ in jobs]
    composed.merge_jobs(cpu, jobs, None, counts)
    assert (counts[0].output, counts[0].deltas) == (0, 0)
    assert counts[1].deltas == 1
    assert (counts[2].output, counts[2].deltas) == (0, None)
