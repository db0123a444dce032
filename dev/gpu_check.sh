#!/usr/bin/env bash
# The GPU kit: one command that checks and measures everything on a machine with an
# NVIDIA GPU and nvcc (issue 7). Under 8 minutes on an H100.
#
#   dev/gpu_check.sh                 all six steps on the GPU
#   dev/gpu_check.sh --cpu           dry run on the CPU build: steps 2, 4, 5 (1, 3, 6 need a GPU)
#   dev/gpu_check.sh --skip-3        leave out step 3 (any --skip-N, repeatable)
#   dev/gpu_check.sh --only 5,6      only these steps
#   dev/gpu_check.sh --summary FILE  where the summary goes (default: $OUT/gpu_check_summary.txt
#                                    when OUT is set, else build/gpu_check_summary.txt)
#   GPU_CHECK_BUDGET=480             seconds after which no further step starts
#
# Steps: 1 GPU, driver, nvcc, SMs; build for the local architecture only
#        2 the pytest suite against the GPU library (ALEXNET_LIB=./libalexnet.so)
#        3 compute-sanitizer memcheck/racecheck/synccheck/initcheck over every kernel
#        4 every op through the CPU and the GPU library on the same inputs: largest difference
#        5 training smoke run: preset alexnet, synthetic data, batch 128, 50 steps
#        6 throughput: our training step vs PyTorch eager/channels_last/torch.compile
# A failing step is reported and the next one still runs; everything printed goes to
# stdout and to the summary file, which ends with the results of every step.
# Without cffi (the GPU machine's Python 3.12), it installs the wheels in .whl/
# (dev/fetch_wheels.sh downloads them; the device call carries .whl).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)

