#!/usr/bin/env bash
# The GPU check (docs/gpu-check.md): what a lent GPU machine runs, sized to finish well inside its 10-minute command
# limit on one H100. Each step has its own time budget; a failed or timed-out step does not stop the next; a summary
# ends the output and the exit code says what failed.
#
#   0. install: the wheels of .whl/ (scripts/device-wheels.sh) into a target folder over the image's torch and
#      transformers, without dependency resolution; the repository itself by PYTHONPATH; versions and an import check
#   1. tests: a CUDA-relevant list of the default suite (DEVICE_TESTS) with scripts/device_cuda_plugin.py, which puts
#      the tests' models on the GPU (float32, TF32 off) and counts the tests that allocated GPU memory
#   2. the tiny model end to end through the CLI on CUDA (train sft, train rl --algo tgrpo, eval --bench synthetic),
#      in bfloat16 and in float32, each compared with the CPU float32 values of scripts/device-expected.json
#   3. the throughput probe: random-weight Qwen2.5-VL-7B, 16 frames at 128*28*28, G = 8, T-GRPO with HF generation:
#      s/step, tokens/s/GPU, peak GPU memory; rl.encode_once on and off when the schema has it
#
# Usage:
#   scripts/device-check.sh                    on the GPU machine (the device tool's run, carry [".whl"])
#   scripts/device-check.sh --dry-run          here: builds .whl/ and checks it, runs steps 1-2 on the CPU in this
#                                              environment, and exercises step 3's code on a shrunken model
#   scripts/device-check.sh --record-expected  re-record scripts/device-expected.json (CPU float32; after any change
#                                              to the numerics, e.g. a merge that changes float summation order)
#   --steps 1,2,3   run only these steps       --tests "FILES..."   another test list for step 1
# Environment: OUT (default /tmp/videor1-device-check/out; the device tool sets it: at most 8 files come back, all
# written here), DEVICE_CHECK_WORK (scratch, default /tmp/videor1-device-check), PYTHON, BUDGET_INSTALL,
# BUDGET_TESTS, BUDGET_TINY (each precision), BUDGET_PROBE, TOTAL_BUDGET (seconds; on the device 40 + 60 + 120 +
# 2 x 80 + 220, and each step gets at most what is left of TOTAL_BUDGET=560), PYTEST_ARGS (default there: -n 4).
# Exit code: the sum of 1 install/imports, 2 tests, 4 tiny chain, 8 probe, 16 wheel folder (dry run), 64 usage.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

MODE=device
RECORD=0
STEPS=1,2,3
TESTS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) MODE=dry ;;
    --record-expected) RECORD=1 ;;
    --steps) STEPS=${2:?--steps needs a list}; shift ;;
    --tests) TESTS=${2:?--tests needs a list}; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "device-check: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done

WORK=${DEVICE_CHECK_WORK:-/tmp/videor1-device-check}
# The whole check ends within TOTAL_BUDGET seconds (the device tool stops a command at 600 s and then returns nothing
# of what it printed): each step gets at most what is left.
if [[ $MODE == dry || $RECORD == 1 ]]; then
  TOTAL_BUDGET=${TOTAL_BUDGET:-7200}
else
  TOTAL_BUDGET=${TOTAL_BUDGET:-560}
fi
OUT=${OUT:-$WORK/out}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/check.log
: > "$LOG"
EXPECTED=$REPO/scripts/device-expected.json
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export VIDEOR1_HOME=$WORK/home

# The CUDA-relevant list: everything that builds, trains, generates with or evaluates a model, plus the CUDA-only
# tests of tests/test_gpu.py. About 2 minutes on one H100 machine (estimated from the 2-core CPU timings).
DEVICE_TESTS="tests/test_gpu.py tests/test_mrope.py tests/test_models.py tests/test_families.py tests/test_rl_math.py
 tests/test_rl_trainer.py tests/test_sft.py tests/test_eval_runner.py"
# The dry run's list: the CUDA-only tests (skipped here: they prove the file imports) and the M-RoPE binding.
DRY_TESTS="tests/test_gpu.py tests/test_mrope.py"

say() { echo "$*" | tee -a "$LOG"; }
has_step() { [[ ",$STEPS," == *",$1,"* ]]; }

