#!/usr/bin/env bash
# The one GPU check, for an H100/H200 machine (Python 3.12 and torch already installed there).
#   bash benchmarks/gpu_check.sh OUT_DIR        (make gpu-check GPU_OUT=OUT_DIR)
# Builds the extension for sm_90 only against the installed torch, runs the `cuda` and `triton`
# tests on the GPU (Triton compiled, not interpreted), runs the GPU benchmarks, writes logs and
# CSV/markdown into OUT_DIR and prints a short summary table last. Every step has a time box;
# they add up to about 9 minutes (under the device tool's 10-minute limit per command); a run that hits no
# box takes about 6-7 (build ~1 min, tests ~2.5 min, benchmarks ~3 min on an H200).
# Optional wheels in .whl/ (diffusers, elatentlpips, lpips, ...) are installed to a private
# folder first, for machines that lack them and cannot download.
# Narrow a run with GPU_TESTS (pytest paths, default "tests") and GPU_BENCH (a substring of the
# benchmark file names, default all).
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
declare -A STATUS TIMES
step() {  # step NAME TIMEOUT_S COMMAND... : run, log, record status and duration
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$OUT/summary.log"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  STATUS[$name]=$rc; TIMES[$name]=$((SECONDS - t0))
  tail -n 5 "$OUT/$name.log" | sed "s/^/  [$name] /"
  # GPU_CHECK_TAR=file: keep an up-to-date archive of OUT_DIR after every step (for machines that
  # return only a few files, or a run cut short by its time limit).
  [ -n "${GPU_CHECK_TAR:-}" ] && tar czf "$GPU_CHECK_TAR" -C "$OUT" . 2>/dev/null
  return 0
}

if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/d2g_site .whl/*.whl \
    > "$OUT/wheels.log" 2>&1 && export PYTHONPATH=/tmp/d2g_site${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

export D2G_CUDA_ARCHS=9.0 MAX_JOBS=${MAX_JOBS:-16}
step build "${BUILD_TIMEOUT:-90}" $PY -m pip install -v --no-build-isolation --no-deps -e .
step build_info 60 $PY -c "import d2g_fast; d2g_fast.build_info()"
# pytest-xdist (when installed) spreads the Triton JIT compiles over the cores. -v prints one
# line per test as it finishes, so a run cut short by its time box still names its failures.
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || true)
# CUDA kernels first, then Triton (its JIT compiles are slow): a cut box still leaves the other.
step tests "${TESTS_TIMEOUT:-100}" env D2G_POISON=1 $PY -m pytest -v -rfE $XDIST -m "cuda and not triton" -p no:cacheprovider \
  --junitxml="$OUT/tests.xml" ${GPU_TESTS:-tests}
step tests_triton "${TRITON_TESTS_TIMEOUT:-80}" env D2G_POISON=1 $PY -m pytest -v -rfE $XDIST -m "triton" -p no:cacheprovider \
  --junitxml="$OUT/tests_triton.xml" ${GPU_TESTS:-tests}
# Each benchmark file in its own process and time box, so one slow file cannot eat the budget
# (run.py rewrites its CSV/markdown after every case: a file cut short keeps what it measured).
# Time boxes in seconds (BENCH_TIMEOUT overrides them all). paired_augment's box includes the
# official package's first-call build of its upfirdn2d CUDA plugin, reused by elatentlpips.
declare -A BOX=([bench_lpips_distance]=40 [bench_multiscale_heads]=50 [bench_paired_augment]=75 [bench_elatentlpips]=70 [bench_discriminator]=40 [bench_collect]=30)
ORDER="bench_lpips_distance bench_multiscale_heads bench_paired_augment bench_elatentlpips bench_discriminator bench_collect"
for f in $ORDER $(ls benchmarks/bench_*.py | xargs -n1 basename | sed 's/\.py$//'); do
  name=$(basename "$f" .py)
  [ -f "benchmarks/$name.py" ] || continue
  [[ " ${DONE:-} " == *" $name "* ]] && continue
  DONE="${DONE:-} $name"
  [[ "$name" == *"${GPU_BENCH:-}"* ]] || continue
  step "$name" "${BENCH_TIMEOUT:-${BOX[$name]:-30}}" $PY benchmarks/run.py --device cuda --only "$name" --min-time 0.1 --out "$OUT"
done

{
echo
echo "===================== d2g_fast GPU check summary ====================="
cat "$OUT/gpu.txt"
for log in tests tests_triton; do
  final=$(grep -E "^=+ .* in [0-9.]+s" "$OUT/$log.log" | tail -n 1)
  # cut short by its box: count the per-test lines instead
  [ -z "$final" ] && final="(cut short) $(grep -c " PASSED" "$OUT/$log.log") passed, $(grep -c " FAILED" "$OUT/$log.log") failed so far"
  echo "$log: $final"
  grep -E "FAILED|ERROR" "$OUT/$log.log" | grep -v "^E " | head -n 20
done
printf "%-28s %6s %8s\n" step rc seconds
for k in "${!STATUS[@]}"; do printf "%-28s %6s %8s\n" "$k" "${STATUS[$k]}" "${TIMES[$k]}"; done | sort
echo "--- benchmark rows, forward and forward+backward (median ms, x ref; all rows in $OUT/bench-gpu-*.md) ---"
cat "$OUT"/bench-gpu-*.md 2>/dev/null | grep -E "^\| " | grep -v -E "^\| op|^\|---" | \
  awk -F'|' '$5 !~ /^ bwd/ {printf "%-20s %-30s %-16s %-8s %10s ms  x%s\n", $2, $3, $4, $5, $6, $10}' | head -n 90
} | tee "$OUT/summary.txt"
[ -n "${GPU_CHECK_TAR:-}" ] && tar czf "$GPU_CHECK_TAR" -C "$OUT" .
exit 0