CPU=0
ONLY=""
SKIP=" "
SUMMARY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CPU=1 ;;
        --skip-[1-6]) SKIP="$SKIP${1#--skip-} " ;;
        --only) [ $# -ge 2 ] || { echo "error: --only needs a list of steps, e.g. --only 2,4" >&2; exit 2; }
                ONLY=",$2,"; shift ;;
        --summary) [ $# -ge 2 ] || { echo "error: --summary needs a file" >&2; exit 2; }
                   SUMMARY=$2; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$SUMMARY" ]; then
    if [ -n "${OUT:-}" ]; then SUMMARY=$OUT/gpu_check_summary.txt
    elif [ $CPU = 1 ]; then SUMMARY=build/gpu_check_cpu_summary.txt
    else SUMMARY=build/gpu_check_summary.txt; fi
fi

# Python: the project's venv when there is one (this machine), else python3 (the GPU
# machine's, which has PyTorch). PyTorch runs under TORCH_PYTHON (default python3).
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
TORCH_PYTHON=${TORCH_PYTHON:-python3}
mkdir -p "$(dirname "$SUMMARY")" build || exit 1
# CUDA's tools where an image installs them but leaves them off the PATH.
for dir in /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer; do
    [ -d "$dir" ] && PATH=$PATH:$dir
done
GFLOP_PER_IMAGE=4.136           # training step, REFERENCE.md "Compute"
BUDGET=${GPU_CHECK_BUDGET:-480}  # seconds: no step starts after this (the device call's limit is 600)
WORK=build/gpu_check            # scratch: datasets, runs, logs
RESULTS=()                      # one line per step, printed at the end
GPU_NAME="" ; PEAK_TFLOPS="" ; OURS_IPS="" ; SMOKE_IPS="" ; SMOKE_VERDICT="" ; SMOKE_ARGS=()
TORCH_LINES=""

say() { printf '%s\n' "$*"; }
NAMES=("" "GPU + build" "pytest" "compute-sanitizer" "CPU vs GPU library" "training smoke run" "throughput vs PyTorch")
[ $CPU = 1 ] && NAMES[4]="CPU lib, 2 schedules"
result() { RESULTS+=("$(printf 'step %s %-22s %s' "$1" "${NAMES[$1]}" "$2")"); }
# Run a command with a time limit, echoing it first.
run() { local limit=$1; shift; say "\$ $*"; timeout -k 10 "$limit" "$@"; }

# --- setup: cffi from .whl/ when this Python lacks it ---------------------------------
setup_python() {
    if ! "$PYTHON" -c 'import cffi' 2>/dev/null; then
        if ls .whl/cffi-*.whl >/dev/null 2>&1; then
            say "cffi missing in $PYTHON: installing the wheels in .whl/"
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/alexnet_site .whl/*.whl \
                && export PYTHONPATH=/tmp/alexnet_site${PYTHONPATH:+:$PYTHONPATH}
        else
            say "cffi missing in $PYTHON and no .whl/: run dev/fetch_wheels.sh on a machine with internet and carry .whl"
        fi
    fi
    "$PYTHON" -c 'import cffi, numpy' 2>/dev/null && say "python: $("$PYTHON" --version 2>&1), cffi $("$PYTHON" -c 'import cffi; print(cffi.__version__)')" \
        || say "python: $PYTHON cannot import cffi and numpy: steps 2, 4, 5 will fail"
}

# make, or the same compiler commands where the machine has no make.
build() {
    if command -v make >/dev/null; then
        run 900 make -k -j8 "$@"
    else
        say "no make: building with direct compiler calls"
        local flags="-std=c++17 -O3 -lineinfo -Xptxas -v -Xcompiler -fPIC -gencode arch=compute_$ARCH,code=sm_$ARCH"
        mkdir -p build/gpu build/cpu
        { nvcc $flags -c train_alexnet.cu -o build/gpu/train_alexnet.o 2> build/gpu/ptxas.log \
            && nvcc $flags build/gpu/train_alexnet.o -o train_alexnet \
            && nvcc $flags -shared build/gpu/train_alexnet.o -o libalexnet.so; } &
        nvcc $flags dev/bench_kernels.cu -o build/gpu/bench_kernels 2> build/gpu/bench_ptxas.log &
        g++ -std=c++17 -O2 -g -pthread -fPIC -x c++ -shared train_alexnet.cu -o libalexnet_cpu.so &
        g++ -std=c++17 -O2 -g -pthread -x c++ train_alexnet.cu -o train_alexnet_cpu &
        local ok=0; for job in $(jobs -p); do wait "$job" || ok=1; done; return $ok
    fi
}

# --- 1. the GPU and the build ---------------------------------------------------------
step1() {
    if [ $CPU = 1 ]; then
        say "no GPU in --cpu mode: GPU report and nvcc build skipped; the CPU build:"
        build test-build-cpu || return 1
        result 1 "SKIP (--cpu: no GPU; CPU build ok)"
        return 0
    fi
    command -v nvidia-smi >/dev/null || { result 1 "FAIL (no nvidia-smi)"; return 1; }
    local info
    info=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv,noheader | head -1)
    say "GPU: $info"
    GPU_NAME=$(echo "$info" | cut -d, -f1 | sed 's/^ *//; s/ *$//')
    ARCH=$(echo "$info" | cut -d, -f4 | tr -d ' .')
    local clock sms
    clock=$(echo "$info" | cut -d, -f5 | tr -dc '0-9')
    say "nvcc: $(nvcc --version | tail -1)"
    local built=PASS
    build test-build bench-kernels GPU_ARCH="$ARCH" || built="FAIL (build: see above)"
    # The SM count from our own benchmark's header (a first CUDA call through our build).
    sms=$(build/gpu/bench_kernels --batch 1 --only no-such-op 2>&1 | grep -oE '[0-9]+ SMs' | cut -d' ' -f1)
    say "SMs: ${sms:=?}, max SM clock ${clock} MHz, architecture sm_$ARCH"
    peak_tflops "$sms" "$clock"
    say "FP32 peak: ${PEAK_TFLOPS:-?} TFLOP/s"
    local spills
    spills=$(cat build/gpu/ptxas.log build/gpu/bench_ptxas.log 2>/dev/null | grep -cE '[1-9][0-9]* bytes spill')
    say "ptxas: $spills function(s) with register spills"
    result 1 "$built ($GPU_NAME, $sms SMs, sm_$ARCH, $(nvcc --version | tail -1 | sed 's/Build //'), spills: $spills)"
    [ "$built" = PASS ]
}

# FP32 peak: datasheet values for the lent cards, else SMs x 128 lanes x 2 FLOP x clock.
peak_tflops() {
    case "$GPU_NAME" in
        *H100*PCIe*) PEAK_TFLOPS=51.2 ;;
        *H100*NVL*) PEAK_TFLOPS=60.0 ;;
        *H100*|*H200*) PEAK_TFLOPS=66.9 ;;
        *) if [ "$1" != "?" ] && [ -n "$2" ]; then
               PEAK_TFLOPS=$(awk -v s="$1" -v c="$2" 'BEGIN { printf "%.1f", s * 128 * 2 * c / 1e6 }')
           else PEAK_TFLOPS=""; fi ;;
    esac
}

