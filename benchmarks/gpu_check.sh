#!/usr/bin/env bash
# Everything that needs a GPU, in one go, with random weights (nothing is downloaded; about 5-7 minutes on one
# GPU): the CUDA-marked tests, then benchmarks/gpu_check.py (batch invariance in bf16, in-place neuron order,
# LLaVA-1.5-7B-size timing, and the 7B model at a 12 GiB budget with FFN originals offloaded to pinned CPU memory,
# dense against CoreMatching). The tables go to $1 (default benchmarks/results/gpu_check.md).
#   benchmarks/gpu_check.sh [output.md]            PYTHON=... to use another interpreter than .venv/bin/python
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-benchmarks/results/gpu_check.md}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
echo "== CUDA-marked tests"
"$PY" -m pytest tests -q -k cuda -p no:cacheprovider 2>&1 | tee /tmp/gpu_check_tests.log | tail -5
summary=$(grep -E "passed|failed|skipped|error" /tmp/gpu_check_tests.log | tail -1)
echo "== checks and timings"
"$PY" benchmarks/gpu_check.py --output "$OUT" --note "CUDA-marked tests (pytest -k cuda): ${summary:-not run}"
