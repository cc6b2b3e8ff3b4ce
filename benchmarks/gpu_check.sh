#!/usr/bin/env bash
# The GPU checks, split into calls that each fit one 600-second device command with margin, the most
# valuable first. Run them in this order, one call each, on a GPU host with torch and the CUDA toolkit
# (no MLOps stack needed: `python` from PATH runs the checkout through PYTHONPATH, nothing is installed):
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh check        1. environment, build, GPU tests  (H100: ~4 min)
#   OUT=/tmp/out bash benchmarks/gpu_check.sh sampler      2. error model on CUDA, sampler benchmark (~3 min)
#   OUT=/tmp/out bash benchmarks/gpu_check.sh train-step   3. train step vs its backbone bound, bf16 and fp32
#   OUT=/tmp/out bash benchmarks/gpu_check.sh details      4. the details benchmark (3 models x 3 seeds)
#   bash benchmarks/gpu_check.sh all                       every call in turn (a host without a time limit)
#
# Every call starts with the environment and the build; on a host that keeps build/ between calls the
# build is a cache hit (build/gpu-cache/, seconds). The build must give the CUDA kernels: without a CUDA
# toolkit on the host it is CPU-only, the `build` step fails saying so, the GPU tests fail with the reason
# and the benchmarks refuse to report a fused-op figure (never the reference's under the op's name).
# Each call has a time budget (CALL_BUDGET, default 540 s, under the 600 s command limit); each step runs
# under `timeout` within what is left, and a step that would start with under a minute left is skipped,
# so the call always ends and reports. Everything is written under $OUT as it goes: $OUT/<step>.log (the
# step's output, line by line), $OUT/steps.txt (one line per finished step: exit status, seconds),
# and the results (sampler.json, RESULTS-*.md, train-step-*.md, test-*.xml), so a call cut off keeps
# what it measured. The call exits 1 if any step failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
CALL="${1:-check}"
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TASN_OPS_CACHE="${TASN_OPS_CACHE:-$ROOT/build/gpu-cache/ops}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$ROOT/build/gpu-cache/inductor}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1 OUT
BUDGET="${CALL_BUDGET:-540}"
START=$SECONDS
failed=0
# --noconftest: tests/conftest.py loads the server fixtures, which import boto3 (absent on GPU hosts);
# the GPU tests need none of them.
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider --noconftest -rs)

step() {  # step NAME SECONDS CMD...: run under `timeout`, log to $OUT/NAME.log as it goes, record the result
  local name="$1" want="$2"
  shift 2
  local left=$((BUDGET - (SECONDS - START) - 10))
  if [ "$left" -lt 60 ]; then
    printf '%-16s skipped: %s s left of the %s s call budget\n' "$name" "$((left + 10))" "$BUDGET" | tee -a "$OUT/steps.txt"
    failed=1
    return 0
  fi
  local limit=$((want < left ? want : left)) t0=$SECONDS rc
  echo "=== $name (limit $limit s): $*"
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  local note=""
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note=" (timed out)"; fi
  printf '%-16s rc=%-3s %5s s%s  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$note" "$(echo "$*" | tr '\n' ' ' | cut -c1-100)" \
    | tee -a "$OUT/steps.txt"
  if [ "$rc" -ne 0 ]; then failed=1; fi
  return 0
}

environment() {
  step env 60 bash -c 'nvidia-smi; echo; nvcc --version || echo "nvcc: not on PATH"; echo; '"$PYTHON"' -c "
import torch
from tasn.ops import build
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else \"NONE (torch.cuda.is_available() is False)\"
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"device\", gpu)
home = build.cuda_home()
print(\"CUDA toolkit:\", home or \"NONE: the fused op can only be built CPU-only here\")
import importlib.util
lack = [m for m in (\"yaml\", \"tqdm\", \"PIL\", \"pandas\", \"pyarrow\") if importlib.util.find_spec(m) is None]
print(\"modules the details call needs and this host lacks:\", \", \".join(lack) or \"none\")
"'
  step build 300 "$PYTHON" -c '
import logging, sys, time
logging.basicConfig(level=logging.INFO)
import tasn.ops as ops
t = time.time()
ops.load(required=True)
print(f"loaded {ops.library()} in {time.time() - t:.1f} s")
if not ops.available():
    sys.exit(f"the fused op is NOT available on this GPU: {ops.unavailable_reason()}")
print("fused op available: CUDA kernels registered")
'
}

call_check() {
  # The GPU tests first, then the CPU tests of the same file and of the reference sampler.
  step test-gpu 300 "${PYTEST[@]}" -m gpu tests/test_ops.py --junitxml="$OUT/test-gpu.xml"
  step test-cpu 150 "${PYTEST[@]}" -m "not gpu" tests/test_ops.py tests/test_sampler.py --junitxml="$OUT/test-cpu.xml"
  # Other areas' GPU tests. pytest exits 5 when nothing is selected: not a failure.
  step test-gpu-other 120 bash -c '"$@"; rc=$?; [ "$rc" -eq 5 ] && exit 0; exit "$rc"' _ "${PYTEST[@]}" -m gpu \
    --continue-on-collection-errors --ignore=tests/test_ops.py tests
}

call_sampler() {
  step tolerances 150 "$PYTHON" benchmarks/tolerances.py --draws 3 --n 16 --markdown "$OUT/tolerances.md"
  step bench-sampler 240 "$PYTHON" benchmarks/sampler.py --compiled --json "$OUT/sampler.json" \
    --append "$OUT/RESULTS-sampler.md"
}

call_train_step() {
  step train-step-bf16 200 "$PYTHON" benchmarks/train_step.py --precision bf16 --out "$OUT/train-step-bf16.md"
  step train-step-fp32 200 "$PYTHON" benchmarks/train_step.py --precision fp32 --out "$OUT/train-step-fp32.md"
}

call_details() {
  # 8 loader processes (details.py's CUDA default); ~30-60 s per model and seed on an H100 host.
  step details 480 "$PYTHON" benchmarks/details.py --results "$OUT/RESULTS-details.md" ${DETAILS_ARGS:-}
}

case "$CALL" in
  check | sampler | train-step | details | all) ;;
  *) echo "unknown call '$CALL': check | sampler | train-step | details | all" >&2; exit 2 ;;
esac
: > "$OUT/steps.txt"
echo "call: $CALL, budget $BUDGET s, output $OUT"
environment
case "$CALL" in
  check) call_check ;;
  sampler) call_sampler ;;
  train-step) call_train_step ;;
  details) call_details ;;
  all) BUDGET=100000; call_check; call_sampler; call_train_step; call_details ;;
esac
echo "=== summary ($OUT/steps.txt)"
cat "$OUT/steps.txt"
exit "$failed"
