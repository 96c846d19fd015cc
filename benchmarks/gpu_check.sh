#!/usr/bin/env bash
# The one GPU check, for an H100/H200 machine (Python 3.12 and torch already installed there).
#
#   bash benchmarks/gpu_check.sh OUT_DIR                 first call (make gpu-check GPU_OUT=OUT_DIR)
#   GPU_RERUN=PREV_OUT bash benchmarks/gpu_check.sh OUT_DIR   second call: only what failed
#   bash benchmarks/gpu_check.sh --budget                the time boxes and their total
#   bash benchmarks/gpu_check.sh --download-wheels [DIR]  fill .whl/ (or DIR) here, from PyPI
#
# A first call builds the extension for sm_90 against the installed torch, runs the `cuda` tests,
# then the `triton` tests (Triton compiled, not interpreted), then `d2g bench gpu-days --arch sd15
# --quick` and the GPU benchmark files, each step in its own time box. The boxes add up to 540 s
# (9 minutes, the whole call, build and wheel install included; printed first). OUT_DIR/summary.txt
# is rewritten after every step, so a call cut short still reports every step it finished;
# OUT_DIR/steps.tsv holds each step's exit status (124: cut by its box) and seconds.
#
# Second call (rerun what failed): GPU_RERUN names the first call's OUT_DIR (its steps.tsv and
# test logs; copy it into the working tree if the machine was handed back in between). A test
# step that failed reruns only its FAILED/ERROR tests; one cut by its box reruns its selection
# minus the tests that passed; a benchmark step that failed or was cut runs again; steps that
# passed are skipped. The build always runs (incremental: seconds when nothing changed).
#
# Environment: PYTHON (default python3); GPU_TESTS (pytest paths, default "tests"); GPU_BENCH (a
# substring of the benchmark step names: only those, any bench_*.py file matching it included);
# GPU_BOXES ("name=seconds ...", overrides boxes); GPU_CHECK_TAR=file (an archive of OUT_DIR
# refreshed after every step); D2G_GIT_REV (the revision, for a tree copied without .git).
# Wheels in .whl/ (diffusers, lpips, elatentlpips, pytest-xdist, matplotlib, ... which the
# machine lacks and cannot download; see WHEELS) are installed to a private folder first; the
# device tool carries the ignored .whl/ with carry=[".whl"].
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# ------------------------------------------------------------------ the time boxes (seconds)
# One table; the order is the order of the run (most important first within each kind).
STEPS_ALL="wheels gpu_info build build_info tests tests_triton gpu_days bench_elatentlpips \
bench_paired_augment bench_lpips_distance bench_multiscale_heads bench_train_step"
declare -A BOX=([wheels]=15 [gpu_info]=10 [build]=60 [build_info]=10 [tests]=100
  [tests_triton]=65 [gpu_days]=105 [bench_elatentlpips]=50 [bench_paired_augment]=45
  [bench_lpips_distance]=20 [bench_multiscale_heads]=20 [bench_train_step]=40)
