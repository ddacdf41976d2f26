#!/usr/bin/env bash
# On a machine with a CUDA GPU: build from source against the torch already there (never
# reinstalled; nothing is fetched), run the whole test suite with the GPU tests enabled, run
# the benchmarks on the GPU, and write benchmarks/results/<gpu>-<date>.json (+ .png, and the
# test log beside it). Where the device tool runs it, the results are also copied to $OUT so
# they come back. Each part fits one ten-minute device call:
#   scripts/gpu_check.sh tests     build + the test suite
#   scripts/gpu_check.sh bench     build (a no-op when built) + every benchmark family
#   scripts/gpu_check.sh           both (about 12 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
case "$part" in tests|bench|all) ;; *) echo "usage: scripts/gpu_check.sh [tests|bench|all]" >&2; exit 2;; esac
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device here; nothing to check" >&2
  exit 1
fi
gpu=$("$PYTHON" -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
stem="benchmarks/results/${gpu}-$(date +%Y-%m-%d)"
mkdir -p benchmarks/results
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

status=0
echo "== build"
# The build targets this GPU only, to keep the check short; CI compiles the default list.
arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if ! TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" DYNASPARSE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
    "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . > "$stem-build.log" 2>&1; then
  tail -40 "$stem-build.log"; echo "gpu_check: build failed" >&2; exit 1
fi
grep "dynasparse build" "$stem-build.log" || true
"$PYTHON" -m dynasparse info

if [ "$part" != bench ]; then
  echo "== tests"
  # The GPU image has pytest-xdist: Triton compiles every kernel specialization for real on
  # first use, so spread that over the CPU cores.
  parallel=()
  "$PYTHON" -c "import xdist" 2>/dev/null && parallel=(-n 8)
  timeout 360 "$PYTHON" -m pytest tests -q -p no:cacheprovider "${parallel[@]}" 2>&1 | tee "$stem-tests.log" | tail -30
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if [ "$part" != tests ]; then
  echo "== benchmarks"
  timeout 150 "$PYTHON" -m dynasparse bench --device cuda --target-s 0.5 --no-progress --out "$stem.json" \
    --family bitmask --family topk --family optim || status=1
  # The masked matmul grid is large: shorter measurements, its own file.
  timeout 330 "$PYTHON" -m dynasparse bench --device cuda --target-s 0.15 --no-progress --out "$stem-matmul.json" \
    --family matmul --family nn || status=1
fi

if [ -n "${OUT:-}" ]; then
  cp "$stem"* "$OUT"/ 2>/dev/null || true
fi
echo "gpu_check: wrote $stem.json (exit $status)"
exit $status
