"""Checks of the build itself: the shared-memory rule, register spills, the GPU binary without a GPU."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "train_alexnet.cu")
PTXAS_LOG = os.path.join(ROOT, "build", "gpu", "ptxas.log")
GPU_EXE = os.path.join(ROOT, "train_alexnet")
GPU_LIB = os.path.join(ROOT, "libalexnet.so")
NVCC = shutil.which(os.environ.get("NVCC") or "nvcc")
# make test-asan preloads the sanitizer runtime into pytest; make, nvcc and the GPU binary
# must not inherit it (nvcc crashes under it).
PLAIN_ENV = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def test_no_raw_shared_in_the_cu_file():
    """Shared memory only through SHARED/EXTERN_SHARED: their two definitions for nvcc are
    the only places allowed to spell __shared__."""
    with open(SOURCE) as f:
        text = f.read()
    # comments may talk about __shared__; blank them out, keeping the line numbers
    code = re.sub(r"//[^\n]*|/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m.group()), text, flags=re.S)
    offending = []
    for number, line in enumerate(code.splitlines(), 1):
        if "__shared__" in line and not re.match(r"\s*#define (SHARED|EXTERN_SHARED)\(", line):
            offending.append(f"train_alexnet.cu:{number}: {line.strip()}")
    assert not offending, "raw __shared__ (use SHARED/EXTERN_SHARED):\n" + "\n".join(offending)


def test_the_macros_are_defined_once_per_build():
    with open(SOURCE) as f:
        text = f.read()
    assert text.count("#define SHARED(") == 1 and text.count("#define EXTERN_SHARED(") == 1


def build(path, target):
    """`make test` builds the GPU files; plain pytest may not have: make the target."""
    if not os.path.exists(path):
        made = subprocess.run(["make", "-C", ROOT, target], capture_output=True, text=True, timeout=1200, env=PLAIN_ENV)
        assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the GPU build (and its ptxas report) is skipped")
def test_no_kernel_spills_registers():
    build(PTXAS_LOG, "build/gpu/train_alexnet.o")
    with open(PTXAS_LOG) as f:
        log = f.read()
    spills, function = [], "?"
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(\w+)'", line) or re.search(r"Function properties for (\S+)", line)
        if m:
            function = " ".join(m.groups())
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and (int(m.group(1)) or int(m.group(2))):
            spills.append(f"{function}: {line.strip()}")
    assert "ptxas" in log, "build/gpu/ptxas.log has no ptxas report (is -Xptxas -v still in NVCC_FLAGS?)"
    assert not spills, "register spills:\n" + "\n".join(spills)


def has_gpu():
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: no GPU executable is built")
def test_gpu_executable_without_a_gpu_says_so_in_one_line():
    if has_gpu():
        pytest.skip("this machine has a GPU: the no-GPU message cannot be checked here")
    build(GPU_EXE, "train_alexnet")
    run = subprocess.run([GPU_EXE], capture_output=True, text=True, timeout=60, env=PLAIN_ENV)
    assert run.returncode != 0
    assert run.stdout == ""
    assert run.stderr == "error: no CUDA device found; use ./train_alexnet_cpu\n"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: no GPU library is built")
def test_gpu_library_without_a_gpu_names_the_cpu_build():
    """The GPU library on a machine without a GPU (or driver): every entry point fails with
    one line naming the CPU library, not CUDA's 'driver version is insufficient'."""
    if has_gpu():
        pytest.skip("this machine has a GPU: the no-GPU message cannot be checked here")
    build(GPU_LIB, "libalexnet.so")
    code = ("import numpy as np, alexnet\n"
            "try:\n    alexnet.cuda_relu_forward(np.ones((1, 1, 2, 2), np.float32))\n"
            "except alexnet.AlexNetError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**PLAIN_ENV, "ALEXNET_LIB": GPU_LIB})
    assert run.returncode == 0, run.stderr
    assert run.stdout == "no CUDA device found; use libalexnet_cpu.so, the CPU build (unset ALEXNET_LIB)\n"
