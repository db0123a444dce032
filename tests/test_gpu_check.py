"""The GPU kit (dev/gpu_check.sh and its helpers), checked as far as a machine without
a GPU allows: the --cpu dry run end to end, the order of the steps and the summary that
each appends as it ends, the option handling, a GPU run on stand-ins for the GPU tools, and
the comparison and report logic that the GPU run relies on."""
import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "dev", "gpu_check.sh")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "dev", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STEPS = ["build", "smoke", "throughput", "correctness", "sanitizer", "pytest"]  # the run's order
# The runs of the script drive bash, make and Python: under the AddressSanitizer build's
# LD_PRELOAD every one of those tools would be instrumented. Inside the script's own pytest
# step (GPU_CHECK_INNER) the dry runs would run the script within itself.
not_inside = pytest.mark.skipif(bool(os.environ.get("GPU_CHECK_INNER")), reason="inside dev/gpu_check.sh")


def gpu_check(tmp_path, *args, timeout=150, env=None, script=SCRIPT):
    """Run the script with OUT=tmp_path/out (the summary and logs go there) and its scratch
    folder in tmp_path/work; return the process, the summary text and the files in OUT."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_WORK": str(tmp_path / "work"), **(env or {})}
    proc = subprocess.run(["bash", script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    summary = out / "summary.txt"
    files = sorted(os.listdir(out)) if out.exists() else []
    return proc, summary.read_text() if summary.exists() else "", files


def step_lines(text):
    """[(step number, its line)] in the order of the summary's step lines."""
    return [(int(line.split()[1]), line) for line in text.splitlines() if line.startswith("step ")]


def check_summary(text, stdout):
    """The summary: a header, the six step lines in order, each named, a closing line; the
    results block at the end of stdout repeats them."""
    lines = text.splitlines()
    assert lines[0].startswith("gpu_check ") and lines[-1].startswith("gpu_check: "), text
    steps = step_lines(text)
    assert [n for n, _ in steps] == [1, 2, 3, 4, 5, 6], text
    for n, line in steps:
        assert line.split()[2] == STEPS[n - 1], line
    results = stdout.split("=== results", 1)[1]
    assert [line for line in results.splitlines() if line.startswith("step ")] == [line for _, line in steps]
    return dict(steps)


