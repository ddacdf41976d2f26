#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU and its own torch and Triton (never reinstalled;
# nothing is fetched), build for that GPU only, run the GPU-marked tests, then time the
# benchmark cases that the issues' GPU targets name. One call of at most 8 minutes end to
# end on an H100/H200, within a 15-minute device lease that includes the machine's start.
#
#   scripts/gpu_check.sh           the check above
#   scripts/gpu_check.sh --full    the whole test suite and every benchmark case on the GPU,
#                                  for a machine with more time (budget 40 minutes)
#
# Each step writes its log or JSON as soon as it ends, into $OUT where the device tool runs
# it (so a run killed at its limit still returns every step it finished), else into
# benchmarks/results/; <gpu>-<date> prefixes every name:
#   -check.log     what this script prints: versions, backends, each step's time and exit
#   -build.log     the build;  -tests.log  pytest, one line per test
#   -matmul-targets.json / -targets.json / -nn-targets.json   the benchmark steps (--full:
#   -matmul.json / .json / -nn.json, the whole grids)
# Every step gets a time limit, shortened where needed to what is left of the total budget
# (GPU_CHECK_BUDGET_S seconds, default 470; --full 2400) minus the time reserved for the
# steps after it; a step that would get too little is skipped and says so.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
full=0
case "${1:-}" in
  "") ;;
  --full) full=1 ;;
  *) echo "usage: scripts/gpu_check.sh [--full]" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
budget_s=${GPU_CHECK_BUDGET_S:-$(( full ? 2400 : 470 ))}
# After a step's limit it gets SIGINT (pytest and the bench print what they have), then
# SIGKILL this much later: part of each step's time.
grace_s=10

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device here; nothing to check" >&2
  exit 1
fi
gpu=$("$PYTHON" -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
dest=${OUT:-benchmarks/results}
mkdir -p "$dest"
stem="$dest/${gpu}-$(date +%Y-%m-%d)"
# The device tool returns at most 8 files: no PNGs there (each JSON holds what they show).
plot=()
[ -n "${OUT:-}" ] && plot=(--no-plot)
# Everything printed goes to the check log as it is printed; fd 3 keeps reaching it while a
# step's own output goes to the step's log; fd 4 is the terminal, for the end.
exec 4>&1 > >(tee -a "$stem-check.log") 2>&1 3>&1
tee_pid=$!
# The last lines reach the log before the script ends (and the device tool collects $OUT).
trap 'exec 1>&4 2>&4 3>&-; wait "$tee_pid"' EXIT

status=0
note() { echo "gpu_check [$(( SECONDS ))s] $*" >&3; }

# step NAME LIMIT_S RESERVE_S COMMAND...: runs COMMAND for at most LIMIT_S seconds, or less
# so that RESERVE_S seconds of the budget stay for the steps after it.
step() {
  local name=$1 limit=$2 reserve=$3
  shift 3
  local left=$(( budget_s - SECONDS - reserve - grace_s ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then
    note "$name: SKIPPED, ${left}s of the budget left"
    status=1
    return 1
  fi
  note "$name: started (limit ${limit}s)"
  local begin=$SECONDS rc
  timeout -s INT -k "$grace_s" "$limit" "$@"
  rc=$?
  case $rc in
    0) note "$name: ok after $(( SECONDS - begin ))s" ;;
    124|130|137) note "$name: TIMED OUT after $(( SECONDS - begin ))s (exit $rc)"; status=1 ;;
    *) note "$name: FAILED with exit $rc after $(( SECONDS - begin ))s"; status=1 ;;
  esac
  return $rc
}

note "budget ${budget_s}s, results in $stem-*"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

# This GPU's architecture only: a third of the CUDA compile time of the default list.
arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if ! step build 200 $(( full ? 600 : 260 )) env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" \
    DYNASPARSE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PYTHON" -m pip install -v --no-build-isolation --no-deps --no-index -e . > "$stem-build.log" 2>&1; then
  tail -40 "$stem-build.log"
  note "build failed: nothing else can run"
  exit 1
fi
grep "dynasparse build" "$stem-build.log"
"$PYTHON" -m dynasparse info || status=1

# Triton compiles every kernel specialization on first use: spread that over the cores.
workers=()
"$PYTHON" -c "import xdist" 2>/dev/null && workers=(-n "$(( $(nproc) > 12 ? 12 : $(nproc) ))")
per_test=()
"$PYTHON" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 120)
# A test module importing a package this machine lacks fails alone, not the whole run.
pytest_args=(-v -rfE -p no:cacheprovider --continue-on-collection-errors "${workers[@]}" "${per_test[@]}")
if (( full )); then
  step tests 1200 600 "$PYTHON" -m pytest tests "${pytest_args[@]}" > "$stem-tests.log" 2>&1
else
  step tests 170 150 "$PYTHON" -m pytest tests -m gpu "${pytest_args[@]}" > "$stem-tests.log" 2>&1
fi
grep -E "^(FAILED|ERROR) |^=+ .*(passed|failed|error|interrupted|no tests ran).* =+$|KeyboardInterrupt" \
  "$stem-tests.log" | tail -40

bench() {
  local name=$1 limit=$2 reserve=$3 target=$4 out=$5
  shift 5
  step "$name" "$limit" "$reserve" "$PYTHON" -m dynasparse bench --device cuda --target-s "$target" --no-progress \
    "${plot[@]}" --out "$out" "$@"
}
if (( full )); then
  bench bench-matmul 900 300 0.15 "$stem-matmul.json" --family matmul
  bench bench-kernels 300 120 0.5 "$stem.json" --family bitmask --family topk --family optim
  bench bench-nn 300 0 0.15 "$stem-nn.json" --family nn
else
  # Issue 3's GPU targets (bf16, x 8192 x 4096, w 4096 x 4096): block 64 at 90% against
  # cuBLAS and, at every sparsity, against torch's bsr_dense_mm; the fused bitmask kernel
  # at 90% against dense and against materializing w * m; block 32 at 90% and 2:4 (50%);
  # both backward products at 90%; the CUDA C++ SpMM at 95% in fp32 (14 cases).
  bench bench-matmul 110 80 0.2 "$stem-matmul-targets.json" --filter \
    '^matmul/(forward-(unstructured|block32|block64)-s0\.9|forward-2:4-s0\.5|forward-block64-s0\.(5|7|8|95|98)|(grad_input|sddmm)-(unstructured|block64)-s0\.9)-b8192-bfloat16$|^matmul/forward-unstructured-s0\.95-b8192-float32$'
  # Issue 4: top-k of 100M scores and ResNet-50's global selection; issue 5: the fused
  # optimizer steps over 25M parameters (bandwidth); issue 2: mask packing at 4096 x 4096.
  bench bench-kernels 60 30 0.2 "$stem-targets.json" --filter \
    '^(topk/topk_mask-100M-vs-topk|topk/topk_mask_global-resnet50-vs-cat-topk|optim/.*-25M-50t|bitmask/(un)?pack_mask-4096x4096-s0\.9)$'
  # Issue 6: SparseLinear(4096, 4096) inference and training steps, the 3x3 convolution.
  bench bench-nn 40 0 0.2 "$stem-nn-targets.json" --filter '^nn/(linear4096-.*|conv3x3-256ch-32px-b8-s0\.9)$'
fi

note "done, exit $status; results: $(cd "$dest" && ls "$(basename "$stem")"* | tr '\n' ' ')"
exit $status
