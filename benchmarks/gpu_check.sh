#!/usr/bin/env bash
# The one-call GPU check: everything worth recording from a few minutes on a GPU machine.
#
#   benchmarks/gpu_check.sh [--dry-run]
#
# For a machine with no package registry (torch, Triton and Python preinstalled): installs fastres
# without network, prints the GPU and versions, runs the CUDA-graph smoke checks (gpu_smoke.py), the GPU
# tests, the model benchmarks, `fastres tune` (rule vs tuned per layer), the per-layer conv benchmark with the performance model's estimate beside each layer, and the model's full-network
# estimate for this card at batch 1 and 256 (estimate/*.json; the sm_90/sm_80 compile reports run in CI). Logs, CSV, JSON and plots go to $OUT when set, else
# ./gpu-check-results/. Each stage has its own time budget (timeout) and a failing stage does not stop
# the next; the budgets add up to under 8 minutes. A short summary table (stage, status, seconds) is
# printed last.
#
# --dry-run, or no GPU visible to torch: the GPU stages skip with a message, the install and version
# stages run, so the control flow can be tested anywhere.
set -u
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # kernels must be compiled for the GPU, never interpreted

OUT_DIR="${OUT:-./gpu-check-results}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="$(command -v python || command -v python3)"
GRACE=5  # seconds between SIGTERM and SIGKILL when a stage runs over its budget
START=$(date +%s)

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (use --dry-run or nothing)" >&2; exit 2 ;;
  esac
done
if [ "$DRY_RUN" = 0 ] && [ "$(timeout 60 "$PY" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)" != "True" ]; then
  echo "gpu_check: torch sees no CUDA GPU: dry run (GPU stages skip)"
  DRY_RUN=1
fi

# name, budget in seconds, needs a GPU (1/0). The budgets, plus the kill grace per stage, stay under 480 s.
# The smoke stage comes first: it answers the CUDA-graph path's known failure modes (issue 19) even when
# a later stage runs long, and it compiles resnet18's and resnet50's fp16 kernels, which later stages then
# find in Triton's cache. The GPU tests get the largest share of the rest.
STAGES=(
  "install 15 0"
  "versions 15 0"
  "smoke 100 1"
  "pytest-gpu 90 1"
  "bench-resnet50 60 1"
  "bench-resnet18 15 1"
  "int8-resnet18 25 1"
  "fp8-resnet18 20 1"
  "layers-resnet50 20 1"
  "estimate-resnet50 20 1"
  "tune-resnet50 45 1"
)
total=0
for s in "${STAGES[@]}"; do set -- $s; total=$((total + $2 + GRACE)); done
echo "gpu_check: ${#STAGES[@]} stages, budgets + ${GRACE} s kill grace each = ${total} s (limit 480 s); dry run: $DRY_RUN"
echo "gpu_check: results in $OUT_DIR"

