#!/usr/bin/env bash
# The one prepared command for a lent GPU machine: everything worth recording from a few minutes on it.
#
#   FASTRES_GIT_REV=<sha> bash benchmarks/gpu_check.sh [--dry-run] [--only STAGE,STAGE...]
#
# The device machine runs a copy of the tree without .git: FASTRES_GIT_REV is the revision every result
# row records (the versions stage prints it). Made for a machine without package registry or network
# (torch, Triton, pytest preinstalled): installs fastres (and checks that fastres.kernels imports from
# elsewhere), prints the GPU and versions, runs the CUDA-graph smoke checks (gpu_smoke.py), the GPU tests,
# the 8-bit kernel tests natively, the model benchmarks, the per-layer conv benchmark, `fastres tune`,
# and last, when time is left, ResNet-50 at batch 1 against torch.compile. The model's estimates for the
# card are CPU work (an AOT compile and a SASS read), made offline with the SM count from versions.log:
# `fastres compile-report resnet50 --estimate --gpu h200 --assume sms=N`.
#
# Results: all of it goes into a work folder ($GPU_CHECK_DIR, default ./gpu-check-results/; a full run
# first empties the one it made before). With $OUT set (the folder that comes back from the device, at
# most 8 files), after every stage the work folder is packed into $OUT/gpu-check.tar.gz and the stage
# table so far written to $OUT/summary.txt, so a hung stage or a session that ends early still returns
# what was measured. Stdout stays short (per stage its command and last lines; the full logs are in the
# tarball), and the summary comes last: stages with status and seconds, smoke and test failures, the
# benchmark tables, self-check warnings.
#
# Time: one total deadline, $GPU_CHECK_DEADLINE_S (default 450 s from the start: with the machine's start
# that leaves a session of 15 device minutes the 4 it needs to start a rerun). A stage's time limit is its budget or the time left before the deadline, whichever is less;
# with under 10 s left it is skipped, "skip(no time)". At its limit a stage gets SIGINT (Python and
# pytest print where they were and their summary), SIGKILL 5 s later, and then whatever the stage left
# running (a background job ignores SIGINT) is killed with its process group. Budgets in seconds, for a fresh
# machine where Triton compiles every kernel once (~0.3 s each, one thread per process):
#   install 15, versions 10  pip install -e without network; nvidia-smi, versions, git revision
#   smoke 90                 first: the CUDA-graph path's known failure modes (issue 19); it compiles
#                            resnet18's and resnet50's fp16 kernels, which later stages find cached
#   pytest-gpu 110           ~180 GPU tests, ~230 kernels: 8 pytest-xdist workers (else 3 processes)
#   kernels-8bit 40          the int8/fp8 conv and pool kernel tests (interpreter-marked: on a GPU they
#                            run natively), exact against their integer references
#   bench-resnet50 40        batches 1 8 64 256 against eager (torch.compile does not build in time)
#   bench-resnet18 25, int8-resnet18 25, fp8-resnet18 20: a first speed point per dtype
#   layers-resnet50 45       per conv against cuDNN, rows saved as measured (estimates: offline)
#   tune-resnet50 45         rule vs tuned config per layer (a 20 s search, 3 candidates a layer)
#   compile-resnet50 90      optional, last, only when the deadline leaves its whole budget: batch 1
#                            against torch.compile in reduce-overhead mode (the quickest to build)
# They add up to 555 s, more than the deadline: a warm Triton cache makes the early stages shorter, and
# what runs out of time is the optional last stage.
#
# --only smoke,pytest-gpu  only these stages (install always runs): rerun one that ran out of time while
#                          the machine is warm; the rows of earlier runs stay in the summary, "(earlier)".
# --dry-run                (and where torch sees no CUDA GPU, said loudly in the summary) the GPU stages
#                          skip with their command; install and versions run: the control flow, anywhere.
# FASTRES_CACHE is the work folder's fastres-cache/ (self-check verdicts and tune results come back);
# the GPU tests make fastres's SelfCheckWarning an error (tests/conftest.py), and the summary lists any
# a log shows: the self-check quietly moving a layer to cuDNN must not hide a Triton bug.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
unset TRITON_INTERPRET          # kernels must be compiled for the GPU, never interpreted
export PYTHONUNBUFFERED=1       # a stage killed at its limit keeps all it printed

