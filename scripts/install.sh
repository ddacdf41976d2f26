#!/usr/bin/env bash
# Install everything dynasparse needs and build it from source, on a fresh machine or an
# existing one. Never replaces a torch that is already installed (GPU machines bring their
# own CUDA build); installs the CPU build torch==2.13.0 only where there is none.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet torch==2.13.0
fi
# setuptools >= 64 for editable installs of a package_dir layout; ninja drives both compilers.
"$PYTHON" -m pip install --quiet "setuptools>=64" wheel ninja
# --no-build-isolation: build against the torch installed above, not one fetched for the build.
"$PYTHON" -m pip install --quiet --no-build-isolation -e ".[test]"
