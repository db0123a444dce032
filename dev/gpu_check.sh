#!/usr/bin/env bash
# The GPU kit: one command that builds, times and checks everything on a machine with an
# NVIDIA GPU and nvcc, the most important numbers first. Under 8 minutes on an H100.
#
#   dev/gpu_check.sh                 the six steps below, in this order
#   dev/gpu_check.sh --cpu           dry run on the CPU build: steps 2, 4, 6 run; 1, 3, 5 report SKIP
#   dev/gpu_check.sh --only 3        only these steps (a list: --only 2,3); they use the binaries
#                                    already built: on a fresh machine add step 1 (--only 1,3)
#   dev/gpu_check.sh --skip-5        leave out step 5 (any --skip-N, repeatable)
#   dev/gpu_check.sh --torch-compile step 3 also times torch.compile, after everything else (+1-2 min)
#   dev/gpu_check.sh --summary FILE  the verdict file (default: $OUT/summary.txt when OUT is set,
#                                    else build/gpu_check_summary.txt; --cpu: build/gpu_check_cpu_summary.txt)
#   GPU_CHECK_BUDGET=480             seconds for the whole run: no step runs past it, and none
#                                    starts with under 20 s of it left (the step limits below add
#                                    up to more: a slow step eats into the later ones' time)
#
# Steps, in this order, each under its own time limit:
#   1 build        [240 s] the GPU, driver and nvcc; make -j<cores> GPU_ARCH=<this GPU's> of what
#                  the later steps run (no ASan build); SMs, FP32 peak, register spills (ptxas)
#   2 smoke        [ 90 s] ./train_alexnet --bench 3 on a synthetic batch of 128 with
#                  ALEXNET_SYNC_LAUNCHES=1: every launch synchronised and checked, so a fault
#                  names its kernel
#   3 throughput   [180 s] ours against PyTorch in the same run, each of our precisions beside its
#                  counterpart: ./train_alexnet --bench 20 --precision fp32, tf32, bf16 (batch
#                  128, both towers on GPU 0), then PyTorch's modes, each ratio ours/torch with
#                  our matching precision: fp32 (strict FP32, TF32 off; ours fp32: the headline
#                  ratio), tf32 (PyTorch's default: TF32 convolutions, FP32 matmuls; ours tf32),
#                  channels_last (strict FP32; ours fp32), bf16 (AMP autocast, channels_last;
#                  ours bf16), compile with --torch-compile (ours fp32); then
#                  build/gpu/bench_kernels --batch 128 --precision P for each (GFLOP/s per
#                  kernel); then the kernel ladder of dev/cuda at conv2 and fc6 (every version,
#                  the tf32/bf16 tensor-core ones included, each checked against its reference:
#                  a FAIL fails the step)
#   4 correctness  [150 s] every op through the CPU and the GPU library on the same inputs
#                  (largest difference); a 50-step training run whose loss must fall
#   5 sanitizer    [150 s] compute-sanitizer memcheck over every kernel (batch 2) and two training
#                  steps; racecheck over the shared-memory kernels (GEMM as conv5 and fc8, softmax)
#                  at batch 1-2; synccheck and initcheck only when the budget leaves time for them
#   6 pytest       [180 s] the test suite against the GPU library (ALEXNET_LIB=./libalexnet.so)
#
# Outputs: each step appends its verdict line to the summary file the moment it ends (so a
# run cut short still reports every finished step) and copies its log into $OUT, flat:
# summary.txt build.log smoke.log throughput.log compare.log sanitizer.log pytest.log
# (7 files at most; without OUT the logs stay in build/gpu_check/, GPU_CHECK_WORK moves it).
# A failing step is reported and the next one still runs; the exit status is 1 when a step
# failed. Without cffi (the GPU machine's Python 3.12), it installs the wheels in .whl/
# (dev/fetch_wheels.sh downloads them; the device call carries .whl).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)

CPU=0
ONLY=""
SKIP=" "
SUMMARY=""
TORCH_COMPILE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CPU=1 ;;
        --skip-[1-6]) SKIP="$SKIP${1#--skip-} " ;;
        --only) [[ $# -ge 2 && $2 =~ ^[1-6](,[1-6])*$ ]] || {
                    echo "error: --only needs a list of steps 1-6, e.g. --only 2,3" >&2; exit 2; }
                ONLY=",$2,"; shift ;;
        --summary) [ $# -ge 2 ] || { echo "error: --summary needs a file" >&2; exit 2; }
                   SUMMARY=$2; shift ;;
        --torch-compile) TORCH_COMPILE=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