PY="$(command -v python3 || command -v python)"
GRACE=5                         # seconds between SIGINT and SIGKILL at a stage's limit
MIN_STAGE_S=10                  # a stage with less time than this is skipped
DEADLINE_S="${GPU_CHECK_DEADLINE_S:-450}"
START=$(date +%s)
WORK="${GPU_CHECK_DIR:-./gpu-check-results}"
OUT_DIR="${OUT:-}"
TAIL_LINES=8                    # log lines per stage on stdout

# name, budget in seconds, needs a GPU (1/0), optional (runs only if its whole budget is left)
STAGES=(
  "install 15 0"
  "versions 10 0"
  "smoke 90 1"
  "pytest-gpu 110 1"
  "kernels-8bit 40 1"
  "bench-resnet50 40 1"
  "bench-resnet18 25 1"
  "int8-resnet18 25 1"
  "fp8-resnet18 20 1"
  "layers-resnet50 45 1"
  "tune-resnet50 45 1"
  "compile-resnet50 90 1 optional"
)

DRY_RUN=0 ONLY="" NO_CUDA="" INSTALL_FAILED="" LEFT_OUT="" FAILED=0
RAN=" "                         # the stages this invocation ran or skipped, space-separated

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

stage_names() { for s in "${STAGES[@]}"; do set -- $s; echo "$1"; done; }

parse_args() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      --only)
        [ $# -ge 2 ] || { echo "gpu_check: --only needs STAGE,STAGE..." >&2; exit 2; }
        ONLY="$2"; shift ;;
      --only=*) ONLY="${1#--only=}" ;;
      -h|--help) usage; exit 0 ;;
      *) echo "gpu_check: unknown argument $1 (use --dry-run, --only STAGE,... or nothing)" >&2; exit 2 ;;
    esac
    shift
  done
  local name
  for name in ${ONLY//,/ }; do
    stage_names | grep -qx -- "$name" || {
      echo "gpu_check: unknown stage $name in --only (stages: $(stage_names | tr '\n' ' '))" >&2; exit 2; }
  done
}

selected() { [ -z "$ONLY" ] || [ "$1" = install ] || [[ ",$ONLY," == *",$1,"* ]]; }

init_work() {
  mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)" || exit 2
  # A full run starts from an empty folder, but only one this script made (it leaves a marker).
  if [ -z "$ONLY" ] && [ -e "$WORK/.gpu-check" ]; then find "$WORK" -mindepth 1 -delete; fi
  mkdir -p "$WORK/status" && touch "$WORK/.gpu-check"
  export FASTRES_CACHE="$WORK/fastres-cache"
  if [ -n "$OUT_DIR" ]; then mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)" || exit 2; fi
  Q_PY=$(printf %q "$PY") Q_WORK=$(printf %q "$WORK")
  XDIST=0 PYTEST_TIMEOUT=""
  "$PY" -c "import xdist" 2>/dev/null && XDIST=1
  "$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT="--timeout 120"  # dumps a hung test's stacks
}

probe_cuda() {
  [ "$DRY_RUN" = 1 ] && return 0
  local probe
  probe=$(timeout 60 "$PY" - 2>&1 <<'EOF'
import torch
ok = torch.cuda.is_available()
print(f"cuda available: {ok}; torch {torch.__version__} built for CUDA {torch.version.cuda}; "
      f"{torch.cuda.device_count()} device(s)")
if not ok:
    torch.cuda.init()  # raises with the reason (driver, library, visible devices)
EOF
)
  echo "$probe" | sed 's/^/gpu_check: /' | tail -n 20
  if ! grep -q "^cuda available: True" <<<"$probe"; then
    NO_CUDA="torch sees no CUDA GPU ($(grep -v '^\s*$' <<<"$probe" | tail -n 1 | cut -c1-200))"
    DRY_RUN=1
  fi
}

