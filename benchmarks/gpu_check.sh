#!/usr/bin/env bash
# GPU checks of the training speed work, in priority order, within a total time budget:
#   1. pytest -m gpu (bf16 + compile train.py run of 20 steps with checkpoint and grids, then a resume;
#      GroupNorm's output dtype under CUDA autocast)
#   2. benchmarks/train_step.py, DDPM++ CIFAR-10 (63.1 M), batch 128, bf16-mixed + channels_last +
#      compile: Lightning and plain img/s, ratio, MFU, main-thread CPU ms per step and Python calls per
#      step (--count-calls); then the profile of the same module (--profile, no second compile): wall /
#      host-span / kernel time per step, GPU busy and idle, kernels per step, host time in CUDA launch
#      and sync APIs, the host-bound / device-bound verdict, shares by kernel family, aten ops and host
#      syncs per step
#   3. the same with compile mode reduce-overhead (CUDA graphs; skipped in SMOKE mode)
#   4. DDPM++ eager: bf16-mixed + channels_last, fp32
#   5. net=ddpm_cifar10 (35.75 M, DDPM's additive conditioning), batch 128: bf16 + channels_last + compile, fp32, bf16-mixed
#   6. benchmarks/profile_step.py on eager bf16 + channels_last (the picture before compile)
#
#   bash benchmarks/gpu_check.sh                 # on the GPU box, from the repository root
#   SMOKE=1 bash benchmarks/gpu_check.sh         # the same steps, tiny, on CPU (checks this script)
#
# Environment: OUT (folder for the logs, default ./gpu_check_out), BUDGET_S (total seconds, default
# 540: one 10-minute device call with the machine's start-up), PYTHON (default python3). Each step runs under `timeout` with what is left of the budget
# (capped per step); a step that would start with less than its minimum is skipped and says so.
# Logs: $OUT/gpu_check.log (everything), $OUT/summary.log (the result lines only).
set -o pipefail
OUT=${OUT:-$PWD/gpu_check_out}
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.log"
: >"$LOG"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-$PWD}" WANDB_MODE=offline
START=$SECONDS

if [ "${SMOKE:-0}" = "1" ]; then
  DEV="--device cpu"; CFG=small; BATCH=8; STEPS="--steps 2 --warmup 1 --repeats 1"
  PSTEPS="--steps 4 --warmup 1 --log-every 2"; DDPM=small; SCALE=10
  export OMP_NUM_THREADS=1
else
  DEV="--device cuda"; CFG=cifar10_ddpmpp; BATCH=128; STEPS="--steps 15 --warmup 5 --repeats 2"
  PSTEPS="--steps 10 --warmup 3 --log-every 5"; DDPM=ddpm_cifar10; SCALE=1
fi

say() { echo "$*" | tee -a "$LOG" "$SUMMARY"; }

# step NAME CAP_S MIN_S CMD...: run CMD under timeout min(CAP_S, budget left); result lines -> summary
step() {
  local name=$1 cap=$2 min=$3; shift 3
  local left=$((BUDGET_S - (SECONDS - START)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt "$min" ]; then
    say "== $name: SKIPPED (${left}s of the budget left, needs >= ${min}s)"
    return 0
  fi
  say "== $name (timeout ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" \
    | grep -E --line-buffered "^(lightning|plain|variant) |plain ratio|FLOPs per|main-thread CPU|Python function calls|config=|wall time|host span|^GPU (kernel|idle)|kernels per|host (launch|sync) APIs|^(host|device)-bound|^  repeat|^  [a-zA-Z(/][a-zA-Z /()<>-]* +[0-9.]+%|^  [0-9]+:[0-9]|time shares|non-logging|logging steps|host syncs|passed|failed|skipped|^[A-Za-z]*Error" \
    >>"$SUMMARY"
  local st=("${PIPESTATUS[@]}")
  local rc=${st[0]}
  if [ "$rc" = "124" ] || [ "$rc" = "137" ]; then
    say "   -> TIMED OUT after $((SECONDS - t0))s"
  else
    say "   -> rc=$rc in $((SECONDS - t0))s"
  fi
}

say "gpu_check $(date -u +%FT%TZ) smoke=${SMOKE:-0} budget=${BUDGET_S}s commit=$(git rev-parse --short HEAD 2>/dev/null)"
$PYTHON -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1 | tee -a "$LOG" "$SUMMARY"

B="$PYTHON benchmarks/train_step.py --config $CFG --batch-size $BATCH $DEV $STEPS"
step "1 pytest -m gpu" 200 60 $PYTHON -m pytest -q -m gpu -p no:cacheprovider tests/test_fast_training.py tests/test_nets.py
step "2 $CFG bf16-mixed channels_last compile (+ calls, profile)" $((270 * SCALE)) 90 \
  $B --precision bf16-mixed --channels-last --compile --count-calls --profile --log-every 5
if [ "${SMOKE:-0}" = "1" ]; then  # CUDA graphs: nothing to measure on CPU
  say "== 3 $CFG bf16-mixed channels_last compile reduce-overhead: SKIPPED (CPU smoke)"
else
  step "3 $CFG bf16-mixed channels_last compile reduce-overhead" $((240 * SCALE)) 90 \
    $B --precision bf16-mixed --channels-last --compile --compile-mode reduce-overhead --count-calls
fi
step "4a $CFG bf16-mixed channels_last" 60 25 $B --precision bf16-mixed --channels-last
step "4b $CFG fp32" 60 25 $B
D="$PYTHON benchmarks/train_step.py --config $DDPM --batch-size $BATCH $DEV $STEPS"
step "5a $DDPM bf16-mixed channels_last compile" $((150 * SCALE)) 80 $D --precision bf16-mixed --channels-last --compile
step "5b $DDPM fp32" 50 25 $D
step "5c $DDPM bf16-mixed" 50 25 $D --precision bf16-mixed
step "6 profile $CFG bf16-mixed channels_last, eager" 60 40 \
  $PYTHON benchmarks/profile_step.py --config $CFG --batch-size $BATCH $DEV $PSTEPS --precision bf16-mixed --channels-last
say "gpu_check done in $((SECONDS - START))s; full log $LOG"