OUTDIR=${OUT:-}
if [ -z "$SUMMARY" ]; then
    if [ -n "$OUTDIR" ]; then SUMMARY=$OUTDIR/summary.txt
    elif [ $CPU = 1 ]; then SUMMARY=build/gpu_check_cpu_summary.txt
    else SUMMARY=build/gpu_check_summary.txt; fi
fi

# Python: the project's venv when there is one (this machine), else python3 (the GPU
# machine's, which has PyTorch). PyTorch runs under TORCH_PYTHON (default python3).
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
TORCH_PYTHON=${TORCH_PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-build/gpu_check}   # scratch: datasets, runs, logs
mkdir -p "$(dirname "$SUMMARY")" "$WORK" build ${OUTDIR:+"$OUTDIR"} || exit 1
# CUDA's tools where an image installs them but leaves them off the PATH.
for dir in /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer; do
    [ -d "$dir" ] && PATH=$PATH:$dir
done
GFLOP_PER_IMAGE=4.136           # one training step of the paper's network, per image (forward + backward)
PRECISIONS="fp32 tf32 bf16"     # of the matrix products (--precision), each timed in step 3
BUDGET=${GPU_CHECK_BUDGET:-480}  # seconds for the whole run (the device call's limit is 600)
JOBS=${GPU_CHECK_JOBS:-$(nproc 2>/dev/null || echo 8)}
NAMES=("" "build" "smoke" "throughput" "correctness" "sanitizer" "pytest")
LIMITS=(0 240 90 180 150 150 180)
[ $TORCH_COMPILE = 1 ] && LIMITS[3]=$((LIMITS[3] + 150))
MIN_START=20                    # seconds of budget a step needs to be worth starting
SANITIZER_EXTRA=120             # synccheck + initcheck: run only when this much is left over
DATA=$WORK/data_smoke           # synthetic dataset of steps 2-4
RESULTS=()                      # the summary's step lines, printed again at the end
DETAILS=()                      # their indented detail lines (the PyTorch results)
GPU_NAME="" ; GPU_ERROR="" ; ARCH="" ; CLOCK="" ; SMS="" ; PEAK_TFLOPS=""
T0=$SECONDS ; STEP_END=$SECONDS ; STEP_VERDICT="" ; STEP_DETAILS=()

say() { printf '%s\n' "$*"; }
selected() { { [ -z "$ONLY" ] || [[ $ONLY == *",$1,"* ]]; } && [[ $SKIP != *" $1 "* ]]; }
left() { echo $((BUDGET - (SECONDS - T0))); }
verdict() { STEP_VERDICT=$1; }
# Run a command under a time limit: its own, cut to what is left of the step's. Status 124
# (or 137) when it timed out, 200 when no time was left to start it.
run() {
    local limit=$1 rest=$((STEP_END - SECONDS)); shift
    [ "$rest" -lt "$limit" ] && limit=$rest
    if [ "$limit" -lt 1 ]; then say "(no time left in this step for: $*)"; return 200; fi
    say "\$ $*   (limit ${limit} s)"
    timeout -k 5 "$limit" "$@"
}
# Copy a step's log from $WORK into $OUT (flat; the last 15 MB: the device returns 16 MB per file).
keep_log() {
    [ -n "$OUTDIR" ] && [ -f "$WORK/$1" ] && tail -c 15000000 "$WORK/$1" > "$OUTDIR/$1"
    return 0
}
# Append a line to the summary file now, and keep it for the final report.
summary_line() { printf '%s\n' "$1" >> "$SUMMARY"; }
result() {
    local line
    line=$(printf 'step %s %-11s %s' "$1" "${NAMES[$1]}" "$2")
    RESULTS+=("$line")
    summary_line "$line"
    say "$line"
}
is_number() { [[ $1 =~ ^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$ ]]; }
timed_out() { [ "$1" = 124 ] || [ "$1" = 137 ] || [ "$1" = 200 ]; }

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
        || say "python: $PYTHON cannot import cffi and numpy: steps 4 and 6 will fail"
}

# The GPU from nvidia-smi: name, architecture, clock (every GPU step needs them, --only too).
gpu_info() {
    command -v nvidia-smi >/dev/null || { GPU_ERROR="no nvidia-smi"; return 1; }
    local info
    info=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv,noheader 2>&1 | head -1)
    say "GPU: $info"
    GPU_ERROR=""
    GPU_NAME=$(echo "$info" | cut -d, -f1 | sed 's/^ *//; s/ *$//')
    ARCH=$(echo "$info" | cut -d, -f4 | tr -d ' .')
    CLOCK=$(echo "$info" | cut -d, -f5 | tr -dc '0-9')
    [[ $ARCH =~ ^[0-9]+$ ]] || { GPU_ERROR="nvidia-smi: $info"; ARCH=""; return 1; }
}