read -r -d '' VERSIONS_PY <<'EOF'
import importlib.util, os, sys
import torch, triton
import fastres
from fastres.tools.environment import git_revision

print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda, "| triton",
      triton.__version__, "| fastres", fastres.__version__, "from", os.path.dirname(fastres.__file__))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s); {os.cpu_count()} CPUs")
else:
    print(f"gpu: none visible to torch; {os.cpu_count()} CPUs")
have = [m for m in ("xdist", "pytest_timeout", "matplotlib", "timm") if importlib.util.find_spec(m)]
print("python packages present:", ", ".join(have) or "none of xdist, pytest_timeout, matplotlib, timm")
print("git_rev recorded in result rows:",
      git_revision() or "None (no git checkout: run as FASTRES_GIT_REV=<sha> bash benchmarks/gpu_check.sh)")
EOF

# The command of a stage, run by `bash -c` in the repository root; $2 is its time limit.
stage_cmd() {
  local bench="$Q_PY -m fastres bench" pytest="$Q_PY -m pytest -p no:cacheprovider -rfE -v"
  pytest="$pytest --durations=20 $PYTEST_TIMEOUT"
  # xdist workers: 2 torch threads each (8 workers x torch's default 16 would oversubscribe 16 cores).
  local workers="OMP_NUM_THREADS=2 $pytest -n 8 --dist load"
  case "$1" in
    # Exit status 3: pip failed; 4: fastres.kernels does not import from elsewhere (from /tmp).
    install) echo "$Q_PY -m pip install --no-deps --no-build-isolation --no-index -q -e . || exit 3; \
cd /tmp && $Q_PY -c 'import fastres.kernels, fastres; print(\"fastres\", fastres.__version__, \"imports from\", \
fastres.__file__)' || { echo 'gpu_check: fastres.kernels does not import after the install: \
every GPU stage would fail'; exit 4; }" ;;
    versions) echo "(nvidia-smi || echo 'nvidia-smi: not available'); $Q_PY -c $(printf %q "$VERSIONS_PY")" ;;
    smoke) echo "$Q_PY benchmarks/gpu_smoke.py" ;;
    # One process per test module would pay the start-up 50 times; xdist spreads the tests over 8 workers
    # (16 cores: Triton compiles on one thread per process). Without xdist, three pytest processes, each
    # with its own limit: background jobs of a script ignore SIGINT, and a timeout gives it back.
    pytest-gpu)
      if [ "$XDIST" = 1 ]; then
        echo "$workers -m gpu tests"
      else
        echo "pids=(); i=0; for group in tests/test_conv.py tests/test_triton_backend.py \
'tests --ignore=tests/test_conv.py --ignore=tests/test_triton_backend.py'; do i=\$((i + 1)); \
timeout --foreground -s INT -k 3 $(( $2 - 8 > 5 ? $2 - 8 : $2 )) $pytest -m gpu \$group \
>$Q_WORK/pytest-gpu-\$i.log 2>&1 & pids+=(\$!); done; rc=0; for p in \${pids[@]}; do wait \$p; r=\$?; \
[ \$r = 0 ] || [ \$r = 5 ] || rc=\$r; done; for f in $Q_WORK/pytest-gpu-*.log; do echo \"--- \$f\"; \
grep -E '^(FAILED|ERROR) |^=+ .* in [0-9.]+s' \$f; done; exit \$rc"
      fi ;;
    # On a GPU the interpreter-marked kernel tests run natively: the 8-bit ones are the int8 and fp8
    # kernels' only check on a GPU besides test_quantized_gpu.py.
    kernels-8bit)
      local files="tests/test_conv_int8.py tests/test_conv_fp8.py tests/test_pool.py"
      if [ "$XDIST" = 1 ]; then echo "$workers -m 'interpreter and not slow' $files"
      else echo "$pytest -m 'interpreter and not slow' $files"; fi ;;
    bench-resnet50) echo "$bench resnet50 --batch 1 8 64 256 --dtype fp16 --compare eager --no-progress \
--out $Q_WORK/bench" ;;
    bench-resnet18) echo "$bench resnet18 --batch 1 64 --no-progress --out $Q_WORK/bench" ;;
    # The int8 Triton engine (calibrated on random images): batch 64 only, a few repeats: a first speed
    # point and a check that every int8 kernel builds and runs. Then the same for fp8 (e4m3, sm_89+).
    int8-resnet18|fp8-resnet18) echo "$bench resnet18 --batch 64 --dtype ${1%%-*} --repeats 10 --no-progress \
--out $Q_WORK/bench-${1%%-*}" ;;
    # --no-estimate: the estimates are CPU work, made offline from the rows that come back.
    layers-resnet50) echo "$Q_PY benchmarks/bench_layers.py --model resnet50 --batch 64 --dtype fp16 --rep-ms 40 \
--no-estimate --out $Q_WORK/layers" ;;
    # Per-layer tactic selection on this card (issue 14): rule config vs the chosen one per layer; the
    # cache it writes (rule_ms, tuned_ms per layer and batch) is in fastres-cache/.
    tune-resnet50) echo "$Q_PY -m fastres tune resnet50 --batch 1 256 --dtype fp16 --budget-s 20 \
--max-candidates 3 --no-progress" ;;
    # The issue's ">= 1.5x torch.compile at batch 1" point: one compile mode, the quickest to build.
    compile-resnet50) echo "$bench resnet50 --batch 1 --dtype fp16 --compare eager,compile \
--compile-modes reduce-overhead --no-progress --out $Q_WORK/bench-compile" ;;
  esac
}

