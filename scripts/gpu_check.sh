#!/usr/bin/env bash
# On a machine with a CUDA GPU: build from source against the torch already there (never
# reinstalled; nothing is fetched), run the whole test suite with the GPU tests enabled, run
# the benchmarks on the GPU, and write benchmarks/results/<gpu>-<date>.json (+ .png, and the
# test log beside it). Meant to finish inside ten minutes. Where the device tool runs it,
# the results are also copied to $OUT so they come back.
set -uo pipefail
cd "$(dirname "$0")/.."
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

echo "== tests"
# The GPU image has pytest-xdist: Triton compiles every kernel specialization for real on
# first use, so spread that over the CPU cores.
parallel=()
"$PYTHON" -c "import xdist" 2>/dev/null && parallel=(-n 8)
timeout 300 "$PYTHON" -m pytest tests -q -p no:cacheprovider "${parallel[@]}" 2>&1 | tee "$stem-tests.log" | tail -30
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== benchmarks"
timeout 200 "$PYTHON" -m dynasparse bench --device cuda --target-s 0.5 --no-progress --out "$stem.json" || status=1

if [ -n "${OUT:-}" ]; then
  cp "$stem"* "$OUT"/ 2>/dev/null || true
fi
echo "gpu_check: wrote $stem.json (exit $status)"
exit $status
