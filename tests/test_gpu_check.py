"""The GPU kit (dev/gpu_check.sh and its helpers), checked as far as a machine without
a GPU allows: the --cpu dry run end to end, the option handling, and the comparison
and report logic that the GPU run relies on."""
import importlib.util
import os
import subprocess

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "dev", "gpu_check.sh")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "dev", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_check(tmp_path, *args, timeout=150):
    summary = tmp_path / "summary.txt"
    proc = subprocess.run(["bash", SCRIPT, "--summary", str(summary), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return proc, summary.read_text() if summary.exists() else ""


def step_lines(text):
    """{step number: its result line} from the results block at the end."""
    block = text.split("=== results", 1)[1]
    return {int(line.split()[1]): line for line in block.splitlines() if line.startswith("step ")}


# The dry run drives the regular CPU build through bash, make and Python: under the
# AddressSanitizer build's LD_PRELOAD every one of those tools would be instrumented.
@pytest.mark.no_asan
def test_cpu_dry_run(tmp_path):
    """The whole --cpu dry run: steps 2, 4, 5 pass on the CPU build, 1, 3, 6 are
    skipped with a reason, and stdout and the summary file hold the same report."""
    proc, text = gpu_check(tmp_path, "--cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert text == proc.stdout
    steps = step_lines(text)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    for n in (1, 3, 6):
        assert "SKIP (--cpu" in steps[n], steps[n]
    assert "PASS" in steps[2] and " passed" in steps[2], steps[2]
    assert "PASS" in steps[4], steps[4]
    train = os.path.join(ROOT, "train_alexnet_cpu")
    has_model = "--arch" in subprocess.run([train, "--help"], capture_output=True, text=True).stdout
    if has_model:
        assert "PASS" in steps[5], steps[5]
    else:
        assert "SKIP (no model yet" in steps[5], steps[5]
    assert "no step failed" in text


@pytest.mark.no_asan
def test_only_and_skip(tmp_path):
    proc, text = gpu_check(tmp_path, "--cpu", "--only", "1,3,6", "--skip-6")
    assert proc.returncode == 0, proc.stdout[-2000:]
    steps = step_lines(text)
    for n in (2, 4, 5, 6):
        assert "SKIP (by option)" in steps[n], steps[n]
    assert "SKIP (--cpu: no GPU; CPU build ok)" in steps[1]
    assert "SKIP (--cpu: compute-sanitizer needs a GPU; every kernel ran once" in steps[3]


def test_bad_option(tmp_path):
    proc, _ = gpu_check(tmp_path, "--skip-9")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unknown option '--skip-9' (see --help)"]


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
    """The ratio and TFLOP/s lines that step 6 prints, from bench_torch's result lines."""
    summarize = load("bench_torch").summarize
    lines = ["torch eager: 2000.0 images/s (64.00 ms/step, batch 128, 8.27 TFLOP/s, loss 6.9, cuda)",
             "torch compile: skipped (warm-up did not finish within 60 s)"]
    out = summarize(lines, 1000.0, 66.9)
    assert out[0] == "ours / torch eager = 0.50 (1000.0 vs 2000.0 images/s)"
    assert out[1] == "ours: 1000.0 images/s = 4.14 TFLOP/s = 6.2% of the FP32 peak 66.9 TFLOP/s"
    assert len(out) == 2


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "build", "cpu", "bench_kernels")),
                    reason="build/cpu/bench_kernels not built (make bench-kernels-cpu; gpu_check.sh --cpu builds it)")
def test_bench_kernels_rejects_bad_flags():
    exe = os.path.join(ROOT, "build", "cpu", "bench_kernels")
    for args in (["--batch", "0"], ["--iters"], ["--frobnicate"]):
        proc = subprocess.run([exe, *args], capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stderr.startswith("error: "), (args, proc.stderr)


def test_train_log_verdict():
    """Step 5's judgement of a training log: only step lines count (not the validation
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