# Benchmark files not in the table (bench_collect, bench_discriminator: gpu_days measures the SD1.5
# collection and the whole training step) run only when GPU_BENCH names them, in this box each.
DEFAULT_BENCH_BOX=30
for pair in ${GPU_BOXES:-}; do BOX[${pair%%=*}]=${pair#*=}; done

# Wheels the GPU machine lacks, for Python 3.12 / manylinux x86_64 (about 25 MB: the tree travels
# with at most 64 MiB). The machine has torch 2.11, triton, numpy, transformers (so
# huggingface-hub, safetensors, regex, tqdm, ...), pytest, and had torchvision, scipy and pillow
# for the last run's lpips; if they are missing there, add "torchvision==0.26.0 scipy pillow"
# (+45 MB). Never torch itself: the machine's build must stay.
WHEELS="diffusers==0.42.1 importlib-metadata zipp lpips==0.1.4 elatentlpips==0.2 pytest-xdist \
execnet matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil"

if [ "${1:-}" = "--download-wheels" ]; then
  dest=${2:-.whl}
  mkdir -p "$dest"
  # --no-deps: the list above is the closure the machine lacks (torch must not come along).
  exec $PY -m pip download --dest "$dest" --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 $WHEELS
fi

# ------------------------------------------------------------------ the plan
rerun_rc() {  # rerun_rc NAME: the first call's exit status of a step ("" if it did not run)
  awk -F'\t' -v n="$1" '$1 == n {print $2}' "$GPU_RERUN/steps.tsv" 2>/dev/null | tail -n 1
}
bench_steps() {  # the benchmark steps of this call, in order
  local name
  for name in $STEPS_ALL; do [[ $name == bench_* ]] && echo "$name"; done
  if [ -n "${GPU_BENCH:-}" ]; then
    for f in benchmarks/bench_*.py; do
      name=$(basename "$f" .py)
      [[ " $STEPS_ALL " == *" $name "* ]] || echo "$name"
    done
  fi
}
PLAN="wheels gpu_info build build_info"
for name in tests tests_triton gpu_days $(bench_steps); do
  if [ -n "${GPU_BENCH:-}" ] && [[ $name != tests* ]] && [[ $name != *"$GPU_BENCH"* ]]; then
    continue
  fi
  if [ -n "${GPU_RERUN:-}" ]; then
    rc=$(rerun_rc "$name")
    [ "$rc" = "0" ] && continue   # passed the first time (a step never reached runs now)
  fi
  PLAN="$PLAN $name"
done
TOTAL=0
for name in $PLAN; do TOTAL=$((TOTAL + ${BOX[$name]:-$DEFAULT_BENCH_BOX})); done

if [ "${1:-}" = "--budget" ]; then
  for name in $PLAN; do printf "%-24s %4s s\n" "$name" "${BOX[$name]:-$DEFAULT_BENCH_BOX}"; done
  echo "total $TOTAL s"
  exit 0
fi

OUT=${1:?usage: gpu_check.sh OUT_DIR   (or --budget, --download-wheels)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
export D2G_GIT_REV=${D2G_GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
declare -A STATUS TIMES
: > "$OUT/steps.tsv"
T0=$SECONDS
echo "gpu_check: git $D2G_GIT_REV; time boxes $TOTAL s in all:$(for n in $PLAN; do \
  printf ' %s=%s' "$n" "${BOX[$n]:-$DEFAULT_BENCH_BOX}"; done)${GPU_RERUN:+; rerun of $GPU_RERUN}" \
  | tee "$OUT/plan.txt"

# ------------------------------------------------------------------ the summary (after every step)
test_line() {  # test_line LOG: pytest's closing line, or the counts so far when it was cut
  local final
  final=$(grep -E "^=+ .* in [0-9.]+s" "$1" 2>/dev/null | tail -n 1)
  [ -n "$final" ] && { echo "$final"; return; }
  echo "(cut short or not finished) $(grep -c " PASSED" "$1" 2>/dev/null) passed," \
       "$(grep -c " FAILED" "$1" 2>/dev/null) failed so far"
}
write_summary() {
  {
  echo "===================== d2g_fast GPU check summary ====================="
  cat "$OUT/plan.txt"
  cat "$OUT/gpu_info.log" 2>/dev/null
  printf "%-24s %5s %6s %8s\n" step box rc seconds
  for name in $PLAN; do
    printf "%-24s %5s %6s %8s\n" "$name" "${BOX[$name]:-$DEFAULT_BENCH_BOX}" \
      "${STATUS[$name]:-pending}" "${TIMES[$name]:--}"
  done
  echo "elapsed $((SECONDS - T0)) s of $TOTAL s"
  for log in tests tests_triton tests_rerun tests_triton_rerun; do
    [ -f "$OUT/$log.log" ] || continue
    echo "$log: $(test_line "$OUT/$log.log")"
    grep -E "(FAILED|ERROR) " "$OUT/$log.log" | grep -v "^E " | head -n 30
  done
  if [ -f "$OUT/gpu_days/gpu_days.md" ]; then
    echo "--- d2g bench gpu-days (all rows in gpu_days/gpu_days.md) ---"
    awk '/^## (Device-days|What each)/{p=1} /^## Measured/{p=0} p && /^\| / && !/^\| quantity/' \
      "$OUT/gpu_days/gpu_days.md" | cut -d'|' -f2-4
  fi
  echo "--- benchmark rows, forward and forward+backward (median ms, x ref; all rows in bench-gpu-*.md) ---"
  cat "$OUT"/bench-gpu-*.md 2>/dev/null | grep -E "^\| " | grep -v -E "^\| op|^\|---" | \
    awk -F'|' '$5 !~ /^ bwd/ {printf "%-20s %-30s %-16s %-8s %10s ms  x%s\n", $2, $3, $4, $5, $6, $10}' \
    | head -n 100
  } > "$OUT/summary.txt.tmp"
  # Whatever a grep above found or not (pipefail), the new summary replaces the old one.
  mv "$OUT/summary.txt.tmp" "$OUT/summary.txt"
  [ -n "${GPU_CHECK_TAR:-}" ] && tar czf "$GPU_CHECK_TAR" -C "$OUT" . 2>/dev/null
  return 0
}

step() {  # step NAME COMMAND...: run in NAME's time box, log, record status and duration
  local name=$1; shift
  local limit=${BOX[$name]:-$DEFAULT_BENCH_BOX} t0=$SECONDS rc
  echo "=== $name (box ${limit} s, at $((SECONDS - T0)) s): $*"
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  STATUS[$name]=$rc; TIMES[$name]=$((SECONDS - t0))
  printf "%s\t%s\t%s\n" "$name" "$rc" "${TIMES[$name]}" >> "$OUT/steps.tsv"
  tail -n 3 "$OUT/$name.log" | sed "s/^/  [$name] /"
  write_summary
  return 0
}
planned() { [[ " $PLAN " == *" $1 "* ]]; }
write_summary

# ------------------------------------------------------------------ set-up
if compgen -G ".whl/*.whl" > /dev/null; then
  step wheels $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/d2g_site .whl/*.whl
  [ "${STATUS[wheels]}" = "0" ] && export PYTHONPATH=/tmp/d2g_site${PYTHONPATH:+:$PYTHONPATH}
else
  STATUS[wheels]="no-whl"; TIMES[wheels]=0
fi
step gpu_info bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
  --format=csv; $PY -c \"import torch, triton; print('torch', torch.__version__, 'cuda', \
  torch.version.cuda, 'triton', triton.__version__)\""
export D2G_CUDA_ARCHS=9.0 MAX_JOBS=${MAX_JOBS:-16}
step build $PY -m pip install -v --no-build-isolation --no-deps -e .
step build_info $PY -c "import d2g_fast; d2g_fast.build_info()"

# ------------------------------------------------------------------ tests
# pytest-xdist (a carried wheel) spreads the tests and Triton's JIT compiles over the cores. -v
# prints one line per test as it finishes, so a run cut by its box still names its failures.
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || true)
PYTEST=(env D2G_POISON=1 $PY -m pytest -v -rfE $XDIST -p no:cacheprovider -o junit_family=xunit1)
node_ids() {  # node_ids LOG WORD: the node ids that LOG reports with WORD (PASSED, FAILED, ERROR)
  grep -E " $2( |$)" "$1" 2>/dev/null | grep -oE "tests/[^ ]+::[^ ]+" | sort -u
}
test_step() {  # test_step NAME MARKER
  local name=$1 marker=$2 rc args=()
  planned "$name" || return 0
  if [ -n "${GPU_RERUN:-}" ]; then
    rc=$(rerun_rc "$name")
    if [ "$rc" = "124" ] || [ "$rc" = "137" ]; then   # cut: all but what passed
      mapfile -t passed < <(node_ids "$GPU_RERUN/$name.log" PASSED)
      for id in "${passed[@]}"; do args+=(--deselect "$id"); done
      args+=(-m "$marker" ${GPU_TESTS:-tests})
    else                                              # failed: exactly those tests
      mapfile -t args < <({ node_ids "$GPU_RERUN/$name.log" FAILED;
                            node_ids "$GPU_RERUN/$name.log" ERROR; } | sort -u)
      if [ "${#args[@]}" -eq 0 ]; then args=(-m "$marker" ${GPU_TESTS:-tests}); fi
    fi
  else
    args=(-m "$marker" ${GPU_TESTS:-tests})
  fi
  step "$name" "${PYTEST[@]}" --junitxml="$OUT/$name.xml" "${args[@]}"
}
# CUDA kernels first, then Triton (its JIT compiles are slow): a cut box still leaves the other.
test_step tests "cuda and not triton"
test_step tests_triton "triton"

# ------------------------------------------------------------------ benchmarks
planned gpu_days && step gpu_days $PY -m d2g_fast.cli bench gpu-days --arch sd15 --quick \
  --out "$OUT/gpu_days"
# Each benchmark file in its own process and box, so one slow file cannot eat the budget
# (run.py rewrites its CSV/markdown after every case: a file cut short keeps what it measured).
for name in $(bench_steps); do
  planned "$name" || continue
  step "$name" $PY benchmarks/run.py --device cuda --only "$name" --min-time 0.1 --out "$OUT"
done

write_summary
cat "$OUT/summary.txt"
exit 0
