"""Build of mergecore's C++ CPU kernels: one pybind11 extension, ``mergecore._C``.

The metadata lives in pyproject.toml; this file only describes the extension. It builds
with ``pip install .``, ``pip install -e .`` and ``python setup.py build_ext --inplace``.

Flags: ``-O3`` and ``-ffp-contract=off`` (no fused multiply-add contraction, so every
instruction-set clone computes bit-identical results); no ``-march=native``: the hot loops
carry ``target_clones`` (AVX-512 as x86-64-v4, AVX2, baseline) chosen at load time, so the
binary stays portable.
OpenMP (``-fopenmp``) is used when the compiler supports it; otherwise the kernels run on one
thread. ``MERGECORE_BUILD_JOBS`` sets the number of parallel compile jobs (default: all CPUs).
``MERGECORE_NO_OPENMP=1`` builds without OpenMP. ``MERGECORE_CPU_TARGETS`` chooses the clones
(``_clone_macros``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

ParallelCompile("MERGECORE_BUILD_JOBS", default=0).install()

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(os.path.relpath(p, HERE) for p in glob(os.path.join(HERE, "csrc", "*.cpp")))
# the headers: an edit to one rebuilds the module (build_ext compares only sources otherwise)
HEADERS = sorted(os.path.relpath(p, HERE) for p in glob(os.path.join(HERE, "csrc", "*.h")))
BASE_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]


def _compiler_accepts(compiler, flags: list[str]) -> bool:
    """True if the compiler builds and links a tiny OpenMP program with ``flags``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=flags)
        except Exception:  # noqa: BLE001 - any failure means "not supported"
            return False
    return True


def _clone_macros() -> list[tuple[str, str]]:
    """``MERGECORE_CPU_TARGETS`` (e.g. ``avx2,default``; ``default`` must be one of them): the
    instruction-set clones of the hot loops, instead of csrc/common.h's own (x86-64-v4, avx2,
    default). scripts/test-cpu-clones.sh builds such a copy to test the AVX2 clone."""
    targets = [t.strip() for t in os.environ.get("MERGECORE_CPU_TARGETS", "").split(",")]
    targets = [t for t in targets if t]
    return [("MC_CPU_TARGETS", ",".join(f'"{t}"' for t in targets))] if targets else []


class BuildExt(build_ext):
    """pybind11's build_ext plus an OpenMP probe."""

    def build_extensions(self) -> None:
        use_omp = (
            sys.platform != "win32"
            and os.environ.get("MERGECORE_NO_OPENMP", "0") != "1"
            and _compiler_accepts(self.compiler, ["-fopenmp"])
        )
        for ext in self.extensions:
            if use_omp:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
            else:
                print("mergecore: building without OpenMP (kernels run single-threaded)")
        super().build_extensions()


ext_modules = [
    Pybind11Extension(
        "mergecore._C",
        SOURCES,
        depends=HEADERS,
        include_dirs=["csrc"],
        define_macros=_clone_macros(),
        extra_compile_args=list(BASE_FLAGS),
        cxx_std=17,
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