NAMES=(); STATUS=(); SECONDS_USED=(); NOTES=()
EXIT=0
record() {  # name status seconds note bit
  NAMES+=("$1"); STATUS+=("$2"); SECONDS_USED+=("$3"); NOTES+=("$4")
  if [[ "$2" != PASS && "$2" != SKIP ]]; then EXIT=$(( EXIT | $5 )); fi
}

# run_budget SECONDS CMD...: CMD in its own process group, output to the terminal and the log; after SECONDS the
# whole group (the CLI subprocesses of step 2 too) is terminated. Returns CMD's status, 124 on timeout.
run_budget() {
  local budget=$1; shift
  set -m
  "$@" </dev/null > >(tee -a "$LOG") 2>&1 &
  local pid=$!
  set +m
  local waited=0
  while kill -0 "$pid" 2>/dev/null; do
    if (( waited >= budget )); then
      say "device-check: time budget of ${budget}s spent: stopping $*"
      kill -TERM -- "-$pid" 2>/dev/null; sleep 5; kill -KILL -- "-$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      return 124
    fi
    sleep 1; waited=$((waited + 1))
  done
  wait "$pid"
}

step() {  # name bit budget CMD...
  local name=$1 bit=$2 budget=$3; shift 3
  local left=$(( TOTAL_BUDGET - SECONDS ))
  if (( left < 20 )); then
    say ""; say "=== $name: SKIPPED, the check's ${TOTAL_BUDGET}s are spent ==="
    record "$name" SKIP 0 "no time left of TOTAL_BUDGET=${TOTAL_BUDGET}s" "$bit"; EXIT=$(( EXIT | bit )); return 124
  fi
  (( budget > left - 10 )) && budget=$(( left - 10 ))
  say ""
  say "=== $name (budget ${budget}s) ==="
  local t0=$SECONDS rc
  run_budget "$budget" "$@"; rc=$?
  local dt=$((SECONDS - t0))
  if (( rc == 0 )); then record "$name" PASS "$dt" "" "$bit"
  elif (( rc == 124 )); then record "$name" TIMEOUT "$dt" "budget ${budget}s" "$bit"
  else record "$name" FAIL "$dt" "exit $rc" "$bit"
  fi
  return $rc
}

summary() {
  {
    echo ""
    echo "=== device-check summary ($MODE) ==="
    printf '%-34s %-8s %6s  %s\n' step status secs note
    for i in "${!NAMES[@]}"; do
      printf '%-34s %-8s %6s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECONDS_USED[$i]}" "${NOTES[$i]}"
    done
    echo "exit code $EXIT (1 install, 2 tests, 4 tiny chain, 8 probe, 16 wheel folder); files in $OUT:"
    ls "$OUT" | sed 's/^/  /'
  } | tee "$OUT/summary.txt" | tee -a "$LOG"
}

# ------------------------------------------------------------------------------------------------ record-expected
if (( RECORD )); then
  PY=${PYTHON:-python}
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  step "record expected (CPU float32)" 4 "${BUDGET_TINY:-1800}" \
    "$PY" -m pipelines.bench.gpu tiny --work "$WORK/tiny" --device cpu --precision fp32 --record --expected "$EXPECTED"
  summary
  exit $EXIT
fi

# ----------------------------------------------------------------------------------------------------- 0: install
if [[ $MODE == dry ]]; then
  PY=${PYTHON:-python}
  step "wheel folder (.whl, <= 64 MiB)" 16 "${BUDGET_INSTALL:-600}" bash scripts/device-wheels.sh
  export PYTHONPATH=$REPO:$REPO/scripts${PYTHONPATH:+:$PYTHONPATH}
  DEVICE=cpu
