"""The tensor API's arguments: what it accepts, what it refuses (and how it says so), on the
C++ and the reference backend. Results are compared with formulas written here in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mergecore
from mergecore import ops
from mergecore.errors import MergeError, MergeTypeError, NonFiniteError

NAN = float("nan")
BACKENDS = ["cpu", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("MERGECORE_BACKEND", request.param)
    return request.param


def fresh(*shape, n=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for _ in range(n)]


def test_a_non_contiguous_out_is_written(backend):
    a, b, _ = fresh(8, 5)
    out = torch.full((5, 8), NAN).t()  # poisoned, and a transposed view
    job = ops.make_job("linear", None, [a, b], weights=[1.0, 3.0])
    got = ops.merge_many([job], outs=[out], backend=backend)[0]
    assert got is out
    want = (a.double() + 3 * b.double()) / 4
    assert torch.allclose(out.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [torch.zeros(64), torch.zeros(8, 5, dtype=torch.float16)],
                         ids=["shape", "dtype"])
def test_an_out_that_does_not_fit_is_refused_naming_it(backend, bad):
    a, b, _ = fresh(8, 5)
    job = ops.make_job("linear", None, [a, b], weights=[1.0, 1.0], name="w")
    with pytest.raises(MergeError, match=r"tensor 'w': outs\[0\] is .* the merge gives \(8, 5\)"):
        ops.merge_many([job], outs=[bad], backend=backend)
    with pytest.raises(MergeError, match="outs has 2 tensors for 1 jobs"):
        ops.merge_many([job], outs=[bad, bad], backend=backend)


@pytest.mark.parametrize("call,what", [
    (lambda base, a, b: mergecore.ties(base, [a, b], [NAN, 1.0], 0.5), r"weight\[0\] is nan"),
    (lambda base, a, b: mergecore.ties(base, [a, b], [1.0, 1.0], NAN), "density is nan"),
    (lambda base, a, b: mergecore.dare_linear(base, [a, b], [1.0, 1.0], [0.5, NAN]),
     r"density\[1\] is nan"),
    (lambda base, a, b: mergecore.breadcrumbs(base, [a, b], [1.0, 1.0], 0.5, math.inf),
     "gamma is inf"),
    (lambda base, a, b: mergecore.slerp(a, b, NAN), "t is nan"),
    (lambda base, a, b: mergecore.task_arithmetic(base, [a], [1.0], lambda_=NAN),
     "lambda is nan"),
    (lambda base, a, b: mergecore.passthrough(a, scale=-math.inf), "scale is -inf"),
], ids=["ties-weight", "ties-density", "dare-density", "breadcrumbs-gamma", "slerp-t",
        "lambda", "scale"])
def test_a_parameter_that_is_not_finite_is_refused_naming_it(backend, call, what):
    base, a, b = fresh(40, 3)
    with pytest.raises(MergeError, match=f"tensor 'tensor': {what}, not a finite number"):
        call(base, a, b)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "breadcrumbs_ties"])
def test_a_negative_density_is_refused(backend, method):
    base, a, b = fresh(40, 3)
    with pytest.raises(MergeError, match=r"density\[1\] is -0.25, a density is at least 0"):
        getattr(mergecore, method)(base, [a, b], [1.0, 1.0], [0.5, -0.25])


def test_slerp_of_a_nan_input_names_the_input(backend):
    a, b, _ = fresh(33, 7)
    b[3, 2] = NAN
    with pytest.raises(NonFiniteError, match=r"tensors\[0\] has 1 NaN/Inf value"):
        mergecore.slerp(a, b, 0.4)


def test_slerp_of_huge_finite_inputs_matches_float64(backend):
    """a.a of elements near 1e20 overflows a float32 sum; the angle comes out right anyway."""
    a, b, _ = (x * 1e20 for x in fresh(129, 31, seed=3))
    got = mergecore.slerp(a, b, 0.3).double()
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    dot = float(x @ y) / math.sqrt(float(x @ x) * float(y @ y))
    theta = math.acos(dot)
    want = (math.sin(0.7 * theta) * x + math.sin(0.3 * theta) * y) / math.sin(theta)
    assert torch.allclose(got.reshape(-1), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_outputs_are_new_tensors_without_autograd(backend):
    base, a, b = (x.requires_grad_() for x in fresh(6, 4))
    x64 = torch.randn(5, dtype=torch.float64)
    outs = [mergecore.linear([a, b], [1.0, 2.0]), mergecore.slerp(a, b, 0.5),
            mergecore.ties(base, [a, b], [1.0, 1.0], 0.5), mergecore.passthrough(a),
            mergecore.passthrough(x64)]
    assert all(not o.requires_grad and o.grad_fn is None for o in outs)
    assert outs[-1] is not x64 and outs[-1].data_ptr() != x64.data_ptr()
    assert torch.equal(outs[-1], x64)


@pytest.mark.parametrize("make,match", [
    (lambda a, b: mergecore.linear([a, b], [1, 1], out_dtype=torch.int32),
     "out_dtype torch.int32 is not supported"),
    (lambda a, b: mergecore.linear([a, b], [1, 1], out_dtype="float4"), "unknown dtype"),
    (lambda a, b: mergecore.linear([a.to(torch.float8_e4m3fn), b], [1, 1]),
     r"tensors\[0\] has dtype torch.float8_e4m3fn"),
    (lambda a, b: mergecore.linear([a, b.int()], [1, 1]), r"tensors\[1\] has dtype torch.int32"),
    (lambda a, b: mergecore.linear([a, "b"], [1, 1]), r"tensors\[1\] is a str, not a tensor"),
    (lambda a, b: mergecore.linear([a, b], "0.5"), "weight must be a number or one number"),
], ids=["int-out", "unknown-out", "float8", "int-input", "str-input", "str-weight"])
def test_arguments_of_the_wrong_kind_are_type_errors(make, match):
    a, b, _ = fresh(6, 4)
    with pytest.raises(MergeTypeError, match=match) as info:
        make(a, b)
    assert isinstance(info.value, TypeError) and isinstance(info.value, MergeError)


def test_a_float64_output_is_the_reference_backends_whatever_the_inputs(backend):
    a, b = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    out = mergecore.linear([a, b], [1.0, 1.0], out_dtype="float64")
    assert out.dtype == torch.float64 and torch.allclose(out, (a + b) / 2)
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    out = mergecore.linear([a16, b16], [1.0, 2.0], out_dtype=torch.float64)
    assert torch.equal(out, (a16.double() + 2 * b16.double()) / 3)  # float64 math, no rounding
    job = ops.make_job("linear", None, [a16, b16], weights=[1.0, 1.0], out_dtype="float64")
    with pytest.raises(MergeTypeError, match="backend 'cpu' reads and writes bfloat16"):
        ops.merge_many([job], backend="cpu")


def test_meta_tensors_and_shape_mismatches_name_the_input():
    a, b, base = fresh(6, 4)
    with pytest.raises(MergeError, match=r"tensors\[0\] is on the meta device"):
        mergecore.linear([a.to("meta"), b.to("meta")], [1.0, 1.0])
    with pytest.raises(MergeError, match=r"tensors\[1\] has shape \(3,\), base has \(6, 4\)"):
        mergecore.task_arithmetic(base, [a, torch.randn(3)], [1.0, 1.0])


@pytest.mark.parametrize("weight", [0.5, np.float32(0.5), np.float64(0.5), torch.tensor(0.5),
                                    np.array(0.5), [0.5, 0.5], np.array([0.5, 0.5]),
                                    torch.tensor([0.5, 0.5])], ids=lambda w: type(w).__name__)
def test_weights_may_be_numbers_of_any_kind_or_one_per_model(backend, weight):
    a, b, _ = fresh(9, 2)
    got = mergecore.linear([a, b], weight, normalize=False)
    assert torch.allclose(got.double(), 0.5 * a.double() + 0.5 * b.double(), atol=1e-6)


def test_batched_per_merge_values_may_be_a_tensor_and_lengths_must_agree(backend):
    a1, b1, a2 = fresh(5, 3)
    got = ops.slerp_batched([a1, a2], [b1, b1], torch.tensor([0.0, 1.0]))
    assert torch.equal(got[0], a1) and torch.equal(got[1], b1)
    with pytest.raises(MergeError, match="3 tensors a and 2 tensors b"):
        ops.slerp_batched([a1, a2, a1], [b1, b1], 0.3)
    with pytest.raises(MergeError, match="'names' has 1 entries for 2 merges"):
        ops.batched("linear", None, [[a1, b1], [a2, b1]], weights=[1.0, 1.0], names=["x"])
    with pytest.raises(MergeError, match="'bases' has 1 entries for 2 merges"):
        ops.batched("task_arithmetic", [a1], [[b1], [a2]], weights=[1.0])


def test_linear_normalize_refuses_weights_that_cancel_not_weights_that_are_small(backend):
    a, b, c = fresh(4, 4)
    got = mergecore.linear([a, b], [1e-9, 3e-9])
    assert torch.allclose(got.double(), (a.double() + 3 * b.double()) / 4, atol=1e-6)
    with pytest.raises(MergeError, match="non-zero weight sum"):
        mergecore.linear([a, b, c], [0.1, 0.2, -0.3])
    with pytest.raises(MergeError, match="non-zero weight sum"):
        mergecore.linear([a, b], [0.0, 0.0])