@pytest.mark.no_asan
@not_inside
def test_cpu_dry_run(tmp_path):
    """The whole --cpu dry run: the six steps in order, 2, 4, 6 pass on the CPU build, 1, 3, 5
    report SKIP with a reason, and every step's log lands in OUT (7 files at most: the
    device machine returns 8)."""
    # its pytest step alone takes about 2 min on 2 loaded cores: the limit only catches hangs
    proc, text, files = gpu_check(tmp_path, "--cpu", timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = check_summary(text, proc.stdout)
    assert "SKIP (--cpu: no GPU; CPU build ok)" in steps[1]
    assert "SKIP (--cpu: throughput is timed on a GPU only)" in steps[3]
    assert "SKIP (--cpu: compute-sanitizer needs a GPU; every kernel ran once in the CPU build: ok)" in steps[5]
    assert "PASS (--bench 3 --arch small --batch 16 with ALEXNET_SYNC_LAUNCHES=1: last loss " in steps[2]
    assert "PASS (2 schedules: " in steps[4] and "training --arch small --batch 16: PASS (losses finite" in steps[4]
    assert "PASS" in steps[6] and " passed" in steps[6], steps[6]
    assert "no step failed" in text.splitlines()[-1]
    assert files == ["build.log", "compare.log", "pytest.log", "sanitizer.log", "smoke.log", "summary.txt"]


@pytest.mark.no_asan
@not_inside
def test_each_step_appends_its_line_when_it_ends(tmp_path):
    """--cpu --only 2,4: step 2's verdict is in the summary while step 4 still runs; the
    other steps are listed as skipped, in order; the smoke step ran the CPU executable for
    3 --bench steps with every launch synchronised."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_WORK": str(tmp_path / "work")}
    proc = subprocess.Popen(["bash", SCRIPT, "--cpu", "--only", "2,4"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    text = ""
    while "step 2 " not in text and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
        text = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    running = proc.poll() is None
    stdout, _ = proc.communicate(timeout=150)
    assert "step 2 " in text and running and "step 4 " not in text, text + stdout[-2000:]
    assert proc.returncode == 0, stdout[-3000:]
    final = (out / "summary.txt").read_text()
    assert final.startswith(text)  # appended to, never rewritten
    steps = check_summary(final, stdout)
    for n in (1, 3, 5, 6):
        assert steps[n].endswith("SKIP (by option)"), steps[n]
    assert "PASS" in steps[2] and "PASS" in steps[4]
    smoke = (out / "smoke.log").read_text()
    assert "$ env ALEXNET_SYNC_LAUNCHES=1 ./train_alexnet_cpu --data " in smoke
    assert "--arch small --batch 16 --bench 3" in smoke and "bench | 3 steps of batch 16" in smoke
    assert sorted(os.listdir(out)) == ["compare.log", "smoke.log", "summary.txt"]


@pytest.mark.no_asan
@not_inside
def test_only_and_skip(tmp_path):
    """--only takes a list, --skip-N wins over it; the steps left out are still listed."""
    proc, text, files = gpu_check(tmp_path, "--cpu", "--only", "3,5,6", "--skip-6")
    assert proc.returncode == 0, proc.stdout[-2000:]
    steps = check_summary(text, proc.stdout)
    for n in (1, 2, 4, 6):
        assert steps[n].endswith("SKIP (by option)"), steps[n]
    assert "SKIP (--cpu: throughput is timed on a GPU only)" in steps[3]
    assert "SKIP (--cpu: compute-sanitizer needs a GPU; every kernel ran once in the CPU build: ok)" in steps[5]
    assert files == ["sanitizer.log", "summary.txt"]


@pytest.mark.no_asan
def test_budget_used_up(tmp_path):
    """With no budget left no step starts, and each says how to rerun it; --summary FILE
    puts the summary there instead of $OUT/summary.txt."""
    summary = tmp_path / "elsewhere.txt"
    proc, _, files = gpu_check(tmp_path, "--cpu", "--summary", str(summary), env={"GPU_CHECK_BUDGET": "0"}, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert files == []
    steps = check_summary(summary.read_text(), proc.stdout)
    for n in range(1, 7):
        assert steps[n].endswith(f"SKIP (the time budget of 0 s is used up; rerun with --only {n})"), steps[n]


def test_help_lists_the_steps_in_order():
    proc = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stderr == ""
    text = proc.stdout
    positions = [text.index(f"  {n} {name} ") for n, name in enumerate(STEPS, 1)]
    assert positions == sorted(positions), text
    for word in ("--cpu", "--only 3", "--only 2,3", "--skip-5", "--summary FILE", "--torch-compile",
                 "GPU_CHECK_BUDGET=480", "ALEXNET_SYNC_LAUNCHES=1", "GPU_ARCH=", "summary.txt",
                 "fp32 (strict FP32", "tf32 (PyTorch's default", "channels_last (strict FP32",
                 "bf16 (AMP", "--precision fp32, tf32, bf16", "--precision P", "memcheck", "racecheck", "ALEXNET_LIB=./libalexnet.so"):
        assert word in text, word
    assert not text.startswith("#") and "#!/" not in text


@pytest.mark.parametrize("args, message", [
    (["--skip-9"], "error: unknown option '--skip-9' (see --help)"),
    (["--only", "7"], "error: --only needs a list of steps 1-6, e.g. --only 2,3"),
    (["--only", "2,"], "error: --only needs a list of steps 1-6, e.g. --only 2,3"),
    (["--only"], "error: --only needs a list of steps 1-6, e.g. --only 2,3"),
    (["--summary"], "error: --summary needs a file"),
])
def test_bad_option(tmp_path, args, message):
    proc, _, files = gpu_check(tmp_path, *args, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [message]
    assert files == []


# --- the GPU path, with stand-ins for the GPU tools --------------------------------------
# Fakes on PATH (nvidia-smi, nvcc, make, compute-sanitizer) and in place of the GPU
# executables let the order, the time limits and the summary of a GPU run be checked here.
# They run in a copy of the script (make writes ./train_alexnet and build/gpu/ next to it).
# The fake training step and kernel sums run at a different speed in each precision (images/s:
# ours fp32 2560, tf32 3600, bf16 5120; kernels alone 3200, 4000, 6400), as does the fake
# PyTorch in each mode (fp32 3000, tf32 4000, channels_last 3200, bf16 9000, compile 3500),
# so that a ratio of the wrong pair shows.
FAKES = {
    "nvidia-smi": 'echo "NVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB, 9.0, 1980 MHz"',
    "nvcc": 'echo "Build cuda_12.4.r12.4/compiler.34097967_0"',
    "make": """echo "make $*" >> "$CALLS"
mkdir -p build/gpu/dev_cuda
cp "$FAKES/train" train_alexnet; cp "$FAKES/bench" build/gpu/bench_kernels
cp "$FAKES/ladder" build/gpu/dev_cuda/conv_forward; cp "$FAKES/ladder" build/gpu/dev_cuda/fc_forward
: > libalexnet.so; : > libalexnet_cpu.so
printf 'ptxas info    : 0 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\\n' > build/gpu/ptxas.log
exit ${FAKE_MAKE_STATUS:-0}""",
    "compute-sanitizer": """tool=""
while [ $# -gt 0 ]; do case $1 in --tool) tool=$2; shift 2;; --*) shift 2;; *) break;; esac; done
echo "sanitizer $tool $*" >> "$CALLS"
"$@" > /dev/null 2>&1; status=$?
echo "========= ERROR SUMMARY: 0 errors"; exit $status""",
    "train": """echo "train $* sync=${ALEXNET_SYNC_LAUNCHES:-}" >> "$CALLS"
if [ -n "${FAKE_CRASH:-}" ] && [ "${ALEXNET_SYNC_LAUNCHES:-}" = 1 ]; then
    echo "error: lrn_forward_kernel: an illegal memory access was encountered" >&2; exit 1
fi
precision=fp32 steps=""
while [ $# -gt 0 ]; do case $1 in --precision) precision=$2; shift;; --bench) steps=$2; shift;; esac; shift; done
if [ -n "$steps" ] && [ "$precision" = "${FAKE_BENCH_FAIL:-}" ]; then
    echo "error: $precision matrix products need sm_80 or later" >&2; exit 1
fi
case $precision in fp32) speed="50.000 ms per step | 2560.0";; tf32) speed="35.556 ms per step | 3600.0";;
                   bf16) speed="25.000 ms per step | 5120.0";; esac