# --- 2. the test suite against the GPU library --------------------------------------
step2() {
    # Not the dry-run tests (this script inside itself); the rest of test_gpu_check.py runs.
    local lib=$ROOT/libalexnet.so args=(-q -p no:cacheprovider -m "not slow"
        --deselect tests/test_gpu_check.py::test_cpu_dry_run --deselect tests/test_gpu_check.py::test_only_and_skip)
    if [ $CPU = 1 ]; then
        lib=$ROOT/libalexnet_cpu.so
        # A quick subset (GPU_CHECK_CPU_TESTS overrides): the whole suite is `make test`.
        args+=(-k "${GPU_CHECK_CPU_TESTS:-awkward or bad_arg}")
    elif "$PYTHON" -c 'import xdist' 2>/dev/null; then
        args+=(-n 8)
    fi
    [ -f "$lib" ] || { result 2 "FAIL ($lib missing)"; return 1; }
    local log=$WORK/pytest.log status
    ALEXNET_LIB=$lib run 200 "$PYTHON" -m pytest "${args[@]}" tests 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    local tally
    tally=$(grep -E '(passed|failed|error)' "$log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
    if [ "$status" = 0 ]; then result 2 "PASS ($tally; ALEXNET_LIB=$(basename "$lib"))"
    elif [ "$status" = 124 ]; then result 2 "FAIL (timed out after 200 s; $tally)"; return 1
    else result 2 "FAIL (exit $status; $tally)"; return 1; fi
}

# --- 3. compute-sanitizer over every kernel -------------------------------------------
step3() {
    if [ $CPU = 1 ]; then
        say "--cpu: compute-sanitizer needs a GPU; instead every kernel runs once in the CPU build"
        run 120 build/cpu/bench_kernels --batch 1 --iters 1 --warmup 0 || {
            result 3 "FAIL (--cpu: compute-sanitizer needs a GPU; build/cpu/bench_kernels --batch 1 failed)"; return 1; }
        result 3 "SKIP (--cpu: compute-sanitizer needs a GPU; every kernel ran once in the CPU build: ok)"
        return 0
    fi
    command -v compute-sanitizer >/dev/null || { result 3 "FAIL (not installed)"; return 1; }
    [ -x build/gpu/bench_kernels ] || { result 3 "FAIL (build/gpu/bench_kernels missing)"; return 1; }
    SANITIZED="" ; SANITIZE_BAD=0
    local tool
    for tool in memcheck racecheck synccheck initcheck; do
        sanitize "$tool" "$tool(kernels)" build/gpu/bench_kernels --batch 2 --iters 1 --warmup 0
    done
    # The model's own kernels, copies and loader: two steps of the small preset.
    if ./train_alexnet --help 2>&1 | grep -q -- '--arch'; then
        rm -rf "$WORK/data_sanitize" "$WORK/run_sanitize"
        if run 120 "$PYTHON" alexnet.py prepare synthetic --out "$WORK/data_sanitize" --size 32 \
                --train-images 32 --val-images 8 >/dev/null; then
            sanitize memcheck "memcheck(training)" ./train_alexnet --data "$WORK/data_sanitize" \
                --out "$WORK/run_sanitize" --arch small --batch 8 --steps 2 --devices 0 --save-every 0
        else
            SANITIZED+="memcheck(training) NO DATA, "; SANITIZE_BAD=1
        fi
    fi
    SANITIZED=${SANITIZED%, }
    if [ $SANITIZE_BAD = 0 ]; then result 3 "PASS ($SANITIZED)"
    else result 3 "FAIL ($SANITIZED; logs in $WORK/sanitizer_*.log)"; return 1; fi
}

# compute-sanitizer --tool TOOL over a command; appends "LABEL ok|FAIL|TIMEOUT" to SANITIZED.
sanitize() {
    local tool=$1 label=$2 status log
    shift 2
    log=$WORK/sanitizer_${label//[^a-z]/_}.log
    say "--- $label: $*"
    timeout -k 10 120 compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 10 "$@" > "$log" 2>&1
    status=$?
    grep -E '^========= |rror' "$log" | tail -15
    case $status in
        0) SANITIZED+="$label ok, " ;;
        124) SANITIZED+="$label TIMEOUT, "; SANITIZE_BAD=1 ;;
        *) SANITIZED+="$label FAIL($status), "; SANITIZE_BAD=1 ;;
    esac
}