# SMs from our own benchmark's header (a first CUDA call through our build), and the FP32
# peak: datasheet values for the lent cards, else SMs x 128 lanes x 2 FLOP x clock.
gpu_peak() {
    [ -x build/gpu/bench_kernels ] && SMS=$(build/gpu/bench_kernels --batch 1 --only no-such-op 2>&1 | grep -oE '[0-9]+ SMs' | cut -d' ' -f1)
    case "$GPU_NAME" in
        *H100*PCIe*) PEAK_TFLOPS=51.2 ;;
        *H100*NVL*) PEAK_TFLOPS=60.0 ;;
        *H100*|*H200*) PEAK_TFLOPS=66.9 ;;
        *) if [ -n "$SMS" ] && [ -n "$CLOCK" ]; then
               PEAK_TFLOPS=$(awk -v s="$SMS" -v c="$CLOCK" 'BEGIN { printf "%.1f", s * 128 * 2 * c / 1e6 }')
           fi ;;
    esac
}

# make, or the same compiler commands where the machine has no make.
build() {
    if command -v make >/dev/null; then
        run "${LIMITS[1]}" make -k -j"$JOBS" "$@"
    else
        say "no make: building with direct compiler calls"
        local flags="-std=c++17 -O3 -lineinfo -Xptxas -v -Xcompiler -fPIC -gencode arch=compute_$ARCH,code=sm_$ARCH"
        mkdir -p build/gpu build/cpu
        if [ $CPU = 0 ]; then
            { nvcc $flags -c alexnet_api.cu -o build/gpu/train_alexnet.o 2> build/gpu/ptxas.log \
                && nvcc $flags build/gpu/train_alexnet.o -o train_alexnet \
                && nvcc $flags -shared build/gpu/train_alexnet.o -o libalexnet.so; } &
            nvcc $flags dev/bench_kernels.cu -o build/gpu/bench_kernels 2> build/gpu/bench_ptxas.log &
            mkdir -p build/gpu/dev_cuda
            local rung; for rung in conv_forward fc_forward; do
                nvcc $flags dev/cuda/$rung.cu -o build/gpu/dev_cuda/$rung 2> build/gpu/dev_cuda/$rung.ptxas.log &
            done
            g++ -std=c++17 -O2 -g -pthread -fPIC -I. -x c++ -shared dev/runtime_test_kernels.cu -o build/libruntime_tests.so &
        fi
        g++ -std=c++17 -O2 -g -pthread -fPIC -x c++ -shared alexnet_api.cu -o libalexnet_cpu.so &
        g++ -std=c++17 -O2 -g -pthread -x c++ train_alexnet.cu -o train_alexnet_cpu &
        g++ -std=c++17 -O2 -g -pthread -x c++ dev/bench_kernels.cu -o build/cpu/bench_kernels &
        local ok=0 job; for job in $(jobs -p); do wait "$job" || ok=1; done; return $ok
    fi
}

# The synthetic dataset of steps 2-4, prepared once and reused while alexnet.py and the
# sizes are unchanged. GPU: 384 training images of 256x256 (a --bench batch of 128, three
# epochs of the training run); --cpu: 16 of 32x32 for the small preset.
ensure_data() {
    local prepare key
    if [ $CPU = 1 ]; then prepare=(--size 32 --train-images 16 --val-images 8)
    else prepare=(--size 256 --train-images 384 --val-images 128); fi
    key="${prepare[*]} $(cksum < alexnet.py)"
    [ -f "$DATA.ok" ] && [ "$(cat "$DATA.ok")" = "$key" ] && return 0
    rm -rf "$DATA" "$DATA.ok"
    run 120 "$PYTHON" alexnet.py prepare synthetic --out "$DATA" "${prepare[@]}" || return 1
    printf '%s\n' "$key" > "$DATA.ok"
}