stage_status() {  # name, exit status
  case "$1:$2" in
    *:0) echo ok ;;
    *:124) echo TIMEOUT ;;
    *:137) echo "TIMEOUT(killed)" ;;
    pytest-gpu:5|kernels-8bit:5) echo "ok(no tests)" ;;
    install:3) echo "FAIL(pip)" ;;
    install:4) echo "FAIL(import)" ;;
    *) echo "FAIL(rc=$2)" ;;
  esac
}

run_stage() {  # name, budget, needs a GPU, optional
  local name=$1 budget=$2 gpu=$3 optional=${4:-} log="$WORK/$1.log"
  local left=$(( START + DEADLINE_S - $(date +%s) )) limit status secs=0 rc cmd
  limit=$(( left - GRACE < budget ? left - GRACE : budget ))
  [ "$limit" -ge 0 ] || limit=0
  echo
  echo "=== $name (budget ${budget} s, limit ${limit} s; ${left} s to the deadline) ==="
  cmd=$(stage_cmd "$name" "$limit")
  if [ "$limit" -lt "$MIN_STAGE_S" ] || { [ -n "$optional" ] && [ "$limit" -lt "$budget" ]; }; then
    status="skip(no time)"
    echo "SKIP: ${left} s left before the deadline; would run: $cmd" >"$log"
    cut -c1-240 "$log"
  elif [ "$gpu" = 1 ] && [ "$DRY_RUN" = 1 ]; then
    status=skip
    echo "SKIP: dry run (no GPU); would run: $cmd" >"$log"
    cut -c1-240 "$log"
  else
    printf '+ %s\n' "$cmd" >"$log"
    head -n 1 "$log" | cut -c1-240
    local t0=$(date +%s)
    # timeout leads a process group of its own (its pid, written by the shell it replaces): once it
    # returns, whatever the stage left running in the background (jobs of `bash -c` ignore SIGINT) is
    # killed with the group, so that it cannot run on into later stages. In the foreground, not `&`: an
    # asynchronous job would start with SIGINT ignored, and so would everything it runs.
    local pidfile="$WORK/status/.$name.pid"
    bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" timeout -s INT -k "$GRACE" "$limit" bash -c "$cmd" >>"$log" 2>&1
    rc=$?
    kill -KILL -- "-$(cat "$pidfile")" 2>/dev/null
    rm -f "$pidfile"
    secs=$(( $(date +%s) - t0 ))
    status=$(stage_status "$name" "$rc")
    tail -n +2 "$log" | tail -n "$TAIL_LINES" | cut -c1-240
  fi
  [[ "$status" == FAIL* || "$status" == TIMEOUT* ]] && FAILED=1
  [ "$name" = install ] && [[ "$status" == FAIL* ]] && INSTALL_FAILED="$status"
  echo "--> $name: $status (${secs} s)"
  printf '%s|%s|%s|%s\n' "$status" "$secs" "$limit" "$budget" >"$WORK/status/$name"
  RAN+="$name "
  write_summary
  pack
}