# --- 4. the same ops through two libraries --------------------------------------------
step4() {
    local status=0 line
    rm -f "$WORK/compare.log"
    if [ $CPU = 1 ]; then
        say "--cpu: the CPU library against itself, forward vs reverse thread/block order (must be bitwise equal)"
        run 120 "$PYTHON" dev/compare_libs.py libalexnet_cpu.so libalexnet_cpu.so --shapes small --batch 3 \
            --env-a CUDA_CPU_SCHEDULE=forward --env-b CUDA_CPU_SCHEDULE=reverse --exact \
            --allow-inexact "${GPU_CHECK_ATOMIC_OPS:-}" 2>&1 | tee "$WORK/compare.log"
        status=${PIPESTATUS[0]}
    else
        local shapes
        for shapes in small alexnet; do
            run 150 "$PYTHON" dev/compare_libs.py libalexnet_cpu.so libalexnet.so --shapes $shapes --batch 2 \
                2>&1 | tee -a "$WORK/compare.log"
            [ "${PIPESTATUS[0]}" = 0 ] || status=1
        done
    fi
    local summary
    summary=$(grep '^compare_libs: ' "$WORK/compare.log" | sed 's/^compare_libs: //' | paste -sd';' - | sed 's/;/; /g')
    if [ "$status" = 0 ]; then result 4 "PASS (${summary:-no summary})"
    else result 4 "FAIL (${summary:-no summary}; exit $status; see $WORK/compare.log)"; return 1; fi
}

# --- 5. training smoke run --------------------------------------------------------------
# GPU: the paper's recipe on the alexnet preset, 384 synthetic 256x256 images, batch 128,
# 50 steps, both towers on GPU 0. --cpu: the small preset by full-batch gradient descent
# (16 images, batch 16, no momentum, augmentation or dropout), where every step must
# lower the loss on the same batch, so "falling" is a real check even in 6 steps.
step5() {
    smoke_run
    case $? in
        2) result 5 "SKIP (no model yet: $SMOKE_EXE has no --arch)"; return 0 ;;
        0) result 5 "$SMOKE_VERDICT [${SMOKE_ARGS[*]}]"; return 0 ;;
        *) result 5 "$SMOKE_VERDICT [${SMOKE_ARGS[*]}]"; return 1 ;;
    esac
}

# Prepare the data and train; sets SMOKE_VERDICT and SMOKE_IPS. Returns 2 without a model.
smoke_run() {
    SMOKE_EXE=./train_alexnet
    [ $CPU = 1 ] && SMOKE_EXE=./train_alexnet_cpu
    "$SMOKE_EXE" --help 2>&1 | grep -q -- '--arch' || return 2
    local data=$WORK/data_smoke out=$WORK/run_smoke prepare
    if [ $CPU = 1 ]; then
        prepare=(--size 32 --train-images 16 --val-images 8)
        SMOKE_ARGS=(--arch small --batch 16 --steps 6 --lr 0.05 --momentum 0 --no-augment --dropout 0)
    else
        prepare=(--size 256 --train-images 384 --val-images 128)
        SMOKE_ARGS=(--arch alexnet --batch 128 --steps 50 --devices 0)
    fi
    rm -rf "$data" "$out"
    if ! run 180 "$PYTHON" alexnet.py prepare synthetic --out "$data" "${prepare[@]}"; then
        SMOKE_VERDICT="FAIL (prepare synthetic)"
        return 1
    fi
    run 300 "$SMOKE_EXE" --data "$data" --out "$out" "${SMOKE_ARGS[@]}" --log-every 1 \
        --eval-every 1000000 --save-every 0 2>&1 | tee "$WORK/train.log"
    local status=${PIPESTATUS[0]}
    SMOKE_VERDICT=$("$PYTHON" dev/train_log.py "$WORK/train.log")
    [ "$status" = 0 ] || SMOKE_VERDICT="FAIL (exit $status) ${SMOKE_VERDICT#* }"
    SMOKE_IPS=$(echo "$SMOKE_VERDICT" | grep -oE '[0-9.]+ images/s' | cut -d' ' -f1)
    case $SMOKE_VERDICT in PASS*) return 0 ;; *) return 1 ;; esac
}

