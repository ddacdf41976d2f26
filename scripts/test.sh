#!/usr/bin/env bash
# Install, build, and run the whole test suite (CPU kernels, CUDA kernels built but not run
# without a GPU, Triton interpreted on CPU and compiled ahead of time for sm_80/sm_90), then
# the benchmark suite once as a smoke test (timings disabled).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
scripts/install.sh
"$PYTHON" -m pytest tests "$@"
"$PYTHON" -m pytest benchmarks --benchmark-disable -q