# What the summary shows of a stage's log (each line cut short): the lines that answer something.
pytest_logs() { tail -q -n +2 "$WORK/$1.log" "$WORK/$1"-*.log 2>/dev/null; }  # a stage's logs

highlights() {
  local name=$1 log="$WORK/$1.log"
  [ -f "$log" ] || return 0
  case "$name" in
    install) tail -n +2 "$log" | grep -E "^fastres |gpu_check:|rror" | head -n 8 ;;
    versions) grep -E "^(python |gpu: |git_rev |python packages )" "$log" ;;
    smoke) grep -E "^(PASS|FAIL|gpu_smoke)" "$log" ;;
    pytest-gpu|kernels-8bit)  # the -rfE lines with their reasons; from a killed run only the -v lines, test ids
      local failed
      failed=$(pytest_logs "$name" | grep -E "^(FAILED|ERROR) " | sort -u)
      [ -n "$failed" ] || failed=$(pytest_logs "$name" | grep -oE "(FAILED|ERROR) tests/[^ ]+|tests/[^ ]+ (FAILED|ERROR)" \
        | sort -u)
      [ -z "$failed" ] || head -n 20 <<<"$failed"
      echo "-v lines: $(pytest_logs "$name" | grep -cE "(\] | )PASSED") passed, $(pytest_logs "$name" | grep -cE "(\] | )FAILED") failed," \
        "$(pytest_logs "$name" | grep -cE "(\] | )SKIPPED") skipped, $(pytest_logs "$name" | grep -cE "(\] | )ERROR") errors"
      pytest_logs "$name" | grep -cE "^\+{5,} Timeout" | sed '/^0$/d; s/$/ tests hit the 120 s pytest-timeout/'
      pytest_logs "$name" | grep -E "^=+ .*(passed|failed|skipped|error|no tests ran|interrupted).*=+$" ;;
    bench-*|int8-*|fp8-*|compile-*) grep -E "^ {0,4}[0-9]+  [a-z]|^fastres: error|^saved the rows" "$log" ;;
    layers-*) grep -E "FAILED|median per layer kind|^  conv" "$log" ;;
    *) tail -n +2 "$log" | tail -n 6 ;;
  esac | cut -c1-160
}

