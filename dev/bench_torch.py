"""PyTorch reference throughput for the paper's AlexNet training step, in four modes.

The identical architecture to preset "alexnet" (the paper's network), written as one
network: grouped nn.Conv2d where a layer reads only its own tower (conv2, conv4,
conv5), nn.LocalResponseNorm(5, 1e-4, 0.75, 2) applied to each tower's channels
separately, nn.MaxPool2d(3, 2), dropout 0.5 after fc6 and fc7, conv1 on a 224 crop
with 3 zero rows/columns past the bottom/right edge (55x55 output). Paper init
(weights N(0, 0.01^2); biases 1 in conv2, conv4, conv5, fc6, fc7, else 0); SGD with
momentum 0.9 and weight decay 5e-4 on the weights only. One training step =
forward, cross-entropy, backward, SGD update, batch 128, on data already on the
device, timed with CUDA events after warm-up.

Two differences from our step that cost nothing measurable: nn.Dropout rescales the
survivors (ours does not) and torch.optim.SGD folds the learning rate differently.

Modes (--modes; the first four by default, in this order, all in this process):
  fp32           strict FP32: TF32 off in cuDNN and in matmuls, NCHW. The fair baseline
                 (our kernels compute in FP32) and the headline ratio.
  tf32           PyTorch's default: TF32 convolutions (cudnn.allow_tf32 True), FP32
                 matmuls (cuda.matmul.allow_tf32 False), NCHW
  channels_last  strict FP32 as in fp32, channels_last (NHWC) memory format
  bf16           AMP: autocast to bfloat16, channels_last; FP32 weights and SGD update
  compile        torch.compile of the fp32 network: only when asked for (it costs minutes
                 of compilation), always last, in its own process, skipped when the
                 compilation (the warm-up) takes over --compile-limit seconds

Each mode is compared with the precision of our matrix products (train_alexnet
--precision) that matches it: fp32, channels_last and compile with ours fp32 (FP32 FFMA),
tf32 with ours tf32, bf16 with ours bf16 (both on tensor cores, FP32 accumulation).

    python dev/bench_torch.py                             # fp32, tf32, channels_last, bf16
    python dev/bench_torch.py --modes fp32 --steps 20     # one mode
    python dev/bench_torch.py --ours 2500 --peak 66.9     # and ours fp32 / torch for fp32, channels_last
    python dev/bench_torch.py --ours fp32=2500,tf32=3000,bf16=4000 --peak 66.9   # every mode
Each mode prints one line: "torch <mode>: <images/s> images/s (<ms> ms/step, batch,
precision and layout, TFLOP/s, loss)" or "torch <mode>: failed (...)". With --ours (one
number: our fp32 images/s; or a list of precision=images/s), "ours <precision> / torch
<mode> = R (X vs Y images/s)" for each mode whose precision is in it, one line of our
TFLOP/s per precision given (fp32 also as a share of the FP32 --peak), and "headline:
ours fp32 / torch fp32 (strict FP32) = R". It needs PyTorch and a CUDA device: without
either it prints one line saying so and exits with status 2 (a bad option: also 2; a
mode that failed: 1).
"""
import argparse
import gc
import os
import subprocess
import sys
import threading
import time

# mode: (cuDNN TF32, matmul TF32, channels_last, AMP bf16, torch.compile, description)
MODES = {
    "fp32": (False, False, False, False, False, "strict FP32, NCHW"),
    "tf32": (True, False, False, False, False, "PyTorch default: TF32 convolutions, FP32 matmuls, NCHW"),
    "channels_last": (False, False, True, False, False, "strict FP32, channels_last"),
    "bf16": (False, False, True, True, False, "AMP bf16 autocast, channels_last"),
    "compile": (False, False, False, False, True, "torch.compile, strict FP32, NCHW"),
}
DEFAULT_MODES = ["fp32", "tf32", "channels_last", "bf16"]
HEADLINE = "fp32"  # the fair baseline: FP32 arithmetic like ours
PRECISIONS = ("fp32", "tf32", "bf16")  # of our matrix products (train_alexnet --precision)
# mode: our precision it is compared with
OUR_PRECISION = {"fp32": "fp32", "tf32": "tf32", "channels_last": "fp32", "bf16": "bf16", "compile": "fp32"}
GFLOP_PER_IMAGE = 4.136  # one training step of the paper's network, per image


