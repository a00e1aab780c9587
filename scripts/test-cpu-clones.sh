#!/usr/bin/env bash
# On a CPU with AVX-512 the test suite runs the C++ kernels' AVX-512 clones; CPUs without it run
# the AVX2 ones. This builds a second copy of the extension with only the AVX2 and baseline
# clones (MERGECORE_CPU_TARGETS) and runs the CPU kernel tests against that copy, so both are
# tested here. On a CPU without AVX-512 there is nothing more to test.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  echo "test-cpu-clones: no AVX-512 on this CPU: the suite already ran the AVX2 clones"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
MERGECORE_CPU_TARGETS="avx2,default" python3 setup.py -q build_ext \
  --build-lib "$work/lib" --build-temp "$work/tmp" > "$work/build.log" 2>&1 \
  || { cat "$work/build.log"; exit 1; }
mkdir "$work/pkg"
cp -r mergecore tests pyproject.toml "$work/pkg/"
rm -f "$work/pkg/mergecore"/_C*.so
cp "$work/lib/mergecore"/_C*.so "$work/pkg/mergecore/"
cd "$work/pkg"  # python -m puts the working directory first on the path: the copy is imported
python3 -c 'from mergecore import _C; assert _C.CPU_TARGETS == "\"avx2\",\"default\"", _C.CPU_TARGETS'
python3 -m pytest -q -p no:cacheprovider tests/test_cpu_primitives.py \
  tests/test_cpu_fast_paths.py tests/test_ops_vs_reference.py "$@"
