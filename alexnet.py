"""AlexNet, the Python side.

    python alexnet.py prepare SOURCE [PATH] --out DIR    # images -> dataset folder
    python alexnet.py demo                               # the one-command demo

Sections, in reading order:
  1. dataset files: the binary formats, read_shard, read_stats
  2. data preparation: synthetic, CIFAR-10, ImageNet
  3. NumPy reference of every layer (forward and backward), named like the CUDA kernels
  4. NumPy reference of the whole two-tower model
  5. the shared library: cffi bindings to train_alexnet.cu's C API
  6. command line
"""
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__))


class AlexNetError(Exception):
    """A user-facing error: the command line prints it as one line and exits 1."""


COMMANDS = {}  # name -> (add_arguments(parser), run(args)); each section registers its commands


# -----------------------------------------------------------------------------
# 1. Dataset files


# -----------------------------------------------------------------------------
# 2. Data preparation


# -----------------------------------------------------------------------------
# 3. NumPy reference: layers

# --- 3a. convolution and fully connected

# --- 3b. the other layers


# -----------------------------------------------------------------------------
# 4. NumPy reference: the whole model
#
# The network of train_alexnet.cu written as ONE network, the way PyTorch would hold it:
# conv2, conv4, conv5 are grouped convolutions (groups=2), LRN runs on each tower's
# channels separately, and the exchanges between the towers are implicit. Because the
# .cu computes the same function with two explicit towers, peer copies and
# concatenations, comparing the two checks the tower plumbing as well as the layers.
# Everything is computed in the dtype of the inputs (tests use float64).

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
CONV_GROUPS = (1, 2, 1, 2, 2)   # conv1 reads the whole image, conv3 both towers
CONV_POOLED = (True, True, False, False, True)
CONV_LRN = (True, True, False, False, False)
BIAS_INIT = (0, 1, 0, 1, 1, 1, 1, 0)  # the paper: 1 where the ReLUs should start active

# The presets of train_alexnet.cu (section 11), sizes for the whole network.
PRESETS = {
    "alexnet": dict(preset=0, crop=224, conv_out=(96, 256, 384, 384, 256), conv_kernel=(11, 5, 3, 3, 3),
                    conv_stride=(4, 1, 1, 1, 1), conv_pad=(0, 2, 1, 1, 1), fc_out=(4096, 4096),
                    pool_size=3, pool_stride=2, lrn_size=5, lrn_alpha=1e-4, lrn_beta=0.75, lrn_k=2.0,
                    init_std=0.01),
    "small": dict(preset=1, crop=28, conv_out=(16, 32, 48, 48, 32), conv_kernel=(5, 5, 3, 3, 3),
                  conv_stride=(1, 1, 1, 1, 1), conv_pad=(2, 2, 1, 1, 1), fc_out=(128, 128),
                  pool_size=3, pool_stride=2, lrn_size=5, lrn_alpha=1e-4, lrn_beta=0.75, lrn_k=2.0,
                  init_std=0.01),
}
PRESET_NAMES = tuple(PRESETS)


def architecture(preset, classes):
    """The architecture dict of a preset with `classes` outputs (as in a checkpoint header)."""
    if preset not in PRESETS:
        raise AlexNetError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    return dict(PRESETS[preset], classes=classes)