[ -n "$steps" ] && echo "bench | $steps steps of batch 128 | $precision | $speed images/s | last loss 6.9078"
exit 0""",
    "bench": """echo "bench_kernels $*" >> "$CALLS"
precision=fp32
while [ $# -gt 0 ]; do [ "$1" = --precision ] && precision=$2; shift; done
echo "bench_kernels: NVIDIA H100 80GB HBM3, 132 SMs, batch 128, 10 timed calls per op, $precision products"
case $precision in fp32) sum="40.00 ms = 3200.0";; tf32) sum="32.00 ms = 4000.0";; bf16) sum="20.00 ms = 6400.0";; esac
echo "sum over one training step (both towers, kernels back to back, no exchange): $sum images/s"
""",
    "ladder": """echo "ladder $(basename "$0") $*" >> "$CALLS"
echo "4 conv_forward (auto: 128x128, 1 split)    PASS  max|diff| 3.96e-07 = 2.4e-02 tol      0.840 ms  20000.0 GFLOP/s"
echo "5 mma tf32 128x128, warp 64x32             ${FAKE_LADDER:-PASS}  max|diff| 3.79e-07 = 2.4e-02 tol      0.200 ms  90000.0 GFLOP/s  vs fp32  0.30 u_tf32*sum|terms|"
[ -z "${FAKE_LADDER:-}" ]""",
    "torch": """echo "torch $*" >> "$CALLS"
