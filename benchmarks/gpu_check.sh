#!/usr/bin/env bash
# Everything GPU-side in one call, on a GPU host with torch + CUDA toolkit (no MLOps stack needed):
#   1. environment (GPU, driver, torch, nvcc)
#   2. build the fused sampler (JIT, cached in $TASN_OPS_CACHE) and check it is available
#   3. the sampler op tests: tests/test_ops*.py (CPU and GPU tests)
#   4. any other test marked `gpu` (collection errors of modules needing the MLOps stack are tolerated)
#   5. benchmarks/sampler.py  (table into $OUT/RESULTS.md, a copy of benchmarks/RESULTS.md)
#   6. benchmarks/train_step.py  if present (args: $TRAIN_STEP_ARGS)
#   7. benchmarks/details.py     if present (args: $DETAILS_ARGS, default: --results $OUT/RESULTS.md)
# Every step is timed; its log is $OUT/<step>.log, the summary $OUT/steps.txt. A failing step does not
# stop the later ones; the script exits 1 if any step failed. Nothing is installed: `python` from PATH
# runs the checkout through PYTHONPATH.
#   OUT=/tmp/gpu-out bash benchmarks/gpu_check.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TASN_OPS_CACHE="${TASN_OPS_CACHE:-/tmp/tasn-ops-cache}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
export OUT
failed=0
: > "$OUT/steps.txt"

step() {  # step NAME CMD...: run, log to $OUT/NAME.log, time it, record its exit status
  local name="$1"
  shift
  local t0 t1 rc
  echo "=== $name: $*"
  t0=$(date +%s.%N)
  set +e
  "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  t1=$(date +%s.%N)
  local cmd="${*//$'\n'/ }"
  printf '%-14s rc=%-3s %8.1f s  %s\n' "$name" "$rc" "$(awk "BEGIN {print $t1 - $t0}")" "${cmd:0:110}" | tee -a "$OUT/steps.txt"
  if [ "$rc" -ne 0 ]; then failed=1; fi
  return 0
}

step env bash -c 'nvidia-smi || true; nvcc --version || true; '"$PYTHON"' -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name())"'

step build "$PYTHON" -c '
import logging, time
logging.basicConfig(level=logging.INFO)
import tasn.ops as ops
t = time.time()
ops.load(required=True)
print(f"loaded in {time.time() - t:.1f} s")
assert ops.available(), ops.unavailable_reason()
'

step test-ops "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_ops*.py --junitxml="$OUT/test-ops.xml"

# Other areas' GPU tests. pytest exits 5 when nothing is selected: that is not a failure.
set +e
"$PYTHON" -m pytest -q -p no:cacheprovider -m gpu --continue-on-collection-errors --ignore-glob='tests/test_ops*.py' \
  tests > "$OUT/test-gpu-other.log" 2>&1
rc=$?
set -e
printf '%-14s rc=%-3s %s\n' "test-gpu-other" "$rc" "(pytest -m gpu, other areas; 5 = none selected)" | tee -a "$OUT/steps.txt"
tail -n 15 "$OUT/test-gpu-other.log"
if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then failed=1; fi

cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
step bench-sampler "$PYTHON" benchmarks/sampler.py --compiled --json "$OUT/sampler.json" --append "$OUT/RESULTS.md"

# Hooks for the other benchmarks: run when present, with their own arguments. details.py (3 models x
# 3 seeds from random weights, the demo's settings) writes its table into the copy under $OUT.
DETAILS_ARGS="${DETAILS_ARGS:---results $OUT/RESULTS.md}"
for bench in train_step details; do
  if [ -f "benchmarks/$bench.py" ]; then
    var="$(echo "$bench" | tr '[:lower:]' '[:upper:]')_ARGS"
    # shellcheck disable=SC2086
    step "bench-$bench" "$PYTHON" "benchmarks/$bench.py" ${!var:-}
  else
    printf '%-14s skipped: benchmarks/%s.py not present\n' "bench-$bench" "$bench" | tee -a "$OUT/steps.txt"
  fi
done

echo "=== summary ($OUT/steps.txt)"
cat "$OUT/steps.txt"
exit "$failed"