def alexnet(torch):
    nn = torch.nn

    class TowerLRN(nn.Module):
        """Cross-map LRN within each tower: the window never crosses into the other tower."""
        def __init__(self):
            super().__init__()
            self.lrn = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)

        def forward(self, x):
            n, c, h, w = x.shape
            return self.lrn(x.reshape(n * 2, c // 2, h, w)).reshape(n, c, h, w)

    def conv(c, k, size, stride=1, pad=0, groups=1, bias=0.0):
        layer = nn.Conv2d(c, k, size, stride=stride, padding=pad, groups=groups)
        nn.init.normal_(layer.weight, 0.0, 0.01)
        nn.init.constant_(layer.bias, bias)
        return layer

    def fc(i, o, bias=0.0):
        layer = nn.Linear(i, o)
        nn.init.normal_(layer.weight, 0.0, 0.01)
        nn.init.constant_(layer.bias, bias)
        return layer

    return nn.Sequential(
        nn.ZeroPad2d((0, 3, 0, 3)),  # 224 + 3 zeros bottom/right -> conv1 output 55
        conv(3, 96, 11, stride=4), nn.ReLU(inplace=True), TowerLRN(), nn.MaxPool2d(3, 2),
        conv(96, 256, 5, pad=2, groups=2, bias=1.0), nn.ReLU(inplace=True), TowerLRN(),
        nn.MaxPool2d(3, 2),
        conv(256, 384, 3, pad=1), nn.ReLU(inplace=True),
        conv(384, 384, 3, pad=1, groups=2, bias=1.0), nn.ReLU(inplace=True),
        conv(384, 256, 3, pad=1, groups=2, bias=1.0), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Flatten(),
        fc(9216, 4096, bias=1.0), nn.ReLU(inplace=True), nn.Dropout(0.5),
        fc(4096, 4096, bias=1.0), nn.ReLU(inplace=True), nn.Dropout(0.5),
        fc(4096, 1000),
    )


def time_mode(torch, mode, args, on_warm=None):
    """Time one mode in this process; return its result line."""
    tf32_conv, tf32_matmul, channels_last, amp, compiled, label = MODES[mode]
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = tf32_conv
    torch.backends.cuda.matmul.allow_tf32 = tf32_matmul
    device = torch.device("cuda")
    model = alexnet(torch).to(device)
    x = torch.randn(args.batch, 3, 224, 224, device=device) * 50.0
    y = torch.randint(0, 1000, (args.batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD([{"params": weights, "weight_decay": 5e-4},
                           {"params": biases, "weight_decay": 0.0}], lr=0.01, momentum=0.9)
    forward = torch.compile(model) if compiled else model
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(forward(x), y)
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    torch.cuda.synchronize()
    if on_warm:
        on_warm(time.perf_counter() - t0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        loss = step()
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / args.steps
    loss = float(loss)  # reported, not judged: random labels at lr 0.01 may diverge
    images = args.batch * 1e3 / ms
    return (f"torch {mode}: {images:.1f} images/s ({ms:.2f} ms/step, batch {args.batch}, {label}, "
            f"{images * GFLOP_PER_IMAGE / 1e3:.2f} TFLOP/s, loss {loss:.4f})")


def run_here(torch, mode, args):
    """time_mode, with any error turned into a "failed" line and the memory given back."""
    try:
        line = time_mode(torch, mode, args)
    except Exception as e:  # e.g. out of memory, or bf16 unsupported: the other modes still run
        first = (str(e).strip().splitlines() or [""])[0][:200]
        line = f"torch {mode}: failed ({type(e).__name__}: {first})"
    gc.collect()
    torch.cuda.empty_cache()
    return line


def run_child(mode, args, compile_limit):
    """Run one mode (compile) in a subprocess. Kill it when the warm-up (the compilation)
    exceeds compile_limit seconds; return its result line or the reason it has none."""
    cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, warmed = [], threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("WARMED"):
                warmed.set()
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    if not warmed.wait(compile_limit) and proc.poll() is None:
        proc.kill()
        proc.wait()
        return f"torch {mode}: skipped (warm-up did not finish within {compile_limit:.0f} s)"
    try:
        proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return f"torch {mode}: skipped (timed steps did not finish within {args.timeout:.0f} s)"
    thread.join()
    results = [line for line in lines if line.startswith("torch ")]
    if proc.returncode == 0 and results:
        return results[-1]
    tail = " | ".join(lines[-3:]) if lines else "no output"
    return f"torch {mode}: failed (exit {proc.returncode}): {tail}"


def parse_ours(text):
    """--ours: one number (our fp32 images/s) or a list "fp32=X,tf32=Y,bf16=Z"; returns
    {precision: images/s} without the values that are not positive (0: not measured)."""
    text = text.strip()
    try:
        if "=" not in text:
            ours = {"fp32": float(text)}
        else:
            ours = {}
            for item in text.split(","):
                precision, sep, value = item.partition("=")
                precision = precision.strip()
                if precision not in PRECISIONS:
                    raise argparse.ArgumentTypeError(
                        f"unknown precision {precision!r} in {text!r} (choose from {', '.join(PRECISIONS)})")
                if precision in ours:
                    raise argparse.ArgumentTypeError(f"{precision} given twice in {text!r}")
                ours[precision] = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a number nor a list like fp32=2500,tf32=3000,bf16=4000") from None
    return {p: v for p, v in ours.items() if v > 0}


def summarize(lines, ours, peak):
    """Lines comparing our images/s with each PyTorch result line, each mode with our
    precision that matches it (OUR_PRECISION; modes whose precision is not in ours are left
    out), our TFLOP/s per precision (fp32 also against the FP32 peak, when given), and the
    headline ratio (ours fp32 / strict FP32) when both were measured. ours: {precision:
    images/s}, or one number: our fp32 images/s."""
    if not isinstance(ours, dict):
        ours = {"fp32": ours}
    ours = {p: float(v) for p, v in ours.items() if v and v > 0}
    out, ratios = [], {}
    for line in lines:
        name, sep, rest = line.partition(": ")
        words = rest.split()
        if name.startswith("torch ") and len(words) > 1 and words[1] == "images/s":
            mode, theirs = name[len("torch "):], float(words[0])
            precision = OUR_PRECISION.get(mode)
            if precision not in ours or theirs <= 0:
                continue
            mine = ours[precision]
            ratios[mode] = mine / theirs
            out.append(f"ours {precision} / {name} = {mine / theirs:.2f} ({mine:.1f} vs {theirs:.1f} images/s)")
    for precision in [p for p in PRECISIONS if p in ours] + [p for p in ours if p not in PRECISIONS]:
        tflops = ours[precision] * GFLOP_PER_IMAGE / 1e3
        share = (f" = {100 * tflops / peak:.1f}% of the FP32 peak {peak:.1f} TFLOP/s"
                 if peak and precision == "fp32" else "")
        out.append(f"ours {precision}: {ours[precision]:.1f} images/s = {tflops:.2f} TFLOP/s{share}")
    if HEADLINE in ratios:
        out.append(f"headline: ours fp32 / torch {HEADLINE} (strict FP32) = {ratios[HEADLINE]:.2f}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help=f"comma-separated, from {', '.join(MODES)} (default: %(default)s)")
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)  # one mode: the compile child
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--compile-limit", type=float, default=60.0,
                        help="seconds torch.compile (the warm-up) may take before the mode is skipped (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds the compile mode's timed steps may take (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ours", type=parse_ours, default={},
                        help="our training step's images/s: one number (fp32) or a list "
                             "fp32=X,tf32=Y,bf16=Z; also print the ratios ours / PyTorch, each "
                             "mode against our matching precision")
    parser.add_argument("--peak", type=float, default=0.0, help="the GPU's FP32 peak in TFLOP/s (with --ours)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    modes = [m for m in modes if m != "compile"] + (["compile"] if "compile" in modes else [])
    try:
        import torch
    except ImportError:
        print(f"bench_torch: PyTorch is not installed for {sys.executable}: nothing timed")
        return 2
    if not torch.cuda.is_available():
        print(f"bench_torch: no CUDA device visible to PyTorch {torch.__version__}: it times on a GPU only")
        return 2
    if args.mode:  # the compile child
        print(time_mode(torch, args.mode, args, lambda s: print(f"WARMED {s:.1f}", flush=True)), flush=True)
        return 0
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, cuDNN {torch.backends.cudnn.version()}, "
          f"batch {args.batch}, {args.steps} timed steps after {args.warmup} per mode", flush=True)
    lines = []
    for mode in modes:
        lines.append(run_child(mode, args, args.compile_limit) if mode == "compile" else run_here(torch, mode, args))
        print(lines[-1], flush=True)
    if args.ours:
        print("\n".join(summarize(lines, args.ours, args.peak)))
    return int(any(": failed" in line for line in lines))


if __name__ == "__main__":
    sys.exit(main())