exec "$REAL_PYTHON" - "$@" <<'EOF'
import argparse, os, sys
sys.path.insert(0, os.path.join(os.environ["ROOT"], "dev"))
import bench_torch
p = argparse.ArgumentParser()
p.add_argument("script"); p.add_argument("--modes"); p.add_argument("--ours", type=bench_torch.parse_ours)
p.add_argument("--peak", type=float)
a, _ = p.parse_known_args()
speed = {"fp32": 3000.0, "tf32": 4000.0, "channels_last": 3200.0, "bf16": 9000.0, "compile": 3500.0}
lines = [f"torch {m}: {speed[m]:.1f} images/s (1.00 ms/step, batch 128)" for m in a.modes.split(",")]
print("\\n".join(lines + (bench_torch.summarize(lines, a.ours, a.peak) if a.ours else [])))
EOF""",
    # The project's Python, except that datasets are only folders (the fakes read none).
    "python": """if [ "$1 $2" = "alexnet.py prepare" ]; then
    while [ $# -gt 0 ]; do [ "$1" = --out ] && mkdir -p "$2" && echo "$2: fake dataset"; shift; done; exit 0
fi
exec "$REAL_PYTHON" "$@"
""",
}


def fake_gpu_run(tmp_path, *args, env=None):
    """dev/gpu_check.sh in a copy of the repository with the fakes; returns the process, the
    summary, the files in OUT and the fakes' calls in order."""
    import shutil
    repo, fakes = tmp_path / "repo", tmp_path / "fakes"
    (repo / "dev").mkdir(parents=True)
    fakes.mkdir()
    for name in ("dev/gpu_check.sh", "dev/bench_torch.py", "dev/train_log.py", "train_alexnet.cu"):
        shutil.copy(os.path.join(ROOT, name), repo / name)
    for name, body in FAKES.items():
        path = fakes / name
        path.write_text("#!/usr/bin/env bash\n" + body + "\n")
        path.chmod(0o755)
    calls = tmp_path / "calls.log"
    env = {"PATH": f"{fakes}:{os.environ['PATH']}", "CALLS": str(calls), "FAKES": str(fakes), "ROOT": ROOT,
           "REAL_PYTHON": sys.executable, "PYTHON": str(fakes / "python"), "TORCH_PYTHON": str(fakes / "torch"),
           "GPU_CHECK_JOBS": "16", **(env or {})}
    proc, text, files = gpu_check(tmp_path, *args, env=env, timeout=120, script=str(repo / "dev" / "gpu_check.sh"))
    return proc, text, files, calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.no_asan
def test_gpu_run_order_and_summary(tmp_path):
    """Steps 1, 2, 3 and 5 of a GPU run on the fakes: the build for the local architecture
    only, the synchronised smoke run, ours in each precision and PyTorch's four modes, each
    ratio pairing a mode with our matching precision, the headline ratio ours fp32 / strict
    FP32, then the per-kernel benchmark in each precision; memcheck before racecheck, which
    sees only a few kernels at batch 1-2."""
    proc, text, files, calls = fake_gpu_run(tmp_path, "--skip-4", "--skip-6")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = check_summary(text, proc.stdout)
    assert text.splitlines()[1] == "GPU: NVIDIA H100 80GB HBM3 (sm_90, max SM clock 1980 MHz)"
    assert steps[1].startswith("step 1 build       PASS (NVIDIA H100 80GB HBM3, 132 SMs, sm_90, "
                               "FP32 peak 66.9 TFLOP/s, cuda_12.4"), steps[1]
    assert "spills: 1" in steps[1]
    assert "with ALEXNET_SYNC_LAUNCHES=1: last loss 6.9078" in steps[2]
    # By hand from the fakes' speeds: 2560 * 4.136 / 1e3 = 10.59 TFLOP/s = 15.8% of 66.9;
    # ours fp32 2560 / torch fp32 3000 = 0.85, ours tf32 3600 / torch tf32 4000 = 0.90,
    # ours fp32 2560 / torch channels_last 3200 = 0.80, ours bf16 5120 / torch bf16 9000 = 0.57.
    assert steps[3].startswith(
        "step 3 throughput  PASS (ours fp32 2560.0, tf32 3600.0, bf16 5120.0 images/s (fp32 = 10.59 TFLOP/s = "
        "15.8% of the FP32 peak 66.9 TFLOP/s); ours/torch: fp32/fp32 (headline) 0.85, tf32/tf32 0.90, "
        "fp32/channels_last 0.80, bf16/bf16 0.57; kernels alone: fp32 3200.0, tf32 4000.0, bf16 6400.0 images/s; "
        "4.136 GFLOP/image) ["), steps[3]
    throughput = (tmp_path / "out" / "throughput.log").read_text()
    assert ("ours tf32 / torch tf32 = 0.90 (3600.0 vs 4000.0 images/s)\n"
            "ours fp32 / torch channels_last = 0.80 (2560.0 vs 3200.0 images/s)\n") in throughput
    assert "ours tf32: 3600.0 images/s = 14.89 TFLOP/s\n" in throughput  # no FP32-peak share
    assert "headline: ours fp32 / torch fp32 (strict FP32) = 0.85" in throughput
    assert [line.strip().split(":")[0] for line in text.splitlines() if line.startswith("    torch ")] == \
        ["torch fp32", "torch tf32", "torch channels_last", "torch bf16"]
    assert "memcheck(kernels) ok, memcheck(training) ok, racecheck(" in steps[5]
    assert files == ["build.log", "sanitizer.log", "smoke.log", "summary.txt", "throughput.log"]

    kinds = [call.split()[0] for call in calls]
    assert calls[0] == "make -k -j16 GPU_ARCH=90 gpu cpu bench-kernels dev-cuda-gpu build/libruntime_tests.so"
    smoke = [c for c in calls if c.startswith("train ") and "--bench 3 " in c + " "]
    bench = [c for c in calls if c.startswith("train ") and "--bench 20" in c]
    assert len(smoke) == 1 and smoke[0].endswith("sync=1") and "--batch 128" in smoke[0]
    assert len(bench) == 3, bench
    for call, precision in zip(bench, ["fp32", "tf32", "bf16"]):
        assert call.endswith(f"--batch 128 --devices 0 --precision {precision} --bench 20 sync="), call
    assert calls.index(smoke[0]) < calls.index(bench[0])
    torch = [c for c in calls if c.startswith("torch ")]
    assert len(torch) == 1 and torch[0].endswith(
        "--modes fp32,tf32,channels_last,bf16 --ours fp32=2560.0,tf32=3600.0,bf16=5120.0 --peak 66.9"), torch
    kernel_runs = [c for c in calls if c.startswith("bench_kernels --batch 128 ")]
    assert kernel_runs == [f"bench_kernels --batch 128 --iters 10 --precision {p}" for p in ("fp32", "tf32", "bf16")]
    per_kernel = calls.index(kernel_runs[0])
    assert calls.index(bench[-1]) < calls.index(torch[0]) < per_kernel
    ladder = [calls.index("ladder conv_forward --layer conv2 --iters 5"), calls.index("ladder fc_forward --layer fc6 --iters 5")]
    assert calls.index(kernel_runs[-1]) < ladder[0] < ladder[1]
    details = [line for line in text.splitlines() if line.startswith(("    conv2 ", "    fc6 "))]
    assert len(details) == 4 and details[1].startswith("    conv2 5 mma tf32 128x128, warp 64x32 PASS"), details
    sanitizers = [c for c in calls if c.startswith("sanitizer ")]
    tools = [c.split()[1] for c in sanitizers]
    assert tools[:2] == ["memcheck", "memcheck"] and "racecheck" in tools
    assert tools.index("racecheck") > 1 and kinds.index("sanitizer") > per_kernel
    for call in sanitizers:
        if call.split()[1] == "racecheck":
            assert "--only " in call and ("--batch 1" in call or "--batch 2" in call), call


@pytest.mark.no_asan
def test_gpu_run_failures_are_reported_and_the_run_goes_on(tmp_path):
    """A failed build and a smoke run that faults: each step's line says why (the fault's
    kernel from the synchronised launches), the later steps still run, the status is 1."""
    proc, text, _, calls = fake_gpu_run(tmp_path, "--only", "1,2,3", env={"FAKE_MAKE_STATUS": "2", "FAKE_CRASH": "1"})
    assert proc.returncode == 1
    steps = check_summary(text, proc.stdout)
    assert steps[1].startswith("step 1 build       FAIL (build failed, exit 2; NVIDIA H100"), steps[1]
    assert "FAIL (exit 1: error: lrn_forward_kernel: an illegal memory access was encountered; see smoke.log)" in steps[2]
    assert "PASS (ours fp32 2560.0, tf32 3600.0, bf16 5120.0 images/s" in steps[3]
    assert "some step FAILED" in text.splitlines()[-1]


@pytest.mark.no_asan
def test_a_failing_ladder_version_fails_the_throughput_step(tmp_path):
    """A tensor-core version of the ladder that misses its reference on the GPU (exit 1) is
    a failure of step 3, named, with the version's line among the details."""
    proc, text, _, _ = fake_gpu_run(tmp_path, "--only", "1,3", env={"FAKE_LADDER": "FAIL"})
    assert proc.returncode == 1
    steps = check_summary(text, proc.stdout)
    assert "FAIL (ladder conv_forward: exit 1; ladder fc_forward: exit 1; ours fp32 2560.0, tf32 3600.0" in steps[3], steps[3]
    assert "    conv2 5 mma tf32 128x128, warp 64x32 FAIL max|diff|" in text


@pytest.mark.no_asan
def test_a_failing_precision_is_left_out_and_compile_is_fp32(tmp_path):
    """Our tf32 run fails: step 3 fails naming it, bench_torch gets only the fp32 and bf16
    speeds, so PyTorch's tf32 is timed but paired with nothing; the other ratios stand, and
    torch.compile (--torch-compile) is compared with ours fp32."""
    proc, text, _, calls = fake_gpu_run(tmp_path, "--only", "1,3", "--torch-compile", env={"FAKE_BENCH_FAIL": "tf32"})
    assert proc.returncode == 1
    steps = check_summary(text, proc.stdout)
    # ours fp32 2560 / torch compile 3500 = 0.73 (by hand); no tf32/tf32 ratio.
    assert steps[3].startswith(
        "step 3 throughput  FAIL (ours tf32: exit 1, no images/s; ours fp32 2560.0, tf32 ?, bf16 5120.0 images/s "
        "(fp32 = 10.59 TFLOP/s = 15.8% of the FP32 peak 66.9 TFLOP/s); ours/torch: fp32/fp32 (headline) 0.85, "
        "fp32/channels_last 0.80, bf16/bf16 0.57, fp32/compile 0.73; kernels alone: fp32 3200.0, tf32 4000.0, "
        "bf16 6400.0 images/s; 4.136 GFLOP/image; see throughput.log) ["), steps[3]
    torch = [c for c in calls if c.startswith("torch ")]
    assert len(torch) == 2
    assert torch[0].endswith("--modes fp32,tf32,channels_last,bf16 --ours fp32=2560.0,bf16=5120.0 --peak 66.9"), torch
    assert torch[1].endswith("--modes compile --compile-limit 100 --ours 2560.0 --peak 66.9"), torch
    assert [line.split(":")[0] for line in text.splitlines() if line.startswith("    torch ")] == \
        ["    torch fp32", "    torch tf32", "    torch channels_last", "    torch bf16", "    torch compile"]


def test_compare_verdicts():
    """compare_libs' verdicts on hand-made outputs: the tolerance L * 2^-23 relative to
    max|B| separates a last-bit difference from a real one; --exact allows none except
    in the ops named as using float atomics; non-finite values always fail."""
    compare = load("compare_libs").compare_outputs
    b = {"conv/forward": np.array([1.0, -2.0, 4.0], np.float32)}
    lengths = {"conv": 1000}
    ulp = np.float32(4.0) * np.float32(2.0 ** -23)
    close = {"conv/forward": b["conv/forward"] + np.array([0, 0, ulp], np.float32)}
    far = {"conv/forward": b["conv/forward"] + np.array([0, 0, 1e-3], np.float32)}
    nan = {"conv/forward": np.array([1.0, np.nan, 4.0], np.float32)}

    def verdict(a, exact=False, allowed=()):
        lines, bad, _ = compare(a, b, {}, {}, lengths, exact, set(allowed))
        return lines[-1].split("  ")[-1], bad

    assert verdict(b) == ("exact", 0)
    d, key = compare(far, b, {}, {}, lengths, False, set())[2]
    assert key == "conv/forward" and d == pytest.approx(1e-3 / 4.0, rel=1e-4)  # float32 rounding of 4.001
    assert verdict(close) == ("ok", 0)
    assert verdict(far) == ("DIFFERS", 1)
    assert verdict(close, exact=True) == ("DIFFERS (must be bitwise equal)", 1)
    assert verdict(close, exact=True, allowed=["conv"]) == ("ok", 0)
    assert verdict(nan) == ("NOT FINITE", 1)
    lines, bad, _ = compare(b, b, {"conv": "AttributeError: no binding"}, {}, lengths, False, set())
    assert bad == 1 and "FAILED" in lines[0]


def test_torch_report():
    """The ratio, TFLOP/s and headline lines that step 3 prints, from bench_torch's result
    lines: each mode against our matching precision (channels_last and compile against ours
    fp32), modes whose precision we did not measure left out, the FP32-peak share for fp32
    only. The expected values are worked out by hand."""
    summarize = load("bench_torch").summarize
    lines = ["torch fp32: 2000.0 images/s (64.00 ms/step, batch 128, strict FP32, NCHW, 8.27 TFLOP/s, loss 6.9)",
             "torch tf32: 4000.0 images/s (32.00 ms/step, batch 128, PyTorch default: TF32 convolutions, "
             "FP32 matmuls, NCHW, 16.54 TFLOP/s, loss 6.9)",
             "torch channels_last: 2500.0 images/s (51.20 ms/step, batch 128, strict FP32, channels_last, "
             "10.34 TFLOP/s, loss 6.9)",
             "torch bf16: 8000.0 images/s (16.00 ms/step, batch 128, AMP bf16 autocast, channels_last, "
             "33.09 TFLOP/s, loss 6.9)",
             "torch compile: skipped (warm-up did not finish within 60 s)"]
    ours = {"fp32": 1000.0, "tf32": 3000.0, "bf16": 2000.0}
    assert summarize(lines, ours, 66.9) == [
        "ours fp32 / torch fp32 = 0.50 (1000.0 vs 2000.0 images/s)",
        "ours tf32 / torch tf32 = 0.75 (3000.0 vs 4000.0 images/s)",
        "ours fp32 / torch channels_last = 0.40 (1000.0 vs 2500.0 images/s)",
        "ours bf16 / torch bf16 = 0.25 (2000.0 vs 8000.0 images/s)",
        "ours fp32: 1000.0 images/s = 4.14 TFLOP/s = 6.2% of the FP32 peak 66.9 TFLOP/s",
        "ours tf32: 3000.0 images/s = 12.41 TFLOP/s",
        "ours bf16: 2000.0 images/s = 8.27 TFLOP/s",
        "headline: ours fp32 / torch fp32 (strict FP32) = 0.50"]
    # One number is our fp32: tf32 and bf16 are left out; a failed mode gives no ratio.
    failed = lines[:3] + ["torch bf16: failed (RuntimeError: out of memory)"]
    only_fp32 = ["ours fp32 / torch fp32 = 0.50 (1000.0 vs 2000.0 images/s)",
                 "ours fp32 / torch channels_last = 0.40 (1000.0 vs 2500.0 images/s)",
                 "ours fp32: 1000.0 images/s = 4.14 TFLOP/s",
                 "headline: ours fp32 / torch fp32 (strict FP32) = 0.50"]
    assert summarize(failed, 1000.0, 0.0) == only_fp32
    assert summarize(failed, {"fp32": 1000.0}, 0.0) == only_fp32
    # No fp32 of ours: no fp32 or channels_last ratio, no headline; a compile line pairs with fp32.
    assert summarize(lines, {"tf32": 3000.0, "bf16": 0.0}, 66.9) == [
        "ours tf32 / torch tf32 = 0.75 (3000.0 vs 4000.0 images/s)",
        "ours tf32: 3000.0 images/s = 12.41 TFLOP/s"]
    assert summarize(["torch compile: 3500.0 images/s (36.57 ms/step)"], {"fp32": 2800.0}, 0.0) == [
        "ours fp32 / torch compile = 0.80 (2800.0 vs 3500.0 images/s)",
        "ours fp32: 2800.0 images/s = 11.58 TFLOP/s"]
    assert summarize(lines[1:], 1000.0, 0.0)[-1] == "ours fp32: 1000.0 images/s = 4.14 TFLOP/s"  # no fp32: no headline


def test_torch_ours_option():
    """--ours: one number (our fp32) or a list precision=images/s; 0 means not measured."""
    bench = load("bench_torch")
    assert bench.parse_ours("2560") == {"fp32": 2560.0}
    assert bench.parse_ours("fp32=2560.0,tf32=3600.5,bf16=5120") == {"fp32": 2560.0, "tf32": 3600.5, "bf16": 5120.0}
    assert bench.parse_ours("bf16=5120,fp32=2560") == {"bf16": 5120.0, "fp32": 2560.0}
    assert bench.parse_ours("0") == {} and bench.parse_ours("fp32=0,bf16=10") == {"bf16": 10.0}
    for bad in ("fp16=3", "fp32=x", "fast", "fp32=1,fp32=2", "fp32=1,"):
        with pytest.raises(Exception) as e:
            bench.parse_ours(bad)
        assert type(e.value).__name__ == "ArgumentTypeError", bad
        with pytest.raises(SystemExit) as e:
            bench.main(["--ours", bad])
        assert e.value.code == 2


def test_torch_modes():
    """The four default modes, in order, and what each sets: strict FP32 is the baseline,
    PyTorch's default allows TF32 in cuDNN only, torch.compile only on request."""
    bench = load("bench_torch")
    assert bench.DEFAULT_MODES == ["fp32", "tf32", "channels_last", "bf16"] and bench.HEADLINE == "fp32"
    # (cuDNN TF32, matmul TF32, channels_last, AMP bf16, torch.compile)
    assert bench.MODES["fp32"][:5] == (False, False, False, False, False)
    assert bench.MODES["tf32"][:5] == (True, False, False, False, False)
    assert bench.MODES["channels_last"][:5] == (False, False, True, False, False)
    assert bench.MODES["bf16"][:5] == (False, False, True, True, False)
    assert bench.MODES["compile"][:5] == (False, False, False, False, True)
    with pytest.raises(SystemExit) as e:
        bench.main(["--modes", "fp32,fp16"])
    assert e.value.code == 2


def _torch_on_a_gpu():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.skipif(_torch_on_a_gpu(), reason="PyTorch sees a GPU here: bench_torch.py would time it")
def test_bench_torch_without_a_gpu_says_so_in_one_line():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dev", "bench_torch.py"), "--steps", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == "" and len(proc.stdout.splitlines()) == 1, proc.stdout
    assert proc.stdout.startswith("bench_torch: ") and ("not installed" in proc.stdout or "no CUDA device" in proc.stdout)


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "build", "cpu", "bench_kernels")),
                    reason="build/cpu/bench_kernels not built (make bench-kernels-cpu; gpu_check.sh --cpu builds it)")
