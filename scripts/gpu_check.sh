#!/usr/bin/env bash
# The prepared GPU check: run as is from the repository root on a lent H100 / H200.
#
#   bash scripts/gpu_check.sh                       # the real check, under GPU_CHECK_BUDGET_S (default 450 s)
#   bash scripts/gpu_check.sh --dry-run             # print the phases, their limits and commands; run nothing
#   bash scripts/gpu_check.sh --device cpu --tiny   # the same phases on tiny cells on the CPU (minutes)
#
# Phases, most important first, each under `timeout` with the smaller of its own limit and what is left of
# the budget (a phase that cannot get 15 s is skipped, never started): a Python environment (.venv if it
# works, else a venv over the system's torch, else a fresh venv with pip install -e .), the gpu-marked tests
# (bf16 vs fp32 loss and output, no host sync in the trainer's step), training images/s and MFU of the
# trainer's step for XL/2, L/4, B/4, S/8 at batches that fill the card, sampling images/s of XL/2 with and
# without guidance. Each bench (python -m harness.bench) rewrites its JSON as settings finish, so a phase
# cut by its timeout keeps what it measured. Everything lands in $OUT (default ./gpu_check_out): one JSON
# per phase, logs, gpu_check.json and gpu_check.md.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
TINY=0
DEVICE=cuda
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
OUT="${OUT:-./gpu_check_out}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --tiny) TINY=1 ;;
    --device) DEVICE="$2"; shift ;;
    --budget-s) BUDGET_S="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    *) echo "unknown argument $1; allowed: --dry-run --tiny --device cpu|cuda --budget-s N --out DIR" >&2; exit 2 ;;
  esac
  shift
done
case "$DEVICE" in cpu|cuda) ;; *) echo "--device $DEVICE; allowed: cpu, cuda" >&2; exit 2 ;; esac

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
: > "$OUT/phases.tsv"
START_S=$(date +%s)
DEADLINE_S=$((START_S + BUDGET_S))
RESERVE_S=20   # kept for the summary
MIN_PHASE_S=15
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled HARNESS_NO_BAR=1 PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/harness_inductor_cache}"

log() { echo "[gpu_check +$(( $(date +%s) - START_S ))s] $*"; }

# run_phase NAME LIMIT_S CMD...: run CMD under timeout, log to $OUT/NAME.log, record a line in phases.tsv.
run_phase() {
  local name="$1" limit="$2"; shift 2
  local left=$((DEADLINE_S - $(date +%s) - RESERVE_S))
  local t=$(( limit < left ? limit : left ))
  if [ "$DRY" = 1 ]; then
    printf '%-20s limit %4ss  %s\n' "$name" "$limit" "$*"
    return 0
  fi
  if [ "$t" -lt "$MIN_PHASE_S" ]; then
    log "$name: skipped, ${left}s of the budget left"
    printf '%s\tskipped\t-\t0\n' "$name" >> "$OUT/phases.tsv"
    return 0
  fi
  log "$name: start (limit ${t}s)"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status=ok
  [ "$rc" = 0 ] || status=failed
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && status=timeout
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$dt" >> "$OUT/phases.tsv"
  log "$name: $status (rc $rc) in ${dt}s; last lines:"
  tail -n 12 "$OUT/$name.log" | sed 's/^/    /'
  return 0
}

# ---- the Python environment ----
PY=""
py_ok() { "$1" -c "import harness.bench, torch, diffusers, torch_fidelity, pytest" > /dev/null 2>&1; }

setup_env() {
  if [ -x .venv/bin/python ] && py_ok .venv/bin/python; then echo ".venv works"; return 0; fi
  local sys_py; sys_py="$(command -v python3 || command -v python)"
  if "$sys_py" -c "import torch" > /dev/null 2>&1; then
    # Keep the machine's torch (a CUDA build matched to its driver): install the rest around it.
    local tv; tv="$("$sys_py" -c 'import torch; print(torch.__version__.split("+")[0])')"
    echo "system torch $tv: venv .gpu_venv over the system site-packages"
    "$sys_py" -m venv --system-site-packages .gpu_venv || return 1
    echo "torch==$tv" > .gpu_venv/constraints.txt
    .gpu_venv/bin/python -m pip install -q --no-deps -e . || return 1
    local deps
    deps="$(.gpu_venv/bin/python - <<'EOF'
import re
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(" ".join(d for d in deps if re.split(r"[<>=!~ \[]", d)[0] not in ("torch", "torchvision")))
EOF
)" || return 1
    # shellcheck disable=SC2086
    .gpu_venv/bin/python -m pip install -q -c .gpu_venv/constraints.txt $deps pytest || return 1
  else
    echo "no torch on the system: fresh venv .gpu_venv with pip install -e ."
    "$sys_py" -m venv .gpu_venv || return 1
    .gpu_venv/bin/python -m pip install -q -e . pytest || return 1
  fi
  py_ok .gpu_venv/bin/python
}

if [ "$DRY" = 1 ]; then
  echo "gpu_check plan (budget ${BUDGET_S}s, device $DEVICE, tiny $TINY, out $OUT):"
  printf '%-20s limit %4ss  %s\n' setup 240 "setup_env (.venv, else venv over system torch, else pip install -e .)"
  PY=python