# --- 1. the GPU and the build ---------------------------------------------------------
step1() {
    local log=$WORK/build.log status
    if [ $CPU = 1 ]; then
        say "no GPU in --cpu mode: GPU report and nvcc build skipped; the CPU build:"
        build cpu build/cpu/bench_kernels 2>&1 | tee "$log"
        status=${PIPESTATUS[0]}
        keep_log build.log
        if [ "$status" = 0 ]; then verdict "SKIP (--cpu: no GPU; CPU build ok)"
        else verdict "FAIL (--cpu: the CPU build failed, exit $status; see build.log)"; fi
        return
    fi
    : > "$log"
    if [ -z "$ARCH" ]; then verdict "FAIL (${GPU_ERROR:-no GPU found})"; return; fi
    local nvcc_version
    nvcc_version=$(nvcc --version 2>/dev/null | tail -1 | sed 's/^Build //')
    say "nvcc: ${nvcc_version:-not found}" | tee -a "$log"
    # What steps 2-6 run: train_alexnet, libalexnet.so, build/gpu/bench_kernels, the ladder
    # (step 3); the CPU library (step 4) and what the test suite loads (step 6). No ASan build.
    build GPU_ARCH="$ARCH" gpu cpu bench-kernels dev-cuda-gpu build/libruntime_tests.so 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    gpu_peak
    say "SMs: ${SMS:-?}, max SM clock ${CLOCK:-?} MHz, sm_$ARCH, FP32 peak ${PEAK_TFLOPS:-?} TFLOP/s"
    local spills ptxas
    spills=$(cat build/gpu/ptxas.log build/gpu/bench_ptxas.log 2>/dev/null | grep -cE '[1-9][0-9]* bytes spill')
    say "ptxas: $spills line(s) with register spills (build/gpu/ptxas.log)"
    for ptxas in build/gpu/ptxas.log build/gpu/bench_ptxas.log; do
        [ -f "$ptxas" ] && { say "--- $ptxas"; cat "$ptxas"; } >> "$log"
    done
    keep_log build.log
    local facts="$GPU_NAME, ${SMS:-?} SMs, sm_$ARCH, FP32 peak ${PEAK_TFLOPS:-?} TFLOP/s, ${nvcc_version:-no nvcc}, spills: $spills"
    if [ "$status" = 0 ]; then verdict "PASS ($facts)"
    elif timed_out "$status"; then verdict "FAIL (build timed out; $facts; see build.log)"
    else verdict "FAIL (build failed, exit $status; $facts; see build.log)"; fi
}

# --- 2. smoke run: three training steps, every launch synchronised ------------------
step2() {
    local log=$WORK/smoke.log exe=./train_alexnet args=(--arch alexnet --batch 128 --devices 0) status
    [ $CPU = 1 ] && exe=./train_alexnet_cpu args=(--arch small --batch 16)
    : > "$log"
    ensure_data 2>&1 | tee -a "$log"
    if [ "${PIPESTATUS[0]}" != 0 ]; then keep_log smoke.log; verdict "FAIL (prepare synthetic; see smoke.log)"; return; fi
    if [ ! -x "$exe" ]; then verdict "FAIL ($exe missing: build it with step 1)"; return; fi
    run 60 env ALEXNET_SYNC_LAUNCHES=1 "$exe" --data "$DATA" "${args[@]}" --bench 3 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    keep_log smoke.log
    local line loss ips note=""
    line=$(grep '^bench |' "$log" | tail -1)
    loss=$(sed -n 's/.*last loss \([^ ]*\).*/\1/p' <<< "$line")
    ips=$(grep -oE '[0-9.]+ images/s' <<< "$line" | cut -d' ' -f1)
    grep -q ALEXNET_SYNC_LAUNCHES train_alexnet.cu || note="; ALEXNET_SYNC_LAUNCHES not in train_alexnet.cu yet: launches not synchronised"
    if [ "$status" = 0 ] && [ -n "$line" ] && is_number "$loss"; then
        verdict "PASS (--bench 3 ${args[*]} with ALEXNET_SYNC_LAUNCHES=1: last loss $loss, ${ips:-?} images/s with every launch synchronised$note)"
    elif [ "$status" = 0 ]; then
        verdict "FAIL (loss '${loss:-none}' is not a finite number$note; see smoke.log)"
    else
        local why
        why=$(grep -iE 'error|fault|illegal|abort' "$log" | tail -1 | cut -c1-200)
        timed_out "$status" && why="timed out${why:+; $why}"
        verdict "FAIL (exit $status${why:+: $why}$note; see smoke.log)"
    fi
}