stage_cmd() {
  case "$1" in
    install) echo "$PY -m pip install --no-deps --no-build-isolation --no-index -q -e ." ;;
    versions) echo "(nvidia-smi || echo 'nvidia-smi: not available'); $PY -m fastres --version; \
$PY -c 'import sys, torch, triton; print(\"python\", sys.version.split()[0], \"| torch\", torch.__version__, \
\"cuda\", torch.version.cuda, \"| triton\", triton.__version__)'; git rev-parse --short HEAD 2>/dev/null || true" ;;
    smoke) echo "$PY benchmarks/gpu_smoke.py" ;;
    # Three pytest processes at once: a fresh machine spends most of this stage compiling Triton kernels,
    # one at a time per process, and the GPU machine has cores to spare. Each gets its own timeout so
    # no orphan outlives the stage.
    pytest-gpu) echo "pids=(); i=0; for group in tests/test_conv.py tests/test_triton_backend.py \
'tests --ignore=tests/test_conv.py --ignore=tests/test_triton_backend.py'; do i=\$((i + 1)); \
timeout $(( $2 - 10 )) $PY -m pytest -m gpu -q -p no:cacheprovider \$group >\"$OUT_DIR/pytest-gpu-\$i.log\" 2>&1 & \
pids+=(\$!); done; rc=0; for p in \${pids[@]}; do wait \$p; r=\$?; [ \$r = 0 ] || [ \$r = 5 ] || rc=\$r; done; \
tail -n 12 '$OUT_DIR'/pytest-gpu-*.log; exit \$rc" ;;
    bench-resnet50) echo "$PY -m fastres bench resnet50 --batch 1 8 64 256 --dtype fp16 --compare eager,compile \
--compile-budget 40 --no-progress --out '$OUT_DIR/bench'" ;;
    bench-resnet18) echo "$PY -m fastres bench resnet18 --batch 1 64 --no-progress --out '$OUT_DIR/bench'" ;;
    # The int8 Triton engine (calibrated on random images, percentile): its kernels compile here, so
    # batch 64 only, a few repeats: a first speed point and a check that every int8 kernel builds and runs.
    int8-resnet18) echo "$PY -m fastres bench resnet18 --batch 64 --dtype int8 --repeats 10 --no-progress \
--out '$OUT_DIR/bench-int8'" ;;
    # The same for fp8 (e4m3, sm_89+): the kernels' first run on fp8 tensor cores.
    fp8-resnet18) echo "$PY -m fastres bench resnet18 --batch 64 --dtype fp8 --repeats 10 --no-progress \
--out '$OUT_DIR/bench-fp8'" ;;
    layers-resnet50) echo "$PY benchmarks/bench_layers.py --model resnet50 --batch 64 --dtype fp16 --out '$OUT_DIR/layers'" ;;
    # The model's estimate for the bench stage's batches, this card's name and SM count (kernels come
    # from Triton's cache by now). An estimate, written beside the measurements to calibrate the model.
    # Per-layer tactic selection on this card (issue 14): rule config vs the chosen one per layer, times
    # measured, in the log; the cache it writes (rule_ms, tuned_ms per layer and batch) lands in $OUT.
    tune-resnet50) echo "FASTRES_CACHE='$OUT_DIR/tune-cache' $PY -m fastres tune resnet50 --batch 1 256 --dtype fp16 \
--budget-s 20 --no-progress" ;;
    estimate-resnet50) echo "set -- \$($PY -c 'import torch; from fastres.tools.estimate import gpu_for_device_name as g; \
p = torch.cuda.get_device_properties(0); print(g(p.name) or (\"h100\" if p.major >= 9 else \"a100\"), p.multi_processor_count)'); \
rc=0; for b in 1 256; do $PY -m fastres compile-report resnet50 --estimate --batch \$b --gpu \$1 --assume sms=\$2 \
--no-progress --out '$OUT_DIR/estimate' || rc=1; done; exit \$rc" ;;
  esac
}

SUMMARY=()
for s in "${STAGES[@]}"; do
  set -- $s
  name=$1 budget=$2 gpu=$3
  log="$OUT_DIR/$name.log"
  echo
  echo "=== $name (budget ${budget} s) ==="
  if [ "$gpu" = 1 ] && [ "$DRY_RUN" = 1 ]; then
    echo "SKIP: dry run (no GPU); would run: $(stage_cmd "$name" "$budget")" | tee "$log"
    SUMMARY+=("$name|skip|0|$budget")
    continue
  fi
  cmd=$(stage_cmd "$name" "$budget")
  echo "+ $cmd"
  t0=$(date +%s)
  timeout --kill-after="$GRACE" "$budget" bash -c "$cmd" >"$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT ;;
    5) [ "$name" = pytest-gpu ] && status="ok(no tests)" || status="FAIL(rc=5)" ;;
    *) status="FAIL(rc=$rc)" ;;
  esac
  tail -n 40 "$log"
  SUMMARY+=("$name|$status|$secs|$budget")
done

echo
echo "=== summary (logs, CSV, JSON, plots in $OUT_DIR) ==="
printf '%-18s %-14s %8s %8s\n' stage status seconds budget
for row in "${SUMMARY[@]}"; do
  IFS='|' read -r name status secs budget <<<"$row"
  printf '%-18s %-14s %8s %8s\n' "$name" "$status" "$secs" "$budget"
done
printf '%-18s %-14s %8s\n' total "" "$(( $(date +%s) - START ))"