def parameter_shapes(arch):
    """{name: shape} in checkpoint order, PyTorch layouts ([out, in/groups, kh, kw], [out, in])."""
    shapes, channels, size = {}, 3, arch["crop"]
    for i in range(5):
        k, K = arch["conv_kernel"][i], arch["conv_out"][i]
        shapes[f"{LAYERS[i]}.weight"] = (K, channels // CONV_GROUPS[i], k, k)
        shapes[f"{LAYERS[i]}.bias"] = (K,)
        size = conv_output_size(size, k, arch["conv_stride"][i], arch["conv_pad"][i])
        if CONV_POOLED[i]:
            size = pool_output_size(size, arch["pool_size"], arch["pool_stride"])
        channels = K
    features = channels * size * size
    for name, out in zip(LAYERS[5:], (*arch["fc_out"], arch["classes"])):
        shapes[f"{name}.weight"] = (out, features)
        shapes[f"{name}.bias"] = (out,)
        features = out
    return shapes


def init_params(arch, rng):
    """The paper's initialisation (float32): weights ~ N(0, init_std^2), biases 0 or 1."""
    params = {}
    for name, shape in parameter_shapes(arch).items():
        layer = LAYERS.index(name.split(".")[0])
        params[name] = (rng.normal(0, arch["init_std"], shape) if name.endswith("weight")
                        else np.full(shape, BIAS_INIT[layer])).astype(np.float32)
    return params


def _dropout_towers(x, p, seed, fc, step, train, backward=False):
    """Dropout of fc6 (fc=0) or fc7 (fc=1) outputs [N][F]: tower t's half [N][F/2] is one
    tensor of the shared Philox rule with layer number 2*fc + t (the .cu's dropout_layer)."""
    halves = np.split(x, 2, axis=1)
    out = [dropout_backward(np.ascontiguousarray(h), p, seed, 2 * fc + t, step) if backward else
           dropout_forward(np.ascontiguousarray(h), p, seed, 2 * fc + t, step, train)
           for t, h in enumerate(halves)]
    return np.concatenate(out, axis=1)


def _lrn_towers(x, arch):
    """LRN on each tower's channels: returns (out, scales of both towers)."""
    results = [lrn_forward(h, arch["lrn_size"], arch["lrn_alpha"], arch["lrn_beta"], arch["lrn_k"])
               for h in np.split(x, 2, axis=1)]
    return np.concatenate([r[0] for r in results], axis=1), [r[1] for r in results]


def model_forward(arch, params, x, labels, dropout=0.5, seed=0, step=0, train=True):
    """Forward pass on crops x [N][3][crop][crop]: (per-image losses, top-1/top-5 correct
    counts, cache for model_backward)."""
    cache = {"x": x}
    a = x
    for i in range(5):
        name = LAYERS[i]
        cache[f"{name}.in"] = a
        a = conv_forward(a, params[f"{name}.weight"], params[f"{name}.bias"], arch["conv_stride"][i],
                         arch["conv_pad"][i], CONV_GROUPS[i], relu=True)
        cache[f"{name}.out"] = a
        if CONV_LRN[i]:
            a, cache[f"{name}.scale"] = _lrn_towers(a, arch)
            cache[f"{name}.lrn"] = a
        if CONV_POOLED[i]:
            a = maxpool_forward(a, arch["pool_size"], arch["pool_stride"])
    a = a.reshape(len(a), -1)  # (channel, y, x) of pool5, tower 0's channels first
    for f, name in enumerate(LAYERS[5:]):
        cache[f"{name}.in"] = a
        a = fc_forward(a, params[f"{name}.weight"], params[f"{name}.bias"], relu=f < 2)
        if f < 2:
            cache[f"{name}.out"] = a
            a = _dropout_towers(a, dropout, seed, f, step, train)
    losses, dlogits, correct = softmax_cross_entropy(a, labels)
    cache["dlogits"] = dlogits
    return losses, correct, cache


def model_backward(arch, params, cache, dropout=0.5, seed=0, step=0):
    """Gradients of the batch-mean loss of the last model_forward: {name: array}."""
    grads = {}
    d = cache["dlogits"]
    for f in (2, 1, 0):
        name = LAYERS[5 + f]
        if f < 2:
            d = _dropout_towers(d, dropout, seed, f, step, True, backward=True)
            d = relu_backward(d, cache[f"{name}.out"])
        grads[f"{name}.weight"], grads[f"{name}.bias"] = fc_backward_weights(d, cache[f"{name}.in"])
        d = fc_backward_data(d, params[f"{name}.weight"])
    for i in (4, 3, 2, 1, 0):
        name = LAYERS[i]
        out = cache[f"{name}.out"]
        if CONV_POOLED[i]:
            P = pool_output_size(out.shape[2], arch["pool_size"], arch["pool_stride"])
            d = maxpool_backward(d.reshape(len(d), out.shape[1], P, P),
                                 cache[f"{name}.lrn"] if CONV_LRN[i] else out, arch["pool_size"],
                                 arch["pool_stride"])
        if CONV_LRN[i]:
            d = np.concatenate([
                lrn_backward(dh, xh, oh, sh, arch["lrn_size"], arch["lrn_alpha"], arch["lrn_beta"],
                             arch["lrn_k"])
                for dh, xh, oh, sh in zip(np.split(d, 2, axis=1), np.split(out, 2, axis=1),
                                          np.split(cache[f"{name}.lrn"], 2, axis=1), cache[f"{name}.scale"])],
                axis=1)
        d = relu_backward(d, out)
        inp, k = cache[f"{name}.in"], arch["conv_kernel"][i]
        grads[f"{name}.weight"], grads[f"{name}.bias"] = conv_backward_weights(
            d, inp, (k, k), arch["conv_stride"][i], arch["conv_pad"][i], CONV_GROUPS[i])
        if i > 0:
            d = conv_backward_data(d, params[f"{name}.weight"], inp.shape[2:], arch["conv_stride"][i],
                                   arch["conv_pad"][i], CONV_GROUPS[i])
    return grads


def model_step(arch, params, momentum, x, labels, lr, momentum_coef, weight_decay, dropout=0.5,
               seed=0, step=0):
    """One SGD step as train_alexnet does it (no weight decay on biases):
    (mean loss, new params, new momentum)."""
    losses, _, cache = model_forward(arch, params, x, labels, dropout, seed, step, train=True)
    grads = model_backward(arch, params, cache, dropout, seed, step)
    new_params, new_momentum = {}, {}
    for name in params:
        wd = weight_decay if name.endswith("weight") else 0.0
        new_params[name], new_momentum[name] = sgd_update(params[name], momentum[name], grads[name], lr,
                                                          momentum_coef, wd)
    return losses.mean(), new_params, new_momentum


def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def training_batch_indices(count, batch, seed, step):
    """The dataset indices of training step `step`, in batch order, as the .cu's data loader
    picks them (section 12): a Fisher-Yates shuffle per epoch from a splitmix64 stream."""
    per_epoch = count // batch
    epoch, position = divmod(step, per_epoch)
    state = _splitmix64(_splitmix64(_splitmix64(seed) ^ 2) ^ epoch)  # RNG_SHUFFLE = 2
    order = list(range(count))
    for j in range(count - 1, 0, -1):
        u = (_splitmix64(state) >> 11) * 2.0 ** -53
        state = (state + 1) & 0xFFFFFFFFFFFFFFFF
        i = int(u * (j + 1))
        order[j], order[i] = order[i], order[j]
    return order[position * batch:(position + 1) * batch]


# -----------------------------------------------------------------------------
# Checkpoints
#
# Little-endian: int32 header[256], float32 parameters (PARAMETER order, PyTorch layouts,
# output rows [0, K/2) from tower 0), float32 momentum in the same order. The header
# fields are listed below; "f32" fields hold float32 bits, "i64" fields two int32 words
# (low first). The README's "Checkpoint format" documents the same table.

CHECKPOINT_MAGIC = 20121003
CHECKPOINT_VERSION = 1
_HEADER = (  # (name, index, kind, count)
    ("magic", 0, "i32", 1), ("version", 1, "i32", 1), ("preset", 2, "i32", 1), ("crop", 3, "i32", 1),
    ("classes", 4, "i32", 1), ("conv_out", 5, "i32", 5), ("conv_kernel", 10, "i32", 5),
    ("conv_stride", 15, "i32", 5), ("conv_pad", 20, "i32", 5), ("fc_out", 25, "i32", 2),
    ("pool_size", 27, "i32", 1), ("pool_stride", 28, "i32", 1), ("lrn_size", 29, "i32", 1),
    ("lrn_alpha", 30, "f32", 1), ("lrn_beta", 31, "f32", 1), ("lrn_k", 32, "f32", 1),
    ("init_std", 33, "f32", 1), ("parameters", 34, "i64", 1),
    ("step", 40, "i64", 1), ("seed", 42, "i64", 1), ("batch", 44, "i32", 1), ("lr", 45, "f32", 1),
    ("momentum", 46, "f32", 1), ("weight_decay", 47, "f32", 1), ("dropout", 48, "f32", 1),
    ("augment", 49, "i32", 1), ("eval_every", 50, "i32", 1), ("patience", 51, "i32", 1),
    ("max_drops", 52, "i32", 1), ("plateau_drops", 53, "i32", 1), ("bad_evals", 54, "i32", 1),
    ("best_error", 55, "f32", 1), ("loss", 56, "f32", 1), ("epochs", 57, "i32", 1), ("steps", 58, "i32", 1),
    ("lr_steps", 60, "list", 8),  # count at index 59
)
# The training state of a fresh run: the executables' defaults.
_DEFAULT_STATE = dict(step=0, seed=1, batch=128, lr=0.01, momentum=0.9, weight_decay=0.0005, dropout=0.5,
                      augment=1, eval_every=0, patience=3, max_drops=3, plateau_drops=0, bad_evals=0,
                      best_error=float("inf"), loss=float("nan"), epochs=90, steps=0, lr_steps=())


def _encode_header(fields):
    h = np.zeros(256, dtype="<i4")
    for name, at, kind, count in _HEADER:
        value = fields[name]
        if kind == "f32":
            h[at] = np.array([value], dtype="<f4").view("<i4")[0]
        elif kind == "i64":
            h[at:at + 2] = np.array([value], dtype="<i8").view("<i4")
        elif kind == "list":
            h[at - 1] = len(value)
            h[at:at + len(value)] = value
        else:
            h[at:at + count] = value
    return h


def _decode_header(h):
    fields = {}
    for name, at, kind, count in _HEADER:
        if kind == "f32":
            fields[name] = float(h[at:at + 1].view("<f4")[0])
        elif kind == "i64":
            fields[name] = int(h[at:at + 2].view("<i8")[0])
        elif kind == "list":
            fields[name] = tuple(int(v) for v in h[at:at + min(max(h[at - 1], 0), count)])
        else:
            fields[name] = int(h[at]) if count == 1 else tuple(int(v) for v in h[at:at + count])
    fields["arch"] = PRESET_NAMES[fields["preset"]] if 0 <= fields["preset"] < len(PRESET_NAMES) else None
    return fields


def load_checkpoint(path):
    """(header fields, {name: float32 parameter}, {name: float32 momentum}) of a checkpoint
    written by train_alexnet or save_checkpoint. The header dict also works as the `arch`
    of model_forward."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise AlexNetError(f"cannot open {path}: {e.strerror}")
    if size < 1024:
        raise AlexNetError(f"{path} is truncated: shorter than its 1024-byte header")
    data = np.memmap(path, dtype="<i4", mode="r")
    header = _decode_header(np.array(data[:256]))
    if header["magic"] != CHECKPOINT_MAGIC:
        raise AlexNetError(f"{path} is not an AlexNet checkpoint (magic {header['magic']}, "
                           f"expected {CHECKPOINT_MAGIC})")
    if header["version"] != CHECKPOINT_VERSION:
        raise AlexNetError(f"{path}: checkpoint version {header['version']}, expected {CHECKPOINT_VERSION}")
    if header["arch"] is None:
        raise AlexNetError(f"{path}: unknown preset number {header['preset']}")
    shapes = parameter_shapes(header)
    total = sum(int(np.prod(s)) for s in shapes.values())
    if header["parameters"] != total or size != 1024 + 8 * total:
        raise AlexNetError(f"{path} is truncated or damaged: {size} bytes, {header['parameters']} parameters "
                           f"in the header; its architecture needs {total} ({1024 + 8 * total} bytes)")
    values = np.array(data[256:]).view("<f4")
    params, momentum, pos = {}, {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        params[name] = values[pos:pos + n].reshape(shape).astype(np.float32)
        momentum[name] = values[total + pos:total + pos + n].reshape(shape).astype(np.float32)
        pos += n
    return header, params, momentum


def save_checkpoint(path, header, params, momentum=None):
    """Write a checkpoint the executables resume from. header: an architecture (see
    architecture()) or a loaded header, plus any training-state fields (the rest take the
    executables' defaults, i.e. step 0); momentum defaults to zeros. Written atomically."""
    fields = dict(_DEFAULT_STATE, **header, magic=CHECKPOINT_MAGIC, version=CHECKPOINT_VERSION)
    shapes = parameter_shapes(fields)
    fields["parameters"] = sum(int(np.prod(s)) for s in shapes.values())
    if set(params) != set(shapes) or (momentum is not None and set(momentum) != set(shapes)):
        raise AlexNetError(f"save_checkpoint: expected the parameters {', '.join(shapes)}")
    chunks = [_encode_header(fields).tobytes()]
    for source in (params, momentum):
        for name, shape in shapes.items():
            value = np.zeros(shape, "<f4") if source is None else np.asarray(source[name], "<f4")
            if value.shape != shape:
                raise AlexNetError(f"save_checkpoint: {name} has shape {value.shape}, expected {shape}")
            chunks.append(np.ascontiguousarray(value).tobytes())
    temp = f"{path}.tmp"
    with open(temp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def _gpu_usable():
    """True when nvidia-smi lists at least one GPU."""
    import shutil
    import subprocess
    if not shutil.which("nvidia-smi"):
        return False
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and "GPU" in result.stdout


def _train_arguments(parser):
    """Every argument after `train` goes to the executable unchanged (its flags are not
    argparse's, so the usual parsing is replaced by taking them all)."""
    def take_all(args=None, namespace=None):
        import argparse
        namespace = namespace if namespace is not None else argparse.Namespace()
        namespace.flags = list(args or [])
        return namespace, []
    parser.parse_known_args = take_all


def _train(args):
    """Run ./train_alexnet when a GPU is usable, else ./train_alexnet_cpu, with the flags."""
    import subprocess
    name = "train_alexnet" if _gpu_usable() and os.path.exists(os.path.join(ROOT, "train_alexnet")) \
        else "train_alexnet_cpu"
    path = os.path.join(ROOT, name)
    if not os.path.exists(path):
        raise AlexNetError(f"{path} not found: run `make` first")
    return subprocess.call([path] + args.flags)


COMMANDS["train"] = (_train_arguments, _train)


# -----------------------------------------------------------------------------
# 5. The shared library (cffi)
#
# The library is libalexnet_cpu.so (the CPU build) unless ALEXNET_LIB names another,
# e.g. libalexnet.so for the GPU build. Each binding section appends its C
# declarations to _CDEFS; library() loads the library once with all of them.

_CDEFS = ["const char* alexnet_last_error(void);"]
_library = None


def library():
    """The loaded shared library: (ffi, lib)."""
    global _library
    if _library is None:
        import cffi
        path = os.environ.get("ALEXNET_LIB") or os.path.join(ROOT, "libalexnet_cpu.so")
        if not os.path.exists(path):
            raise AlexNetError(f"{path} not found: run `make` first")
        ffi = cffi.FFI()
        ffi.cdef("\n".join(_CDEFS))
        _library = (ffi, ffi.dlopen(os.path.abspath(path)))
    return _library


def _check(status):
    """Raise AlexNetError with the library's message when a C API call failed."""
    if status != 0:
        ffi, lib = library()
        raise AlexNetError(ffi.string(lib.alexnet_last_error()).decode())


def _ptr(array, ctype="float"):
    """A C pointer to a C-contiguous NumPy array (None stays NULL)."""
    ffi, _ = library()
    if array is None:
        return ffi.NULL
    assert array.flags.c_contiguous
    return ffi.cast(ctype + " *", ffi.from_buffer(array))

# --- 5a. bindings: convolution and fully connected

# --- 5b. bindings: the other layers


# -----------------------------------------------------------------------------
# 6. Command line

def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(prog="alexnet.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args) or 0
    except AlexNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