else
  log "budget ${BUDGET_S}s, device $DEVICE, tiny $TINY, out $OUT"
  (command -v nvidia-smi > /dev/null && nvidia-smi) > "$OUT/nvidia_smi.txt" 2>&1
  t0=$(date +%s)
  export -f setup_env py_ok
  timeout --kill-after=10 240 bash -c setup_env > "$OUT/setup.log" 2>&1
  rc=$?
  printf 'setup\t%s\t%s\t%s\n' "$([ $rc = 0 ] && echo ok || echo failed)" "$rc" "$(( $(date +%s) - t0 ))" \
    >> "$OUT/phases.tsv"
  tail -n 5 "$OUT/setup.log"
  if py_ok .venv/bin/python; then PY=.venv/bin/python; elif py_ok .gpu_venv/bin/python; then PY=.gpu_venv/bin/python; fi
  if [ -z "$PY" ]; then
    log "setup failed: no Python environment with harness and torch (see $OUT/setup.log)"
    printf '# GPU check\n\nsetup failed, see setup.log\n' > "$OUT/gpu_check.md"
    exit 1
  fi
  log "python: $PY ($($PY -c 'import torch; print(torch.__version__, torch.version.cuda)'))"
fi

# ---- cells and batch sizes: fill the card (80 GB H100 / 141 GB H200), or tiny cells on the CPU ----
MEM_MIB=0
if [ "$DRY" = 0 ] && [ "$DEVICE" = cuda ] && command -v nvidia-smi > /dev/null; then
  MEM_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1 | tr -d ' ')
fi
BIG=1; [ "${MEM_MIB:-0}" -ge 120000 ] && BIG=2   # batches double on an H200
B="$PY -m harness.bench"
if [ "$TINY" = 1 ]; then
  CELL_XL2="--model tiny --depth 2 --hidden 32 --heads 2 --patch 2 --input-size 8 --num-classes 10"
  CELL_L4="--model tiny --depth 2 --hidden 32 --heads 2 --patch 4 --input-size 8 --num-classes 10"
  CELL_B4="$CELL_L4"; CELL_S8="--model tiny --depth 1 --hidden 32 --heads 2 --patch 8 --input-size 16 --num-classes 10"
  BATCH_XL2=4; BATCH_L4=4; BATCH_B4=4; BATCH_S8=4; BATCH_SAMPLE=2; SAMPLING_STEPS=2
  RUN="--steps 1 --repeats 1 --warmup 1 --vae tiny"; VAE_ARG="--vae tiny"
  TRAIN_XL2=fp32_eager,bf16; TRAIN_OTHER=bf16; SAMPLE=bf16,bf16_cfg; SAMPLE_COMPILED=""
else
  CELL_XL2="--model XL --patch 2"; CELL_L4="--model L --patch 4"; CELL_B4="--model B --patch 4"
  CELL_S8="--model S --patch 8"
  BATCH_XL2=$((128 * BIG)); BATCH_L4=$((512 * BIG)); BATCH_B4=$((1024 * BIG)); BATCH_S8=$((2048 * BIG))
  BATCH_SAMPLE=$((128 * BIG)); SAMPLING_STEPS=10
  RUN="--steps 4 --repeats 3 --warmup 2"; VAE_ARG=""   # sampling decodes through the SD VAE's architecture
  # fp32 eager at the full batch would not fit: XL/2's ratios are TF32 / bf16 / compiled; the CPU bench
  # (docs/benchmarks.md) gives the ratios to fp32 eager.
  TRAIN_XL2=tf32,bf16,bf16_compiled; TRAIN_OTHER=bf16,bf16_compiled
  SAMPLE=bf16,bf16_cfg; SAMPLE_COMPILED=bf16_compiled,bf16_compiled_cfg
fi
DEV="--device $DEVICE"
if [ "$DEVICE" = cpu ]; then
  GPU_TESTS=(env CUDA_VISIBLE_DEVICES= $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider)
else
  GPU_TESTS=($PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider)
fi

# shellcheck disable=SC2086
{
run_phase gpu_tests 75 "${GPU_TESTS[@]}"
run_phase train_XL2 150 $B train $CELL_XL2 --batch $BATCH_XL2 --settings $TRAIN_XL2 $RUN $DEV --json-out "$OUT/train_XL2.json"
run_phase sample_XL2 70 $B sample $CELL_XL2 --batch $BATCH_SAMPLE --sampling-steps $SAMPLING_STEPS --settings $SAMPLE \
  --repeats 2 $DEV $VAE_ARG --json-out "$OUT/sample_XL2.json"
run_phase train_S8 60 $B train $CELL_S8 --batch $BATCH_S8 --settings $TRAIN_OTHER $RUN $DEV --no-bf16-check --json-out "$OUT/train_S8.json"
run_phase train_B4 60 $B train $CELL_B4 --batch $BATCH_B4 --settings $TRAIN_OTHER $RUN $DEV --no-bf16-check --json-out "$OUT/train_B4.json"
run_phase train_L4 75 $B train $CELL_L4 --batch $BATCH_L4 --settings $TRAIN_OTHER $RUN $DEV --no-bf16-check --json-out "$OUT/train_L4.json"
if [ -n "$SAMPLE_COMPILED" ]; then
  run_phase sample_XL2_compiled 90 $B sample $CELL_XL2 --batch $BATCH_SAMPLE --sampling-steps $SAMPLING_STEPS \
    --settings $SAMPLE_COMPILED --repeats 2 $DEV --json-out "$OUT/sample_XL2_compiled.json"
fi
}

if [ "$DRY" = 1 ]; then
  printf '%-20s limit %4ss  %s\n' summary "$RESERVE_S" "$B summarize $OUT  (-> gpu_check.json, gpu_check.md)"
  exit 0
fi
log "summary"
timeout 60 $PY -m harness.bench summarize "$OUT" > "$OUT/summary.log" 2>&1 || tail -n 20 "$OUT/summary.log"
cat "$OUT/gpu_check.md" 2>/dev/null
log "done in $(( $(date +%s) - START_S ))s: $OUT/gpu_check.json, $OUT/gpu_check.md"