else
  PY=${PYTHON:-python3}
  SITE=$WORK/site
  if ls .whl/*.whl >/dev/null 2>&1; then
    step "install .whl (no deps, no index)" 1 "${BUDGET_INSTALL:-40}" \
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  else
    say "device-check: no .whl/ here: run scripts/device-wheels.sh on the development machine and carry .whl"
    record "install .whl (no deps, no index)" FAIL 0 "no .whl/ (carry it)" 1
  fi
  export PYTHONPATH=$REPO:$REPO/scripts:$SITE${PYTHONPATH:+:$PYTHONPATH}
  DEVICE=cuda
fi

env_report() {
  local head changed
  head=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')
  changed=$(git -C "$REPO" status --porcelain 2>/dev/null | wc -l)
  echo "repo $head ($changed changed files); mode $MODE"
  uname -a
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
  "$PY" - <<'EOF'
import importlib, platform, sys
from importlib import metadata
print("python", platform.python_version(), sys.executable)
for name in ("torch", "torchvision", "transformers", "accelerate", "peft", "tokenizers", "huggingface_hub",
             "datasets", "pyarrow", "fsspec", "av", "pydantic", "typer", "rich", "numpy", "math-verify",
             "rouge-score", "pytest", "pytest-xdist", "flash_attn", "trl", "deepspeed", "vllm"):
    try:
        print(f"  {name:16s} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name:16s} (absent)")
bad = []
for mod in ("videor1_cli.app", "pipelines.records", "pipelines.rewards", "pipelines.rl.trainer", "pipelines.sft",
            "pipelines.evaluate.runner", "pipelines.bench.gpu", "datasets", "av", "math_verify", "rouge_score",
            "peft", "accelerate"):
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001
        bad.append(f"{mod}: {type(e).__name__}: {e}")
import torch
print("cuda available:", torch.cuda.is_available(), "| devices:", torch.cuda.device_count(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
      "| bf16:", torch.cuda.is_bf16_supported() if torch.cuda.is_available() else "-")
for b in bad:
    print("IMPORT FAILED", b)
sys.exit(1 if bad else 0)
EOF
}
step "environment and imports" 1 "$([[ $MODE == dry ]] && echo 600 || echo 60)" env_report
cp "$LOG" "$OUT/env.txt" 2>/dev/null  # the log so far: install + versions (one file that is quick to read)

# ------------------------------------------------------------------------------------------------------- 1: tests
if has_step 1; then
  list=${TESTS:-$([[ $MODE == dry ]] && echo "$DRY_TESTS" || echo "$DEVICE_TESTS")}
  # On the machine's 16 cores, 4 pytest-xdist workers (the image has it) when PYTEST_ARGS does not say otherwise.
  if [[ $MODE == device && -z ${PYTEST_ARGS+x} ]] && "$PY" -c "import xdist" 2>/dev/null; then PYTEST_ARGS="-n 4"; fi
  export DEVICE_CUDA_PLUGIN_DIR=$WORK/cuda-plugin
  # shellcheck disable=SC2086
  step "1 tests on $DEVICE" 2 "${BUDGET_TESTS:-$([[ $MODE == dry ]] && echo 900 || echo 120)}" \
    "$PY" -m pytest -q -p device_cuda_plugin -rfEs --junitxml="$OUT/tests-junit.xml" ${PYTEST_ARGS:-} $list
fi

# -------------------------------------------------------------------------------------------------- 2: tiny chain
if has_step 2; then
  if [[ $MODE == dry ]]; then
    precisions=fp32
  else
    precisions="bf16 fp32"
  fi
  for prec in $precisions; do
    step "2 tiny chain $DEVICE $prec" 4 "${BUDGET_TINY:-$([[ $MODE == dry ]] && echo 1500 || echo 80)}" \
      "$PY" -m pipelines.bench.gpu tiny --work "$WORK/tiny" --device "$DEVICE" --precision "$prec" \
        --expected "$EXPECTED" --json "$OUT/tiny-$DEVICE-$prec.json"
  done
fi

# ------------------------------------------------------------------------------------------------------- 3: probe
if has_step 3; then
  if [[ $MODE == dry ]]; then
    # Not a measurement: the probe's code on a shrunken config, so that step 3 cannot rot unnoticed either.
    step "3 probe code (shrunken model, CPU)" 8 "${BUDGET_PROBE:-600}" \
      "$PY" -m pipelines.bench.gpu probe --work "$WORK/probe-small" --device cpu --small --steps 1 --warmup 1 \
        --completion 4 --frames 4 --json "$OUT/probe-small.json"
  else
    step "3 probe Qwen2.5-VL-7B (random)" 8 "${BUDGET_PROBE:-220}" \
      "$PY" -m pipelines.bench.gpu probe --work "$WORK/probe" --device cuda --json "$OUT/probe.json"
  fi
fi

summary
exit $EXIT
