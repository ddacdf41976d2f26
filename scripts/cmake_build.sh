#!/usr/bin/env bash
# Build the C++ library (libdynasparse.so, no Python module) with CMake against the
# installed torch, e.g.  scripts/cmake_build.sh -DDYNASPARSE_CUDA=OFF -DCMAKE_INSTALL_PREFIX=/opt/ds
# Extra arguments go to the configure step; install with `cmake --install "$BUILD_DIR"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUILD_DIR=${BUILD_DIR:-cmake-build/release}

prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" "$@"
cmake --build "$BUILD_DIR"
echo "built $BUILD_DIR/libdynasparse.so"
