"""pytest-benchmark suite: every merge kernel at the preset's LLaMA tensor shapes, per backend,
next to torch eager (``pytest bench/test_bench_kernels.py --benchmark-only``)."""

from __future__ import annotations

import pytest
import torch

from bench.conftest import DEVICE, SHAPE
from mergecore.benchmark import kernels, shapes

DTYPE = torch.bfloat16
BACKENDS = kernels.default_backends(DEVICE)
IMPLS = [f"mergecore-{b}" for b in BACKENDS] + ["torch-eager"]


@pytest.fixture(scope="module", params=sorted(shapes.kernel_shapes(SHAPE)))
def inputs(request):
    shape = shapes.kernel_shapes(SHAPE)[request.param]
    base, xs = kernels.make_inputs(shape, DTYPE, DEVICE)
    return request.param, shape, base, xs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("method", kernels.METHODS)
def test_kernel(benchmark, record, inputs, method, impl):
    label, shape, base, xs = inputs
    if impl == "torch-eager":
        fn = kernels.eager_fn(method, base, xs)
        if fn is None:
            pytest.skip(f"no eager form of {method}")
    else:
        fn = kernels.mergecore_fn(method, base, xs, impl.removeprefix("mergecore-"))

    def run():
        fn()
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()

    benchmark.group = f"{method} {SHAPE} {label}"
    record("kernels-suite", op=method, backend=impl, shape=f"{SHAPE}:{label}:{list(shape)}",
           dtype="bfloat16", nbytes=kernels.bytes_moved(method, base.numel(), base.element_size()))
    benchmark.pedantic(run, rounds=3 if SHAPE == "tiny" else 5, warmup_rounds=1)
