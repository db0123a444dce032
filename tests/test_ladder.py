"""The kernel ladder of dev/cuda/ (CPU build): every version passes its check against the
host reference, on a small odd-sized shape and on AlexNet's layers at batch 1, and the
check can fail. The tensor-core versions run on the CPU runtime's lane-exact mma and
ldmatrix, so a fragment element in the wrong register fails here as on a GPU."""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "cpu", "dev_cuda")
CONV = os.path.join(BUILD, "conv_forward")
FC = os.path.join(BUILD, "fc_forward")
LINE = re.compile(r"^(\d) (.+?)\s+(PASS|FAIL)  max\|diff\| ", re.M)
GAP = re.compile(r"^(\d) .*  vs fp32 +([0-9.]+) u_(tf32|bf16)\*sum\|terms\|$", re.M)

# They run their own binaries, not the library that the ASan build instruments.
pytestmark = [
    pytest.mark.no_asan,
    pytest.mark.skipif(not (os.path.exists(CONV) and os.path.exists(FC)),
                       reason="build/cpu/dev_cuda/* not built (make dev-cuda; make test builds them)"),
]

# version 4: conv_forward, then three tile shapes; 5, 6 (conv) and 4, 5 (fc): tensor
# cores, TF32 and BF16, each as conv_forward / fc_forward runs them, then with one tile
# shape and one split; 7 (conv) and 6 (fc): BF16 on operands stored in BF16, with 2-byte
# loads, then 4-byte pair loads of the stride-1 operands where rows are of even length
# (conv: the weights, not in conv1 (depth 363) or small (105); fc: both)
CONV_VERSIONS = [1, 2, 3, 4, 4, 4, 4, 5, 5, 6, 6, 7]
CONV_PAIRED_VERSIONS = CONV_VERSIONS + [7]
FC_VERSIONS = [1, 2, 3, 4, 4, 5, 5, 6, 6]
FC_FP32_VERSIONS = [1, 2, 3]


def ladder(exe, *args, status=0):
    """Runs the binary; returns [(version, name, verdict)] of its report lines."""
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == status, proc.stdout + proc.stderr
    return [(int(v), name, verdict) for v, name, verdict in LINE.findall(proc.stdout)], proc.stdout


def assert_all(rows, versions, verdict):
    assert [v for v, _, _ in rows] == versions, rows
    assert all(r[2] == verdict for r in rows), rows


def assert_rounded(out):
    """The tensor-core versions' gap to the FP32 reference, in units of u_f * sum|terms|
    (u_tf32 = 2^-11, u_bf16 = 2^-8), shows that their operands were rounded to that
    format and no coarser: both factors of a product within u_f, so it stays below ~2.
    (They pass against the reference of the rounded operands, an FP32 tolerance.)"""
    gaps = {fmt: float(gap) for _, gap, fmt in GAP.findall(out)}
    assert set(gaps) == {"tf32", "bf16"}, out
    assert all(0.01 < gap < 2.0 for gap in gaps.values()), gaps


def test_conv_small_every_version(schedule):
    """Rows (70 filters), columns (2 x 9 x 12 pixels) and depth (7 x 5 x 3) all end in
    partial tiles; stride 2, pad 1, a non-square filter and image. Under every thread and
    block order of the CPU runtime, which a missing barrier would not survive."""
    rows, out = ladder(CONV, "--layer", "small", "--batch", "2")
    assert_all(rows, CONV_VERSIONS, "PASS")
    assert_rounded(out)
    assert "all 15120 outputs" in out


@pytest.mark.parametrize("layer", ["conv1", "conv2", "conv3", "conv4", "conv5"])
def test_conv_alexnet_layers(layer):
    """Checked, not timed (--iters 0): the tensor-core versions take about a second each
    on the CPU runtime, which emulates every mma lane by lane."""
    rows, out = ladder(CONV, "--layer", layer, "--batch", "1", "--iters", "0")
    assert_all(rows, CONV_VERSIONS if layer == "conv1" else CONV_PAIRED_VERSIONS, "PASS")
    assert_rounded(out)


def fp32_versions(*args):
    """The FP32 versions one by one (rows, first report): on fc6 and fc7 the emulated
    tensor cores would take half a minute (every 128-row tile computed for 3 images)."""
    runs = [ladder(FC, str(v), *args) for v in FC_FP32_VERSIONS]
    return [row for rows, _ in runs for row in rows], runs[0][1]


@pytest.mark.parametrize("layer", ["small", "fc6", "fc7", "fc8"])
def test_fc_every_version(layer):
    args = ("--layer", layer, "--batch", "3", "--iters", "0")
    if layer in ("small", "fc8"):
        rows, out = ladder(FC, *args)
        assert_all(rows, FC_VERSIONS, "PASS")
        assert_rounded(out)
        assert re.search(r"fc_forward bf16 \(auto: \d+x\d+, \d+ splits\)", rows[5][1]), rows  # on tensor cores too
    else:
        rows, _ = fp32_versions(*args)
        assert_all(rows, FC_FP32_VERSIONS, "PASS")
    assert re.search(r"fc_forward fp32 \(auto: \d+x\d+, \d+ splits\)", rows[2][1]), rows  # split-K ran


def test_one_version():
    rows, _ = ladder(CONV, "4", "--layer", "small")
    assert_all(rows, [4, 4, 4, 4], "PASS")
    rows, _ = ladder(FC, "1", "--layer", "small")
    assert_all(rows, [1], "PASS")
    rows, out = ladder(CONV, "6", "--layer", "small")
    assert_all(rows, [6, 6], "PASS")
    assert "vs fp32" in out and " ms " in out  # timed, with the gap to FP32


def test_the_check_can_fail():
    """--perturb adds 1e-2 to one output after the kernel: far above the tolerance at
    these depths (105 and 1000), so every version must FAIL and the exit status be 1."""
    rows, _ = ladder(CONV, "--layer", "small", "--perturb", "--iters", "0", status=1)
    assert_all(rows, CONV_VERSIONS, "FAIL")
    rows, _ = ladder(FC, "--layer", "small", "--perturb", "--iters", "0", status=1)
    assert_all(rows, FC_VERSIONS, "FAIL")


def test_bad_arguments():
    for exe, args in ((CONV, ["8"]), (FC, ["7"]), (CONV, ["--layer", "conv9"]), (FC, ["--batch", "0"]),
                      (FC, ["--iters", "-1"]), (FC, ["--frobnicate"]), (FC, ["1", "2"])):
        proc = subprocess.run([exe, *args], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.startswith("error: "), (args, proc.stderr)


def test_sampled_reference():
    """Past 2^28 multiply-adds the reference checks every step-th output, with the step
    coprime to the output features (fc6 at batch 32: 2 shares a factor with 2048, so 3)."""
    rows, out = fp32_versions("--layer", "fc6", "--batch", "32", "--iters", "0")
    assert_all(rows, FC_FP32_VERSIONS, "PASS")
    assert "21846 of 65536 outputs (a stride of 3)" in out
