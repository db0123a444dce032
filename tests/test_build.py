"""Checks of the build itself: the shared-memory rule, register spills, the GPU binary without a GPU."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "train_alexnet.cu")
PTXAS_LOG = os.path.join(ROOT, "build", "gpu", "ptxas.log")
GPU_EXE = os.path.join(ROOT, "train_alexnet")
NVCC = shutil.which(os.environ.get("NVCC") or "nvcc")


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


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the GPU build (and its ptxas report) is skipped")
def test_no_kernel_spills_registers():
    if not os.path.exists(PTXAS_LOG):  # `make test` builds it; plain pytest may not have
        build = subprocess.run(["make", "-C", ROOT, "build/gpu/train_alexnet.o"], capture_output=True, text=True, timeout=1200)
        assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
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
    if not os.path.exists(GPU_EXE):
        build = subprocess.run(["make", "-C", ROOT, "train_alexnet"], capture_output=True, text=True, timeout=1200)
        assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    run = subprocess.run([GPU_EXE], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert run.stdout == ""
    assert run.stderr == "error: no CUDA device found; use ./train_alexnet_cpu\n"