# --- 3. throughput: ours vs PyTorch, each precision beside its counterpart; per kernel ---
step3() {
    if [ $CPU = 1 ]; then verdict "SKIP (--cpu: throughput is timed on a GPU only)"; return; fi
    local log=$WORK/throughput.log one=$WORK/throughput_one.log bad=() status p ips
    local -A ours=() kernels=()   # images/s per precision: our training step, our kernels alone
    local ours_arg=""             # --ours of bench_torch.py: fp32=X,tf32=Y,bf16=Z (the measured ones)
    : > "$log"
    ensure_data 2>&1 | tee -a "$log"
    if [ "${PIPESTATUS[0]}" != 0 ]; then keep_log throughput.log; verdict "FAIL (prepare synthetic; see throughput.log)"; return; fi
    [ -n "$PEAK_TFLOPS" ] || gpu_peak
    for p in $PRECISIONS; do
        say "--- ours $p: train_alexnet --precision $p --bench 20, batch 128, both towers on GPU 0 (one device-resident batch, CUDA events after 3 warm-up steps)" | tee -a "$log"
        run 60 ./train_alexnet --data "$DATA" --arch alexnet --batch 128 --devices 0 --precision "$p" --bench 20 2>&1 \
            | tee "$one" | tee -a "$log"
        status=${PIPESTATUS[0]}
        # Its "bench | N steps of batch B | <precision> | ... | X images/s | ..." line.
        ips=$(grep -E "^bench \| [^|]* \| $p \| " "$one" | grep -oE '[0-9.]+ images/s' | tail -1 | cut -d' ' -f1)
        if [ "$status" = 0 ] && is_number "$ips"; then
            ours[$p]=$ips
            ours_arg+="${ours_arg:+,}$p=$ips"
        elif [ "$status" = 0 ]; then bad+=("ours $p: no 'bench | ... | $p |' line")
        else bad+=("ours $p: exit $status, no images/s"); fi
    done
    say "--- PyTorch, the same network and step, batch 128: fp32 (strict FP32; vs ours fp32), tf32 (its default; vs ours tf32), channels_last (strict FP32; vs ours fp32), bf16 (AMP, channels_last; vs ours bf16)" | tee -a "$log"
    run 150 "$TORCH_PYTHON" dev/bench_torch.py --batch 128 --steps 20 --warmup 3 \
        --modes fp32,tf32,channels_last,bf16 --ours "${ours_arg:-0}" --peak "${PEAK_TFLOPS:-0}" 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    case $status in
        0) ;;
        2) bad+=("$(grep -m1 '^bench_torch: ' "$log" | sed 's/^bench_torch: /PyTorch: /')") ;;
        *) timed_out "$status" && bad+=("PyTorch timed out") || bad+=("PyTorch: a mode failed (exit $status)") ;;
    esac
    for p in $PRECISIONS; do
        say "--- per kernel: build/gpu/bench_kernels --batch 128 --precision $p (GFLOP/s)" | tee -a "$log"
        run 60 build/gpu/bench_kernels --batch 128 --iters 10 --precision "$p" 2>&1 | tee "$one" | tee -a "$log"
        status=${PIPESTATUS[0]}
        [ "$status" = 0 ] || bad+=("bench_kernels $p: exit $status")
        kernels[$p]=$(grep -oE '= [0-9.]+ images/s' "$one" | tail -1 | cut -d' ' -f2)
    done
    # The ladder: the tensor-core versions checked on the hardware against their rounded-operand
    # reference (the CPU build checks them under the emulation), and timed beside the core.
    local rung line ladder=()
    for rung in "conv_forward --layer conv2" "fc_forward --layer fc6"; do
        say "--- the ladder: build/gpu/dev_cuda/$rung --iters 5" | tee -a "$log"
        run 30 build/gpu/dev_cuda/$rung --iters 5 2>&1 | tee "$WORK/ladder.log" | tee -a "$log"
        status=${PIPESTATUS[0]}
        [ "$status" = 0 ] || bad+=("ladder ${rung%% *}: exit $status")
        while IFS= read -r line; do ladder+=("    ${rung##* } $line"); done \
            < <(grep -E '^[0-9]+ (conv_forward|fc_forward) \(auto|^[0-9]+ mma ' "$WORK/ladder.log" | sed 's/  */ /g')
    done
    if [ $TORCH_COMPILE = 1 ]; then
        say "--- PyTorch torch.compile (--torch-compile), strict FP32 (vs ours fp32)" | tee -a "$log"
        run 150 "$TORCH_PYTHON" dev/bench_torch.py --batch 128 --steps 20 --warmup 3 --modes compile \
            --compile-limit 100 --ours "${ours[fp32]:-0}" --peak "${PEAK_TFLOPS:-0}" 2>&1 | tee -a "$log"
        status=${PIPESTATUS[0]}
        [ "$status" = 0 ] || bad+=("torch.compile: exit $status")
    fi
    keep_log throughput.log
    # bench_torch's "ours <precision> / torch <mode> = R" lines, in its order: "<precision>/<mode> R".
    local ratios="" ours_text="" kernels_text="" fp32_text="" pair value
    while read -r pair value; do
        [ "$pair" = fp32/fp32 ] && pair="fp32/fp32 (headline)"
        ratios+="${ratios:+, }$pair $value"
    done < <(grep -oE '^ours [a-z0-9]+ / torch [a-z_0-9]+ = [0-9.]+' "$log" | sed -E 's/^ours ([^ ]+) \/ torch ([^ ]+) = /\1\/\2 /')
    for p in $PRECISIONS; do
        ours_text+="${ours_text:+, }$p ${ours[$p]:-?}"
        kernels_text+="${kernels_text:+, }$p ${kernels[$p]:-?}"
    done
    [ -n "${ours[fp32]:-}" ] && fp32_text=$(awk -v i="${ours[fp32]}" -v g=$GFLOP_PER_IMAGE -v p="${PEAK_TFLOPS:-0}" \
        'BEGIN { t = i * g / 1e3; printf " (fp32 = %.2f TFLOP/s", t; if (p > 0) printf " = %.1f%% of the FP32 peak %s TFLOP/s", 100 * t / p, p; printf ")" }')
    local text="ours $ours_text images/s$fp32_text; ours/torch: ${ratios:-none}; kernels alone: $kernels_text images/s; $GFLOP_PER_IMAGE GFLOP/image"
    STEP_DETAILS=()
    while IFS= read -r line; do STEP_DETAILS+=("    $line"); done < <(grep -E '^torch [a-z_0-9]+: ' "$log")
    STEP_DETAILS+=("${ladder[@]}")
    if [ ${#bad[@]} = 0 ]; then verdict "PASS ($text)"
    else verdict "FAIL ($(IFS=';'; echo "${bad[*]}" | sed 's/;/; /g'); $text; see throughput.log)"; fi
}

# --- 4. correctness: the same ops through two libraries, and a training run -----------
# GPU: CPU vs GPU library, then the paper's recipe on the alexnet preset (384 synthetic
# 256x256 images, batch 128, 50 steps, both towers on GPU 0). --cpu: the CPU library in two
# thread/block orders (must be bitwise equal), then the small preset by full-batch gradient
# descent (16 images, batch 16, no momentum, augmentation or dropout), where every step must
# lower the loss on the same batch, so "falling" is a real check even in 6 steps.
step4() {
    local line log=$WORK/compare.log one=$WORK/compare_one.log bad=0 status shapes train_args compared=""
    : > "$log"
    if [ $CPU = 1 ]; then
        say "--cpu: the CPU library against itself, forward vs reverse thread/block order (must be bitwise equal)"
        run 60 "$PYTHON" dev/compare_libs.py libalexnet_cpu.so libalexnet_cpu.so --shapes small --batch 3 \
            --env-a CUDA_CPU_SCHEDULE=forward --env-b CUDA_CPU_SCHEDULE=reverse --exact \
            --allow-inexact "${GPU_CHECK_ATOMIC_OPS:-}" 2>&1 | tee "$one"
        [ "${PIPESTATUS[0]}" = 0 ] || bad=1
        cat "$one" >> "$log"
        compared="2 schedules: $(grep '^compare_libs: ' "$one" | tail -1 | sed 's/^compare_libs: //')"
        train_args=(./train_alexnet_cpu --arch small --batch 16 --steps 6 --lr 0.05 --momentum 0 --no-augment --dropout 0)
    else
        for shapes in small alexnet; do
            run 60 "$PYTHON" dev/compare_libs.py libalexnet_cpu.so libalexnet.so --shapes $shapes --batch 2 2>&1 | tee "$one"
            status=${PIPESTATUS[0]}
            cat "$one" >> "$log"
            line=$(grep '^compare_libs: ' "$one" | tail -1 | sed 's/^compare_libs: //')
            [ "$status" = 0 ] || { bad=1; line="exit $status${line:+, $line}"; }
            compared+="${compared:+; }$shapes shapes: ${line:-no result}"
        done
        train_args=(./train_alexnet --arch alexnet --batch 128 --steps 50 --devices 0)
    fi
    local trained="FAIL (no dataset)"
    say "--- training run: ${train_args[*]}" | tee -a "$log"
    ensure_data 2>&1 | tee -a "$log"
    if [ "${PIPESTATUS[0]}" = 0 ]; then
        rm -rf "$WORK/run_smoke"
        run 90 "${train_args[0]}" --data "$DATA" --out "$WORK/run_smoke" "${train_args[@]:1}" --log-every 1 \
            --eval-every 1000000 --save-every 0 > "$WORK/train.log" 2>&1
        status=$?
        cat "$WORK/train.log" | tee -a "$log"
        trained=$("$PYTHON" dev/train_log.py "$WORK/train.log")
        [ "$status" = 0 ] || trained="FAIL (exit $status) ${trained#* }"
    fi
    keep_log compare.log
    [[ $trained == PASS* ]] || bad=1
    local text="$compared; training ${train_args[*]:1:4}: $trained"
    if [ "$bad" = 0 ]; then verdict "PASS ($text)"
    else verdict "FAIL ($text; see compare.log)"; fi
}

# --- 5. compute-sanitizer ----------------------------------------------------------------
step5() {
    local log=$WORK/sanitizer.log
    : > "$log"
    if [ $CPU = 1 ]; then
        say "--cpu: compute-sanitizer needs a GPU; instead every kernel runs once in the CPU build"
        run 120 build/cpu/bench_kernels --batch 1 --iters 1 --warmup 0 2>&1 | tee -a "$log"
        local status=${PIPESTATUS[0]}
        keep_log sanitizer.log
        if [ "$status" = 0 ]; then
            verdict "SKIP (--cpu: compute-sanitizer needs a GPU; every kernel ran once in the CPU build: ok)"
        else verdict "FAIL (--cpu: compute-sanitizer needs a GPU; build/cpu/bench_kernels --batch 1 failed, exit $status)"; fi
        return
    fi
    command -v compute-sanitizer >/dev/null || { verdict "FAIL (compute-sanitizer not installed)"; return; }
    [ -x build/gpu/bench_kernels ] || { verdict "FAIL (build/gpu/bench_kernels missing: build it with step 1)"; return; }
    SANITIZED="" ; SANITIZE_BAD=0
    local kernels=(build/gpu/bench_kernels --iters 1 --warmup 0)
    sanitize memcheck "memcheck(kernels)" 60 "${kernels[@]}" --batch 2
    # The model's own kernels, copies and loader: two steps of the small preset.
    local data=$WORK/data_sanitize
    rm -rf "$data" "$WORK/run_sanitize"
    if run 60 "$PYTHON" alexnet.py prepare synthetic --out "$data" --size 32 --train-images 32 --val-images 8 >> "$log" 2>&1; then
        sanitize memcheck "memcheck(training)" 60 ./train_alexnet --data "$data" --out "$WORK/run_sanitize" \
            --arch small --batch 8 --steps 2 --devices 0 --save-every 0
    else
        SANITIZED+="memcheck(training) NO DATA, "; SANITIZE_BAD=1
    fi
    # racecheck on the kernels with shared memory: the GEMM tile kernel (every conv and fc op)
    # and the softmax reductions.
    # The smallest layers that still cover every GEMM layout and partial tiles in M, N and K:
    # conv5 (13x13 maps) at batch 1, fc8 (500 outputs) at batch 2.
    sanitize racecheck "racecheck(conv5 b1)" 40 "${kernels[@]}" --batch 1 --only conv5
    sanitize racecheck "racecheck(fc8 b2)" 40 "${kernels[@]}" --batch 2 --only fc8
    sanitize racecheck "racecheck(softmax b2)" 30 "${kernels[@]}" --batch 2 --only softmax
    # synccheck and initcheck only with time to spare beyond the later steps' share.
    local reserve=0
    selected 6 && reserve=${LIMITS[6]}
    if [ $(($(left) - reserve)) -ge $SANITIZER_EXTRA ]; then
        STEP_END=$((SECONDS + SANITIZER_EXTRA))
        sanitize synccheck "synccheck(kernels)" 60 "${kernels[@]}" --batch 2
        sanitize initcheck "initcheck(kernels)" 60 "${kernels[@]}" --batch 2
    else
        SANITIZED+="synccheck/initcheck not run (under ${SANITIZER_EXTRA} s of budget to spare; --only 5 runs them), "
    fi
    keep_log sanitizer.log
    SANITIZED=${SANITIZED%, }
    if [ $SANITIZE_BAD = 0 ]; then verdict "PASS ($SANITIZED)"
    else verdict "FAIL ($SANITIZED; see sanitizer.log)"; fi
}

# compute-sanitizer --tool TOOL LABEL LIMIT COMMAND...: appends the output to sanitizer.log
# and "LABEL ok|FAIL|TIMEOUT" to SANITIZED.
sanitize() {
    local tool=$1 label=$2 limit=$3 status one=$WORK/sanitizer_one.log
    shift 3
    say "--- $label: $*"
    run "$limit" compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 10 "$@" > "$one" 2>&1
    status=$?
    grep -E '^========= |rror' "$one" | tail -15
    { say "=== $label ($tool, exit $status): $*"; cat "$one"; } >> "$WORK/sanitizer.log"
    case $status in
        0) SANITIZED+="$label ok, " ;;
        124|137) SANITIZED+="$label TIMEOUT, "; SANITIZE_BAD=1 ;;
        200) SANITIZED+="$label NOT RUN (no time left), "; SANITIZE_BAD=1 ;;
        *) SANITIZED+="$label FAIL($status), "; SANITIZE_BAD=1 ;;
    esac
}

