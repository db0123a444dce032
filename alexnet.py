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
#
# Layouts as in train_alexnet.cu: activations [N][C][H][W], conv weight
# [K][C/groups][R][S], fc input [N][in], fc weight [out][in]. Output pixel (oy, ox) of a
# convolution reads input rows oy*stride - pad + r (likewise columns); anything outside
# the input reads 0, which covers the padding and conv1's overhang on the bottom/right.
# The functions compute in the dtype of their inputs (float32 or float64).


def conv_output_size(size, kernel, stride=1, pad=0):
    """Output size as cuda-convnet computes it: 1 + ceil((2*pad + size - kernel) / stride).

    conv1 on a 224 crop: 1 + ceil(213 / 4) = 55 (PyTorch's floor rule would give 54).
    """
    return 1 + -(-(2 * pad + size - kernel) // stride)


def _unrolled_input(inp, kernel_hw, stride, pad, out_hw):
    """View [N][C][OH][OW][R][S] of the zero-extended input: element (oy, ox, r, s) is
    input pixel (oy*stride - pad + r, ox*stride - pad + s)."""
    (R, S), (OH, OW) = kernel_hw, out_hw
    N, C, H, W = inp.shape
    rows, cols = (OH - 1) * stride + R, (OW - 1) * stride + S  # the extent the windows read
    padded = np.zeros((N, C, max(rows, H + pad), max(cols, W + pad)), inp.dtype)
    padded[:, :, pad:pad + H, pad:pad + W] = inp
    windows = np.lib.stride_tricks.sliding_window_view(padded[:, :, :rows, :cols], (R, S), (2, 3))
    return windows[:, :, ::stride, ::stride]


def conv_forward(inp, weight, bias, stride=1, pad=0, groups=1, out_hw=None, relu=False):
    """out[n][k] = [relu](bias[k] + sum over c in k's group, r, s of w[k][c][r][s] * window)."""
    N, C, H, W = inp.shape
    K, Cg, R, S = weight.shape
    OH, OW = out_hw or (conv_output_size(H, R, stride, pad), conv_output_size(W, S, stride, pad))
    cols = _unrolled_input(inp, (R, S), stride, pad, (OH, OW))  # [N][C][OH][OW][R][S]
    Kg = K // groups
    out = np.concatenate([
        np.einsum("ncyxrs,kcrs->nkyx", cols[:, g * Cg:(g + 1) * Cg], weight[g * Kg:(g + 1) * Kg],
                  optimize=True)
        for g in range(groups)], axis=1) + bias[None, :, None, None]
    return np.maximum(out, 0) if relu else out


def conv_backward_data(dout, weight, in_hw, stride=1, pad=0, groups=1):
    """dinp: every tap (r, s) of every window adds dout * w back onto the pixel it read."""
    N, K, OH, OW = dout.shape
    _, Cg, R, S = weight.shape
    (H, W), Kg = in_hw, K // groups
    rows, cols = (OH - 1) * stride + R, (OW - 1) * stride + S
    dpadded = np.zeros((N, Cg * groups, max(rows, H + pad), max(cols, W + pad)), dout.dtype)
    for g in range(groups):
        dcols = np.einsum("nkyx,kcrs->ncrsyx", dout[:, g * Kg:(g + 1) * Kg],
                          weight[g * Kg:(g + 1) * Kg], optimize=True)
        for r in range(R):
            for s in range(S):
                dpadded[:, g * Cg:(g + 1) * Cg, r:r + stride * OH:stride,
                        s:s + stride * OW:stride] += dcols[:, :, r, s]
    return dpadded[:, :, pad:pad + H, pad:pad + W]


def conv_backward_weights(dout, inp, kernel_hw, stride=1, pad=0, groups=1):
    """(dweight, dbias): dw[k][c][r][s] = sum over images and windows of dout * window."""
    N, K, OH, OW = dout.shape
    C = inp.shape[1]
    Cg, Kg = C // groups, K // groups
    cols = _unrolled_input(inp, kernel_hw, stride, pad, (OH, OW))
    dweight = np.concatenate([
        np.einsum("nkyx,ncyxrs->kcrs", dout[:, g * Kg:(g + 1) * Kg], cols[:, g * Cg:(g + 1) * Cg],
                  optimize=True)
        for g in range(groups)])
    return dweight, dout.sum(axis=(0, 2, 3))


def fc_forward(inp, weight, bias, relu=False):
    """out[n][o] = [relu](bias[o] + sum_i inp[n][i] * w[o][i])."""
    out = inp @ weight.T + bias
    return np.maximum(out, 0) if relu else out


def fc_backward_data(dout, weight):
    """dinp[n][i] = sum_o dout[n][o] * w[o][i]."""
    return dout @ weight


def fc_backward_weights(dout, inp):
    """(dweight, dbias): dw[o][i] = sum_n dout[n][o] * inp[n][i], db[o] = sum_n dout[n][o]."""
    return dout.T @ inp, dout.sum(axis=0)

# --- 3b. the other layers


# -----------------------------------------------------------------------------
# 4. NumPy reference: the whole model


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
# Same names and arguments as the NumPy twins in section 3a, with cuda_ in front.
# Inputs are converted to contiguous float32; array shapes are checked here, the
# sizes passed on are checked again by the library.

_CONV_DIMS = ("int N, int C, int H, int W, int K, int R, int S, int stride, int pad, int groups, "
              "int OH, int OW")
_CDEFS += [
    "int alexnet_conv_forward(float* out, const float* inp, const float* weight, "
    f"const float* bias, {_CONV_DIMS}, int relu);",
    "int alexnet_conv_backward_data(float* dinp, const float* dout, const float* weight, "
    f"{_CONV_DIMS});",
    "int alexnet_conv_backward_weights(float* dweight, float* dbias, const float* dout, "
    f"const float* inp, {_CONV_DIMS});",
    "int alexnet_fc_forward(float* out, const float* inp, const float* weight, const float* bias, "
    "int N, int in, int out_features, int relu);",
    "int alexnet_fc_backward_data(float* dinp, const float* dout, const float* weight, int N, "
    "int in, int out_features);",
    "int alexnet_fc_backward_weights(float* dweight, float* dbias, const float* dout, "
    "const float* inp, int N, int in, int out_features);",
]


def _f32(array, shape, what):
    """array as contiguous float32, after checking its shape (-1 matches any size)."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim != len(shape) or any(w not in (-1, g) for w, g in zip(shape, array.shape)):
        raise AlexNetError(f"{what} has shape {array.shape}, expected {tuple(shape)} (-1: any)")
    return array


def _conv_dims(inp_shape, weight_shape, stride, pad, groups, out_hw):
    """The 12 sizes of the C API from the input and weight shapes and the options."""
    N, C, H, W = inp_shape
    K, Cg, R, S = weight_shape
    if groups < 1 or Cg * groups != C:
        raise AlexNetError(f"weight {tuple(weight_shape)} with groups={groups} "
                           f"does not fit {C} input channels")
    OH, OW = out_hw or (conv_output_size(H, R, stride, pad), conv_output_size(W, S, stride, pad))
    return N, C, H, W, K, R, S, stride, pad, groups, OH, OW


def cuda_conv_forward(inp, weight, bias, stride=1, pad=0, groups=1, out_hw=None, relu=False):
    _, lib = library()
    inp, weight = _f32(inp, (-1,) * 4, "input"), _f32(weight, (-1,) * 4, "weight")
    bias = _f32(bias, (weight.shape[0],), "bias")
    dims = _conv_dims(inp.shape, weight.shape, stride, pad, groups, out_hw)
    N, _, _, _, K, _, _, _, _, _, OH, OW = dims
    out = np.empty((N, K, OH, OW), np.float32)
    _check(lib.alexnet_conv_forward(_ptr(out), _ptr(inp), _ptr(weight), _ptr(bias), *dims,
                                    int(relu)))
    return out


def cuda_conv_backward_data(dout, weight, in_hw, stride=1, pad=0, groups=1):
    _, lib = library()
    dout = _f32(dout, (-1,) * 4, "dout")
    N, K, OH, OW = dout.shape
    weight = _f32(weight, (K, -1, -1, -1), "weight")
    dims = _conv_dims((N, weight.shape[1] * groups, *in_hw), weight.shape, stride, pad, groups,
                      (OH, OW))
    dinp = np.empty(dims[:4], np.float32)
    _check(lib.alexnet_conv_backward_data(_ptr(dinp), _ptr(dout), _ptr(weight), *dims))
    return dinp


def cuda_conv_backward_weights(dout, inp, kernel_hw, stride=1, pad=0, groups=1):
    _, lib = library()
    dout = _f32(dout, (-1,) * 4, "dout")
    N, K, OH, OW = dout.shape
    inp = _f32(inp, (N, -1, -1, -1), "input")
    weight_shape = (K, inp.shape[1] // max(groups, 1), *kernel_hw)
    dims = _conv_dims(inp.shape, weight_shape, stride, pad, groups, (OH, OW))
    dweight, dbias = np.empty(weight_shape, np.float32), np.empty(K, np.float32)
    _check(lib.alexnet_conv_backward_weights(_ptr(dweight), _ptr(dbias), _ptr(dout), _ptr(inp),
                                             *dims))
    return dweight, dbias


def cuda_fc_forward(inp, weight, bias, relu=False):
    _, lib = library()
    inp, weight = _f32(inp, (-1, -1), "input"), _f32(weight, (-1, inp.shape[1]), "weight")
    bias = _f32(bias, (weight.shape[0],), "bias")
    out = np.empty((inp.shape[0], weight.shape[0]), np.float32)
    _check(lib.alexnet_fc_forward(_ptr(out), _ptr(inp), _ptr(weight), _ptr(bias), *inp.shape,
                                  weight.shape[0], int(relu)))
    return out


def cuda_fc_backward_data(dout, weight):
    _, lib = library()
    dout, weight = _f32(dout, (-1, -1), "dout"), _f32(weight, (-1, -1), "weight")
    _f32(dout, (-1, weight.shape[0]), "dout")
    dinp = np.empty((dout.shape[0], weight.shape[1]), np.float32)
    _check(lib.alexnet_fc_backward_data(_ptr(dinp), _ptr(dout), _ptr(weight), *dinp.shape,
                                        weight.shape[0]))
    return dinp


def cuda_fc_backward_weights(dout, inp):
    _, lib = library()
    dout, inp = _f32(dout, (-1, -1), "dout"), _f32(inp, (-1, -1), "input")
    _f32(inp, (dout.shape[0], -1), "input")
    dweight = np.empty((dout.shape[1], inp.shape[1]), np.float32)
    dbias = np.empty(dout.shape[1], np.float32)
    _check(lib.alexnet_fc_backward_weights(_ptr(dweight), _ptr(dbias), _ptr(dout), _ptr(inp),
                                           *inp.shape, dout.shape[1]))
    return dweight, dbias

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
