#!/usr/bin/env bash
# Install, build, then the main job: what is built and usable here, and the sparse-training
# demo (dense, magnitude pruning and DPF on a small CNN, then sparse vs dense speed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
scripts/install.sh
"$PYTHON" -m dynasparse info
echo
"$PYTHON" -m dynasparse demo "$@"
