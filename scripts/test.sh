#!/usr/bin/env bash
# Install mergecore with its test dependencies (building the C++ kernels), then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
python3 -m ruff check .
python3 -m pytest -q -p no:cacheprovider "$@"
# where the suite ran the kernels' AVX-512 clones, also test the AVX2 ones (a second build)
bash scripts/test-cpu-clones.sh
