#!/usr/bin/env bash
# Install, build, then the main job: what is built and usable here, and a quick benchmark
# of every kernel family against dense PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
scripts/install.sh
"$PYTHON" -m dynasparse info
echo
"$PYTHON" -m dynasparse bench --quick
