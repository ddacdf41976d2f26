#!/usr/bin/env bash
# Install everything dynasparse needs and build it from source, on a fresh machine or an
# existing one. Never replaces a torch that is already installed (GPU machines bring their
# own CUDA build); installs the CPU build torch==2.13.0 only where there is none.
#
# A re-run is quick: when pip installed everything for this checkout before and nothing it
# depends on changed (scripts/install_state.py says what is checked), pip is skipped and
# only the native library is brought up to date, compiling just the changed files in
# build/temp/ (nothing at all when no source changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# setuptools >= 64 for editable installs of a package_dir layout; ninja drives both compilers.
BUILD_REQUIREMENTS=("setuptools>=64" wheel ninja)

if "$PYTHON" scripts/install_state.py check "${BUILD_REQUIREMENTS[@]}"; then
  "$PYTHON" setup.py --quiet build_ext --inplace
  exit 0
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet torch==2.13.0
fi
"$PYTHON" -m pip install --quiet "${BUILD_REQUIREMENTS[@]}"
# --no-build-isolation: build against the torch installed above, not one fetched for the build.
"$PYTHON" -m pip install --quiet --no-build-isolation -e ".[test]"
"$PYTHON" scripts/install_state.py record
