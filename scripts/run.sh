#!/usr/bin/env bash
# Install, build, then the main job: what is built and usable here, and the sparse-training
# demo (dense, one-shot and gradual magnitude pruning, DPF and RigL on a 1-D CNN on MNIST-1D,
# then sparse vs dense speed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
scripts/install.sh
"$PYTHON" -m dynasparse info
echo
"$PYTHON" -m dynasparse demo "$@"
