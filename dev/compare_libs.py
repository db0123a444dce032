"""Run every op on the same inputs through two builds of the library; print the
largest difference per op.

    python dev/compare_libs.py ./libalexnet_cpu.so ./libalexnet.so            # CPU vs GPU build
    python dev/compare_libs.py ./libalexnet_cpu.so ./libalexnet_cpu.so \\
        --env-a CUDA_CPU_SCHEDULE=forward --env-b CUDA_CPU_SCHEDULE=reverse --exact

alexnet.py loads one library per process (ALEXNET_LIB), so each side runs in its own
subprocess (this file with --worker), computes every op on inputs drawn from the same
seed, and saves the outputs; this process compares them.

Verdicts, per op and output, with d = max|a - b| / max|b|:
  exact     d = 0
  ok        d <= tol = max(L, 16) * 2^-23, L = the op's longest accumulation. Both builds
            run the same code in the same summation order; they differ only where nvcc
            contracts a*b+c into one FMA and in the fast intrinsics (__expf, __powf), each
            a few roundings of 2^-24 per accumulated term, so an L-term sum differs by at
            most ~L * 2^-23 of its magnitude. The floor 16 covers the intrinsics' few-ulp
            error in ops with short or no sums (LRN, softmax, augmentation).
  DIFFERS   d > tol: a real difference (exit status 1)
With --exact every op must be bitwise equal (two schedules of the same build), except
the ops named by --allow-inexact (float atomics, whose order the schedule changes).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per-tower layer shapes of preset "alexnet" (the paper's network) and awkward small ones that
# divide no tile size. conv: (name, C, H, K, R, stride, pad, OH)  fc: (name, in, out)
SHAPES = {
    "alexnet": {
        "conv": [("conv1", 3, 224, 48, 11, 4, 0, 55), ("conv2", 48, 27, 128, 5, 1, 2, 27),
                 ("conv3", 256, 13, 192, 3, 1, 1, 13), ("conv4", 192, 13, 192, 3, 1, 1, 13),
                 ("conv5", 192, 13, 128, 3, 1, 1, 13)],
        "fc": [("fc6", 9216, 2048), ("fc7", 4096, 2048), ("fc8", 4096, 500)],
        "lrn": [("lrn1", 48, 55), ("lrn2", 128, 27)],
        "spatial_norm": [("norm2", 128, 27)],
        "pool": [("pool1", 48, 55, 27), ("pool2", 128, 27, 13), ("pool5", 128, 13, 6)],
        "classes": 1000, "image": (256, 224), "params": 1 << 20,
    },
    "small": {
        "conv": [("conv_a", 3, 35, 7, 5, 3, 0, 11), ("conv_b", 5, 9, 6, 3, 1, 1, 9),
                 ("conv_c", 17, 7, 13, 3, 2, 1, 4)],
        "fc": [("fc_a", 37, 19), ("fc_b", 130, 1)],
        "lrn": [("lrn_a", 7, 5)],
        "spatial_norm": [("norm_a", 3, 6)],
        "pool": [("pool_a", 5, 11, 5), ("pool_b", 3, 6, 2)],
        "classes": 10, "image": (20, 17), "params": 1237,
    },
}


def cases(shapes, batch):
    """(op name, L, function(rng) -> {output name: array}) for every op in the library."""
    import alexnet as A
    N = batch
    out = []

    def uniform(rng, *shape, lo=-1.0, hi=1.0):
        return rng.uniform(lo, hi, shape).astype(np.float32)

    for name, C, H, K, R, stride, pad, OH in shapes["conv"]:
        def conv(rng, C=C, H=H, K=K, R=R, stride=stride, pad=pad, OH=OH):
            x, w = uniform(rng, N, C, H, H), uniform(rng, K, C, R, R, lo=-0.1, hi=0.1)
            b, dy = uniform(rng, K), uniform(rng, N, K, OH, OH)
            y = A.cuda_conv_forward(x, w, b, stride=stride, pad=pad, out_hw=(OH, OH), relu=True)
            dx = A.cuda_conv_backward_data(dy, w, (H, H), stride=stride, pad=pad)
            dw, db = A.cuda_conv_backward_weights(dy, x, (R, R), stride=stride, pad=pad)
            return {"forward": y, "backward_data": dx, "backward_weights": dw, "bias_grad": db}
        out.append((f"{name} conv", max(C * R * R, N * OH * OH), conv))

    for name, fin, fout in shapes["fc"]:
        def fc(rng, fin=fin, fout=fout):
            x, w = uniform(rng, N, fin), uniform(rng, fout, fin, lo=-0.1, hi=0.1)
            b, dy = uniform(rng, fout), uniform(rng, N, fout)
            y = A.cuda_fc_forward(x, w, b, True)
            dx = A.cuda_fc_backward_data(dy, w)
            dw, db = A.cuda_fc_backward_weights(dy, x)
            return {"forward": y, "backward_data": dx, "backward_weights": dw, "bias_grad": db}
        out.append((f"{name} fc", max(fin, fout, N), fc))

    def relu(rng):
        x, dy = uniform(rng, N, 4099), uniform(rng, N, 4099)
        y = A.cuda_relu_forward(x)
        return {"forward": y, "backward": A.cuda_relu_backward(dy, y)}
    out.append(("relu", 0, relu))

    # the two normalisations: (op, settings size/alpha/beta/k, summed terms per output)
    for op, settings, terms in (("lrn", (5, 1e-4, 0.75, 2.0), 5), ("spatial_norm", (5, 1e-3, 0.75, 1.0), 25)):
        forward, backward = getattr(A, f"cuda_{op}_forward"), getattr(A, f"cuda_{op}_backward")
        for name, C, H in shapes[op]:
            def norm(rng, C=C, H=H, forward=forward, backward=backward, settings=settings):
                x, dy = uniform(rng, N, C, H, H, lo=-20, hi=20), uniform(rng, N, C, H, H)
                y, scale = forward(x, *settings)
                return {"forward": y, "scale": scale, "backward": backward(dy, x, y, scale, *settings)}
            out.append((f"{name} {op}", terms, norm))

    for name, C, H, OH in shapes["pool"]:
        def pool(rng, C=C, H=H, OH=OH):
            x = np.round(uniform(rng, N, C, H, H) * 4) / 4  # ties, to check the tie rule
            dy = uniform(rng, N, C, OH, OH)
            return {"forward": A.cuda_maxpool_forward(x, 3, 2, OH, OH),
                    "backward": A.cuda_maxpool_backward(dy, x, 3, 2)}
        out.append((f"{name} maxpool", 0, pool))

    def dropout(rng):
        x = uniform(rng, N, 2053)
        return {"train": A.cuda_dropout_forward(x, 0.5, 1234, 6, 77, True),
                "test": A.cuda_dropout_forward(x, 0.5, 1234, 6, 77, False),
                "backward": A.cuda_dropout_backward(x, 0.5, 1234, 6, 77)}
    out.append(("dropout", 0, dropout))

    K = shapes["classes"]

    def softmax(rng):
        logits = uniform(rng, N, K, lo=-8, hi=8)
        labels = rng.integers(0, K, N).astype(np.int32)
        losses, dlogits, correct = A.cuda_softmax_cross_entropy(logits, labels)
        return {"losses": losses, "dlogits": dlogits, "correct": np.asarray(correct, np.float32),
                "probs": A.cuda_softmax_forward(logits)}
    out.append(("softmax", K, softmax))

    def philox(rng):
        counters = rng.integers(0, 2 ** 32, (64, 4), dtype=np.uint32)
        keys = rng.integers(0, 2 ** 32, (64, 2), dtype=np.uint32)
        blocks = [A.cuda_philox4x32(c, k) for c, k in zip(counters, keys)]
        return {"words": np.array(blocks, np.float64)}  # uint32 words are exact in float64
    out.append(("philox4x32", 0, philox))

    H, crop = shapes["image"]

    def augment(rng):
        images = rng.integers(0, 256, (N, H, H, 3)).astype(np.uint8)
        mean = uniform(rng, H, H, 3, lo=100, hi=150)
        offsets = rng.integers(0, H - crop + 1, (N, 2)).astype(np.int32)
        flips = (np.arange(N) % 2).astype(np.uint8)
        alphas = uniform(rng, N, 3, lo=-0.3, hi=0.3)
        eigval = uniform(rng, 3, lo=0, hi=1)
        eigvec = uniform(rng, 3, 3)
        return {"crops": A.cuda_augment_images(images, mean, offsets, flips, alphas, eigval, eigvec, crop)}
    out.append(("augment_images", 4, augment))

    def sgd(rng):
        n = shapes["params"]
        w, v, g = uniform(rng, n), uniform(rng, n, lo=-1e-3, hi=1e-3), uniform(rng, n, lo=-1e-2, hi=1e-2)
        w, v = A.cuda_sgd_update(w, v, g, 0.01, 0.9, 5e-4)
        return {"weights": w, "momentum": v}
    out.append(("sgd_update", 2, sgd))
    return out


def worker(args):
    """Compute every op with the library that ALEXNET_LIB names; save the outputs."""
    sys.path.insert(0, ROOT)
    results, errors = {}, {}
    for name, _, run in cases(SHAPES[args.shapes], args.batch):
        if args.ops and not any(o in name for o in args.ops.split(",")):
            continue
        try:
            for key, value in run(np.random.default_rng(args.seed)).items():
                results[f"{name}/{key}"] = np.asarray(value)
        except Exception as e:  # a missing binding or a failing op: reported per op, not fatal
            errors[name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    np.savez(args.worker, __errors__=np.array(json.dumps(errors)), **results)


def run_side(lib, env_pairs, args, path):
    env = dict(os.environ, ALEXNET_LIB=os.path.abspath(lib))
    for pair in env_pairs:
        key, _, value = pair.partition("=")
        env[key] = value
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--shapes", args.shapes,
           "--batch", str(args.batch), "--seed", str(args.seed), "--ops", args.ops, lib, lib]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the worker for {lib} failed: "
                         f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    with np.load(path) as data:
        outputs = {k: data[k] for k in data.files if k != "__errors__"}
        errors = json.loads(str(data["__errors__"]))
    return outputs, errors


def compare_outputs(a, b, errors_a, errors_b, lengths, exact, allowed):
    """Table lines comparing outputs a and b ({"op/output": array}), the number of problems,
    and the largest d with its output name."""
    lines, bad, worst = [], 0, (0.0, "")
    for name in lengths:
        if name in errors_a or name in errors_b:
            lines.append(f"{name:40s} FAILED  A: {errors_a.get(name, 'ok')}  B: {errors_b.get(name, 'ok')}")
            bad += 1
            continue
        tol = max(lengths[name], 16) * 2.0 ** -23
        for key in sorted(k for k in b if k.split("/")[0] == name):
            x, y = a[key].astype(np.float64), b[key].astype(np.float64)
            if x.shape != y.shape:
                lines.append(f"{key:40s} shapes differ: {x.shape} vs {y.shape}")
                bad += 1
                continue
            finite = bool(np.isfinite(x).all() and np.isfinite(y).all())
            diff = float(np.max(np.abs(x - y), initial=0.0)) if finite else np.inf
            scale = float(np.max(np.abs(y), initial=0.0)) if finite else 0.0
            d = diff / scale if scale > 0 else (0.0 if diff == 0 else np.inf)
            if not finite:
                verdict = "NOT FINITE"
            elif diff == 0:
                verdict = "exact"
            elif exact and name not in allowed:
                verdict = "DIFFERS (must be bitwise equal)"
            elif d <= tol:
                verdict = "ok"
            else:
                verdict = "DIFFERS"
            bad += verdict not in ("exact", "ok")
            if d > worst[0]:
                worst = (d, key)
            lines.append(f"{key:40s} {diff:11.3e} {scale:11.3e} {d:10.2e} {tol:10.2e}  {verdict}")
    return lines, bad, worst


def compare(args):
    sys.path.insert(0, ROOT)
    lengths = {name: L for name, L, _ in cases(SHAPES[args.shapes], args.batch)
               if not args.ops or any(o in name for o in args.ops.split(","))}
    allowed = {name for name in lengths for o in args.allow_inexact.split(",") if o and o in name}
    with tempfile.TemporaryDirectory() as tmp:
        a, errors_a = run_side(args.lib_a, args.env_a, args, os.path.join(tmp, "a.npz"))
        b, errors_b = run_side(args.lib_b, args.env_b, args, os.path.join(tmp, "b.npz"))
    print(f"A = {args.lib_a} {' '.join(args.env_a)}".rstrip())
    print(f"B = {args.lib_b} {' '.join(args.env_b)}".rstrip())
    print(f"shapes {args.shapes}, batch {args.batch}; d = max|A-B| / max|B|")
    print(f"{'op / output':40s} {'max|A-B|':>11s} {'max|B|':>11s} {'d':>10s} {'tol':>10s}  verdict")
    lines, bad, (d, key) = compare_outputs(a, b, errors_a, errors_b, lengths, args.exact, allowed)
    print("\n".join(lines))
    exact = sum(line.endswith("  exact") for line in lines)
    print(f"compare_libs: {len(lines)} outputs, {exact} bitwise equal, largest d {d:.2e}"
          f"{f' ({key})' if key else ''}: {'all ops agree' if bad == 0 else f'{bad} problem(s)'}")
    return 1 if bad else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("lib_a", help="first library (e.g. ./libalexnet_cpu.so)")
    parser.add_argument("lib_b", help="second library (e.g. ./libalexnet.so)")
    parser.add_argument("--env-a", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the first library's process (repeatable)")
    parser.add_argument("--env-b", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the second library's process (repeatable)")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="alexnet",
                        help="per-tower AlexNet shapes or small awkward ones (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default: %(default)s)")
    parser.add_argument("--ops", default="", help="comma-separated substrings: only these ops")
    parser.add_argument("--exact", action="store_true", help="require bitwise equality")
    parser.add_argument("--allow-inexact", default="",
                        help="with --exact: comma-separated ops that use float atomics (rounding order may differ)")
    parser.add_argument("--seed", type=int, default=2012)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    if args.worker:
        return worker(args)
    for lib in (args.lib_a, args.lib_b):
        if not os.path.exists(lib):
            print(f"error: {lib} not found (build it first: make cpu / make gpu)", file=sys.stderr)
            return 1
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