# --- 6. throughput: ours vs PyTorch ---------------------------------------------------
step6() {
    if [ $CPU = 1 ]; then
        result 6 "SKIP (--cpu: timed on a GPU only)"
        return 0
    fi
    local bad=0
    say "--- per-kernel benchmark, batch 128"
    run 120 build/gpu/bench_kernels --batch 128 --iters 10 2>&1 | tee "$WORK/bench_kernels.log"
    [ "${PIPESTATUS[0]}" = 0 ] || bad=1
    say "--- our training step: --bench (one device-resident batch, CUDA events, after warm-up)"
    [ -d "$WORK/data_smoke" ] || smoke_run
    run 180 ./train_alexnet --data "$WORK/data_smoke" --arch alexnet --batch 128 --devices 0 --bench 20 \
        2>&1 | tee "$WORK/bench_train.log"
    [ "${PIPESTATUS[0]}" = 0 ] || bad=1
    OURS_IPS=$(grep -oE '[0-9.]+ images/s' "$WORK/bench_train.log" | tail -1 | cut -d' ' -f1)
    local note="train_alexnet --bench 20, batch 128, both towers on GPU 0"
    [ -n "$OURS_IPS" ] || note="no measurement: --bench printed no images/s"
    say "ours: ${OURS_IPS:-?} images/s ($note)"
    say "--- PyTorch, the same architecture, batch 128, FP32"
    run 330 "$TORCH_PYTHON" dev/bench_torch.py --batch 128 --steps 20 --warmup 3 --compile-limit 60 \
        --ours "${OURS_IPS:-0}" --peak "${PEAK_TFLOPS:-0}" 2>&1 | tee "$WORK/bench_torch.log"
    [ "${PIPESTATUS[0]}" = 0 ] || bad=1
    TORCH_LINES=$(grep -E '^(torch|ours)' "$WORK/bench_torch.log")
    local ratios
    ratios=$(grep -oE '^ours / torch [a-z_+0-9]+ = [0-9.]+' "$WORK/bench_torch.log" | sed 's/ours \/ torch //' | paste -sd' ' -)
    local kernels
    kernels=$(grep -oE '= [0-9.]+ images/s' "$WORK/bench_kernels.log" | cut -d' ' -f2)
    result 6 "$([ $bad = 0 ] && echo PASS || echo FAIL) (ours ${OURS_IPS:-?} images/s; ours/torch: ${ratios:-none}; kernels alone: ${kernels:-?} images/s)"
    return $bad
}

main() {
    local start=$SECONDS step
    mkdir -p "$WORK"
    say "gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') $( [ $CPU = 1 ] && echo '(--cpu dry run)') in $ROOT"
    say "commit $(git log -1 --format='%h %s' 2>/dev/null || echo '?')"
    say "summary: $SUMMARY"
    setup_python
    for step in 1 2 3 4 5 6; do
        if { [ -n "$ONLY" ] && [[ $ONLY != *",$step,"* ]]; } || [[ $SKIP == *" $step "* ]]; then
            result $step "SKIP (by option)"
            continue
        fi
        if [ $((SECONDS - start)) -ge "$BUDGET" ]; then
            result $step "SKIP (the time budget of $BUDGET s is used up; rerun with --only $step)"
            continue
        fi
        say ""
        say "=== step $step  ($((SECONDS - start)) s)"
        local before=${#RESULTS[@]}
        "step$step" || say "step $step failed; going on"
        [ ${#RESULTS[@]} -gt "$before" ] || result $step "FAIL (see its output above)"
    done
    say ""
    say "=== results ($((SECONDS - start)) s in all)"
    [ -n "$GPU_NAME" ] && say "GPU: $GPU_NAME, FP32 peak ${PEAK_TFLOPS:-?} TFLOP/s"
    [ -n "$TORCH_LINES" ] && say "$TORCH_LINES"
    local line failed=0
    for line in "${RESULTS[@]}"; do
        say "$line"
        [[ $line == *" FAIL"* ]] && failed=1
    done
    say "gpu_check: $([ $failed = 0 ] && echo 'no step failed' || echo 'some step FAILED'); summary in $SUMMARY"
    return $failed
}

main 2>&1 | tee "$SUMMARY"
exit "${PIPESTATUS[0]}"
