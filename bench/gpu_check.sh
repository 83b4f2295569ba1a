#!/usr/bin/env bash
# The GPU check, one command: CUDA test suite, real-size parity, and the benchmark table.
#   bench/gpu_check.sh OUT_DIR [--wheels DIR]
# --wheels DIR installs missing packages from wheels, for machines without registry access: beside
# torch, triton, numpy and pytest, cpkernels needs tensorly and tqdm. Tests that need scikit-learn,
# matplotlib or pytest-benchmark skip themselves when those are missing.
# Writes OUT_DIR/tests.log, OUT_DIR/gpu_bench.json and OUT_DIR/gpu_bench.md; each benchmark row records
# the GPU plan's modeled choice and times beside what its measured mode chose and timed for that row.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu_check.sh OUT_DIR [--wheels DIR]}
shift
wheels=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
if [ -n "$wheels" ]; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY'
import torch, triton
assert torch.cuda.is_available(), "no CUDA device"
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | cuDNN {torch.backends.cudnn.version()}")
PY
set +e
# The benchmark first: it is what only a GPU can give. It writes its files after every layer, so a
# run cut short by the time limit keeps what it measured. Its planned rows run the GPU plan's measured
# mode (the default, named here so that a CPKERNELS_GPU_PLAN=model left in the shell cannot hide it).
CPKERNELS_GPU_PLAN=measure timeout 220 python3 -m bench.gpu_bench --out "$out"
bench_rc=$?
# The compile report is a CPU-side check (CI runs it); the GPU's time goes to real launches. Each tile
# is a compile of seconds, so the suite takes the first fitting tile (CPKERNELS_AUTOTUNE=0) and
# test_every_tile_matches_oracle runs every tile once; with pytest-xdist, four workers compile at once.
# The suite's layers follow the GPU plan's model (as tests/conftest.py pins the CPU plan to its cost
# rule): the measured mode would compile and time several strategies for every new call signature of
# every test; its own tests turn it on, and the benchmark above runs it at real sizes.
parallel=""
if python3 -c "import xdist" 2>/dev/null; then parallel="-n 4"; fi
CPKERNELS_GPU_PLAN=model CPKERNELS_AUTOTUNE=0 timeout 240 python3 -m pytest tests -q $parallel \
  --deselect tests/test_aot.py \
  -p no:cacheprovider --durations=15 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
echo "gpu_bench exit $bench_rc, tests exit $tests_rc"
[ "$bench_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ]