# The summary: per stage the lines that answer something, self-check warnings, then the stage table
# last, so that it survives however much of stdout is cut from the front.
summary_text() {
  local now kind="GPU run" s name status secs limit budget note warned loud=""
  now=$(date +%s)
  [ "$DRY_RUN" = 1 ] && kind="DRY RUN"
  [ -n "$NO_CUDA" ] && loud+="!!! NOTHING WAS MEASURED ON A GPU: $NO_CUDA; ran as a dry run !!!"$'\n'
  [ -n "$INSTALL_FAILED" ] && loud+="!!! INSTALL $INSTALL_FAILED: fastres does not install or import; \
the GPU stages fail at import !!!"$'\n'
  echo "gpu_check summary, $(date -u +%Y-%m-%dT%H:%M:%SZ): $kind, $(( now - START )) s of the ${DEADLINE_S} s \
deadline${ONLY:+, --only $ONLY}; results in $WORK${OUT_DIR:+, packed into $OUT_DIR/gpu-check.tar.gz}"
  printf '%s' "$loud"
  for s in "${STAGES[@]}"; do
    set -- $s
    [[ "$RAN" == *" $1 "* ]] && [ -f "$WORK/status/$1" ] || continue
    IFS='|' read -r status _ <"$WORK/status/$1"
    [[ "$status" == skip* ]] && continue
    echo "--- $1: $status"
    highlights "$1"
    [[ "$status" == ok* ]] || tail -n +2 "$WORK/$1.log" | tail -n 3 | cut -c1-160
  done
  [ -n "$LEFT_OUT" ] && echo "!!! left out of the tarball (over 1 MiB each; it was over 15 MiB): $LEFT_OUT"
  warned=$(find "$WORK" -name '*.log' -exec grep -hE "SelfCheckWarning|SELF-CHECK FAILED" {} + 2>/dev/null \
    | cut -c1-200 | sort | uniq -c | sort -rn | head -n 6)
  if [ -n "$warned" ]; then
    echo "!!! SelfCheckWarning in the logs (the self-check moved layers to cuDNN or the engine to torch):"
    echo "$warned"
  else
    echo "self-check: no SelfCheckWarning in any log"
  fi
  echo
  printf '%-18s %-16s %8s %6s %7s\n' stage status seconds limit budget
  for s in "${STAGES[@]}"; do
    set -- $s
    name=$1 note=""
    if [ -f "$WORK/status/$name" ]; then
      IFS='|' read -r status secs limit budget <"$WORK/status/$name"
      [[ "$RAN" == *" $name "* ]] || note="(earlier)"
    elif selected "$name"; then
      status=pending secs=- limit=- budget=$2
    else
      status="-" secs=- limit=- budget=$2 note="(not in --only)"
    fi
    printf '%-18s %-16s %8s %6s %7s%s\n' "$name" "$status" "$secs" "$limit" "$budget" "${note:+ $note}"
  done
  printf '%s' "$loud"
}

write_summary() {
  summary_text >"$WORK/summary.txt"
  [ -z "$OUT_DIR" ] || cp "$WORK/summary.txt" "$OUT_DIR/summary.txt"
}

# The work folder into $OUT as one tarball, under a temporary name first: a kill mid-write leaves the
# previous tarball whole. The device returns files up to 16 MiB: over 15 MiB, big files are left out.
pack() {
  [ -n "$OUT_DIR" ] || return 0
  local tmp="$OUT_DIR/gpu-check.tar.gz.tmp" top parent exclude
  top=$(basename "$WORK") parent=$(dirname "$WORK") exclude=$(mktemp)
  tar -czf "$tmp" -C "$parent" "$top" 2>/dev/null
  if [ "$(stat -c %s "$tmp" 2>/dev/null || echo 0)" -gt $(( 15 * 1024 * 1024 )) ]; then
    (cd "$parent" && find "$top" -type f -size +1M) >"$exclude"
    LEFT_OUT=$(tr '\n' ' ' <"$exclude")
    write_summary
    tar -czf "$tmp" -C "$parent" -X "$exclude" "$top" 2>/dev/null
  fi
  rm -f "$exclude"
  mv -f "$tmp" "$OUT_DIR/gpu-check.tar.gz" || echo "gpu_check: could not write $OUT_DIR/gpu-check.tar.gz"
}

main() {
  parse_args "$@"
  init_work
  probe_cuda
  echo "gpu_check: ${#STAGES[@]} stages, deadline ${DEADLINE_S} s; dry run: $DRY_RUN; work folder $WORK;" \
    "returned: ${OUT_DIR:-nothing (OUT not set)}; xdist: $XDIST; pytest-timeout: ${PYTEST_TIMEOUT:-none}"
  local s
  for s in "${STAGES[@]}"; do
    set -- $s
    selected "$1" && run_stage "$@"
  done
  write_summary
  pack
  echo
  echo "=== summary (also $WORK/summary.txt${OUT_DIR:+, $OUT_DIR/summary.txt}) ==="
  cat "$WORK/summary.txt"
  [ -z "$NO_CUDA" ] || return 3  # nothing measured: not a success for a caller that reads the status
  return "$FAILED"  # 1 when a stage of this run failed or ran out of time
}

# Sourced (tests): the functions only.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