# --- 6. the test suite against the GPU library --------------------------------------
step6() {
    # GPU_CHECK_INNER: the tests that run this script skip themselves.
    local lib=$ROOT/libalexnet.so args=(-q -p no:cacheprovider -m "not slow")
    if [ $CPU = 1 ]; then
        lib=$ROOT/libalexnet_cpu.so
        # A quick subset (GPU_CHECK_CPU_TESTS overrides): the whole suite is `make test`.
        args+=(-k "${GPU_CHECK_CPU_TESTS:-(awkward or bad_arg) and not tensor_cores}")
    else
        args+=(-k "not under_asan")  # the CPU runtime's ASan check: no ASan build here
        "$PYTHON" -c 'import xdist' 2>/dev/null && args+=(-n 8)
    fi
    [ -f "$lib" ] || { verdict "FAIL ($lib missing)"; return; }
    local log=$WORK/pytest.log status tally
    run "${LIMITS[6]}" env GPU_CHECK_INNER=1 ALEXNET_LIB="$lib" "$PYTHON" -m pytest "${args[@]}" tests 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    keep_log pytest.log
    tally=$(grep -E '(passed|failed|error)' "$log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
    if [ "$status" = 0 ]; then verdict "PASS ($tally; ALEXNET_LIB=$(basename "$lib"))"
    elif timed_out "$status"; then verdict "FAIL (timed out; ${tally:-no tally}; see pytest.log)"
    else verdict "FAIL (exit $status; ${tally:-no tally}; see pytest.log)"; fi
}

main() {
    local step line word failed=0
    : > "$SUMMARY"
    line="gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC')$([ $CPU = 1 ] && echo ' (--cpu dry run)'), commit $(git log -1 --format=%h 2>/dev/null || echo '?'), budget $BUDGET s"
    say "$line"
    summary_line "$line"
    say "summary: $SUMMARY; logs: $WORK${OUTDIR:+ and $OUTDIR}"
    setup_python
    if [ $CPU = 0 ]; then
        gpu_info
        summary_line "GPU: ${GPU_NAME:-none} ${ARCH:+(sm_$ARCH, max SM clock ${CLOCK:-?} MHz)}${GPU_ERROR:+($GPU_ERROR)}"
    fi
    for step in 1 2 3 4 5 6; do
        if ! selected $step; then
            result $step "SKIP (by option)"
            continue
        fi
        if [ "$(left)" -lt $MIN_START ]; then
            result $step "SKIP (the time budget of $BUDGET s is used up; rerun with --only $step)"
            continue
        fi
        local start=$SECONDS
        STEP_END=$((SECONDS + LIMITS[step]))
        [ $STEP_END -gt $((T0 + BUDGET)) ] && STEP_END=$((T0 + BUDGET))
        STEP_VERDICT="" ; STEP_DETAILS=()
        say ""
        say "=== step $step ${NAMES[$step]}  (at $((SECONDS - T0)) s; limit $((STEP_END - SECONDS)) s)"
        "step$step"
        result $step "${STEP_VERDICT:-FAIL (no verdict: see its output above)} [$((SECONDS - start)) s]"
        for line in "${STEP_DETAILS[@]}"; do
            DETAILS+=("$line")
            summary_line "$line"
        done
    done
    say ""
    say "=== results ($((SECONDS - T0)) s in all)"
    for line in "${RESULTS[@]}"; do
        say "$line"
        read -r _ _ _ word _ <<< "$line"  # step N name VERDICT (...)
        [ "$word" = FAIL ] && failed=1
    done
    for line in "${DETAILS[@]}"; do say "$line"; done
    line="gpu_check: $([ $failed = 0 ] && echo 'no step failed' || echo 'some step FAILED') in $((SECONDS - T0)) s; summary in $SUMMARY"
    say "$line"
    summary_line "$line"
    return $failed
}

main 2>&1 | tee "$WORK/gpu_check.log"
exit "${PIPESTATUS[0]}"
