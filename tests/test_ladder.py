"""The kernel ladder of dev/cuda/ (CPU build): every version passes its check against the
host reference, on a small odd-sized shape and on AlexNet's layers at batch 1, and the
check can fail."""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "cpu", "dev_cuda")
CONV = os.path.join(BUILD, "conv_forward")
FC = os.path.join(BUILD, "fc_forward")
LINE = re.compile(r"^(\d) (.+?)\s+(PASS|FAIL)  max\|diff\| ", re.M)

# They run their own binaries, not the library that the ASan build instruments.
pytestmark = [
    pytest.mark.no_asan,
    pytest.mark.skipif(not (os.path.exists(CONV) and os.path.exists(FC)),
                       reason="build/cpu/dev_cuda/* not built (make dev-cuda; make test builds them)"),
]

CONV_VERSIONS = [1, 2, 3, 4, 4, 4, 4]  # version 4: conv_forward, then three tile shapes
FC_VERSIONS = [1, 2, 3]


def ladder(exe, *args, status=0):
    """Runs the binary; returns [(version, name, verdict)] of its report lines."""
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == status, proc.stdout + proc.stderr
    return [(int(v), name, verdict) for v, name, verdict in LINE.findall(proc.stdout)], proc.stdout


def assert_all(rows, versions, verdict):
    assert [v for v, _, _ in rows] == versions, rows
    assert all(r[2] == verdict for r in rows), rows


def test_conv_small_every_version(schedule):
    """Rows (70 filters), columns (2 x 9 x 12 pixels) and depth (7 x 5 x 3) all end in
    partial tiles; stride 2, pad 1, a non-square filter and image. Under every thread and
    block order of the CPU runtime, which a missing barrier would not survive."""
    rows, out = ladder(CONV, "--layer", "small", "--batch", "2")
    assert_all(rows, CONV_VERSIONS, "PASS")
    assert "all 15120 outputs" in out


@pytest.mark.parametrize("layer", ["conv1", "conv2", "conv3", "conv4", "conv5"])
def test_conv_alexnet_layers(layer):
    rows, _ = ladder(CONV, "--layer", layer, "--batch", "1")
    assert_all(rows, CONV_VERSIONS, "PASS")


@pytest.mark.parametrize("layer", ["small", "fc6", "fc7", "fc8"])
def test_fc_every_version(layer):
    rows, _ = ladder(FC, "--layer", layer, "--batch", "3")
    assert_all(rows, FC_VERSIONS, "PASS")
    assert re.search(r"fc_forward \(auto: \d+x\d+, \d+ splits\)", rows[-1][1]), rows  # split-K ran


def test_one_version():
    rows, _ = ladder(CONV, "4", "--layer", "small")
    assert_all(rows, [4, 4, 4, 4], "PASS")
    rows, _ = ladder(FC, "1", "--layer", "small")
    assert_all(rows, [1], "PASS")


def test_the_check_can_fail():
    """--perturb adds 1e-2 to one output after the kernel: far above the tolerance at
    these depths (105 and 1000), so every version must FAIL and the exit status be 1."""
    rows, _ = ladder(CONV, "--layer", "small", "--perturb", status=1)
    assert_all(rows, CONV_VERSIONS, "FAIL")
    rows, _ = ladder(FC, "--layer", "small", "--perturb", status=1)
    assert_all(rows, FC_VERSIONS, "FAIL")


def test_bad_arguments():
    for exe, args in ((CONV, ["5"]), (CONV, ["--layer", "conv9"]), (FC, ["--batch", "0"]),
                      (FC, ["--frobnicate"]), (FC, ["1", "2"])):
        proc = subprocess.run([exe, *args], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.startswith("error: "), (args, proc.stderr)


def test_sampled_reference():
    """Past 2^28 multiply-adds the reference checks every step-th output, with the step
    coprime to the output features (fc6 at batch 32: 2 shares a factor with 2048, so 3)."""
    rows, out = ladder(FC, "--layer", "fc6", "--batch", "32")
    assert_all(rows, FC_VERSIONS, "PASS")
    assert "21846 of 65536 outputs (a stride of 3)" in out