def test_bench_kernels_rejects_bad_flags():
    exe = os.path.join(ROOT, "build", "cpu", "bench_kernels")
    for args in (["--batch", "0"], ["--iters"], ["--frobnicate"]):
        proc = subprocess.run([exe, *args], capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stderr.startswith("error: "), (args, proc.stderr)


def test_train_log_verdict():
    """Step 4's judgement of a training log: only step lines count (not the validation
    loss), a fifth of the steps at each end, NaN fails, speed from the later steps."""
    verdict = load("train_log").verdict
    lines = [f"step {i + 1}/10 | epoch 0.1 | loss {2.3 - 0.1 * i:.4f} | lr 1.00e-02 | {100 * (i + 1):.1f} img/s"
             for i in range(10)] + ["eval step 10 | val loss 9.9999 | top-1 error 0.9"]
    assert verdict(lines) == "PASS (losses finite, mean of first 2 2.2500 -> last 2 1.4500; 800.0 images/s)"
    assert "NOT FALLING" in verdict(lines[::-1]) and verdict(lines[::-1]).startswith("FAIL")
    broken = lines[:5] + ["step 6/10 | epoch 0.1 | loss nan | lr 1.00e-02 | 600.0 img/s"] + lines[6:]
    assert verdict(broken).startswith("FAIL (losses NOT FINITE")
    assert verdict(lines[:1]).startswith("FAIL (fewer than two")


def _has_torch():
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _has_torch(), reason="PyTorch is not installed here (the GPU machine has it)")
def test_torch_reference_is_our_architecture():
    """dev/bench_torch.py's network is preset alexnet: the same parameter shapes in the
    same order, and with the same weights the same activations and losses as the NumPy
    reference model (dropout off). He-scaled weights and inputs of scale 50 make every
    layer matter (LRN's sum of squares reaches its k=2 term, logits are O(10)), unlike
    the paper's init, whose logits are all near 0. Both sides are float32; the tolerance,
    2e-3 of the largest value, covers fp32 sums of up to 9216 terms (9216 * 2^-24 = 5.5e-4
    each) compounded over the eight layers."""
    import torch
    import alexnet as A
    bench = load("bench_torch")
    arch = A.architecture("alexnet", 1000)
    shapes = A.parameter_shapes(arch)
    model = bench.alexnet(torch)
    layers = [m for m in model if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 8
    theirs = {}
    for name, layer in zip(A.LAYERS, layers):
        theirs[f"{name}.weight"], theirs[f"{name}.bias"] = layer.weight, layer.bias
    assert list(theirs) == list(shapes)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == shapes
    assert sum(v.numel() for v in theirs.values()) == 60965224

    rng = np.random.default_rng(0)
    params = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if name.endswith("weight") else 1
        params[name] = (rng.normal(0, np.sqrt(2 / fan_in), shape) if name.endswith("weight")
                        else rng.normal(0, 0.1, shape)).astype(np.float32)
        with torch.no_grad():
            theirs[name].copy_(torch.from_numpy(params[name]))
    x = (rng.standard_normal((2, 3, 224, 224)) * 50).astype(np.float32)
    labels = np.array([3, 997], np.int32)
    losses, _, cache = A.model_forward(arch, params, x, labels, dropout=0.0, train=True)

    seen = {}
    lrn2, fc8 = model[7], layers[7]
    lrn2.register_forward_hook(lambda m, i, o: seen.__setitem__("conv2.lrn", o))
    fc8.register_forward_hook(lambda m, i, o: seen.__setitem__("fc8.in", i[0]))
    model.eval()  # dropout off
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        their_losses = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels).long(),
                                                         reduction="none").numpy()
    for key in ("conv2.lrn", "fc8.in"):
        ours, other = cache[key], seen[key].numpy()
        assert np.max(np.abs(ours - other)) <= 2e-3 * np.max(np.abs(other)), key
    assert np.max(np.abs(their_losses)) > 1.0  # the check below is not about near-constant values
    np.testing.assert_allclose(losses, their_losses, rtol=2e-3, atol=0)
