#!/usr/bin/env bash
# Run on a lent GPU machine (the device tool), from the repository root, with .whl carried:
#   bash bench/device_run.sh [tests] [kernels] [e2e] [bench] [suite]
# Installs the carried wheels (mergekit and what it needs), builds the C++ extension, then
# runs the kernel benchmark on CUDA and the end-to-end 1B-family benchmark with --cuda, both
# next to mergekit in the same run. Everything it prints and writes lands in $OUT.
set -euo pipefail
OUT=${OUT:-/tmp/mergecore-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
python3 setup.py build_ext --inplace -q > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
echo "commit ${MERGECORE_GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" | tee -a "$OUT/device.txt"
steps=${*:-tests kernels e2e}
for step in $steps; do
  case $step in
    tests)
      # The compiled Triton kernels against the float64 reference (CUDA tensors).
      python3 -m pytest -q -p no:cacheprovider tests/test_triton_primitives.py \
        tests/test_ops_vs_reference.py -k "triton or cuda" 2>&1 | tee "$OUT/tests.txt" || true ;;
    kernels)
      python3 -m bench.kernels --device cuda --elements 64M --repeats 20 \
        --results kernels-gpu.jsonl 2>&1 | tee "$OUT/kernels.txt"
      cp bench/results/kernels-gpu.jsonl "$OUT/" ;;
    e2e)
      python3 -m bench.e2e --device cuda --params 1b --methods ties,linear,slerp \
        --dir /tmp/mergecore-bench --max-memory 4GiB --results e2e-gpu.jsonl 2>&1 | tee "$OUT/e2e.txt"
      cp bench/results/e2e-gpu.jsonl "$OUT/" ;;
    bench)
      # `mergecore bench` on 70B-shaped layers: roofs (file, H2D/D2H/D2D), kernels, ties with
      # --cuda next to mergekit --cuda, and the projection of the 80-layer merge (2 and 4 layers:
      # ~31 GB of disk at the 4-layer step).
      python3 -m mergecore bench /tmp/mergecore-bench --device cuda --shape llama-70b --layers 2 \
        --project --vs mergekit --max-memory 8GiB --json "$OUT/bench-70b-cuda.json" 2>&1 \
        | tee "$OUT/bench.txt" ;;  # the chart lands next to the JSON
    suite)
      python3 -m pytest -q -p no:cacheprovider bench/ --benchmark-only 2>&1 | tail -40 \
        | tee "$OUT/suite.txt"
      cp bench/results/kernels-suite.jsonl bench/results/e2e-suite.jsonl "$OUT/" ;;
  esac
done
