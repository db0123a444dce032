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
#
# Twins of train_alexnet.cu sections 1, 2, 4, 5, 6, 8, 9, 10: same names, same rules
# (tie-breaking, random bits), written for clarity; float32 or float64 in, same out.

_U32 = np.uint64(0xFFFFFFFF)


def philox4x32(counter, key):
    """Philox4x32-10 (Random123): uint32 counters [..., 4] and keys [..., 2] -> uint32 [..., 4].

    Vectorised over the leading axes; 64-bit products of 32-bit words are exact in uint64."""
    c = np.asarray(counter, dtype=np.uint64)
    k = np.asarray(key, dtype=np.uint64)
    c0, c1, c2, c3 = c[..., 0], c[..., 1], c[..., 2], c[..., 3]
    k0, k1 = k[..., 0], k[..., 1]
    for round in range(10):
        if round > 0:
            k0 = (k0 + np.uint64(0x9E3779B9)) & _U32
            k1 = (k1 + np.uint64(0xBB67AE85)) & _U32
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _U32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _U32
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def philox_uniform(words):
    """uint32 words -> float32 in [0, 1): (x >> 8) * 2^-24, exact."""
    return (np.asarray(words, dtype=np.uint32) >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)


def dropout_mask(n, p, seed, layer, step):
    """Keep-mask (bool [n]) of the n elements of a dropout layer, the rule of the .cu's section 8:
    element i is kept iff philox_uniform(word) >= p, word = philox4x32(
    (i // 4, layer, step mod 2^32, step // 2^32), (seed mod 2^32, seed // 2^32))[i % 4]."""
    group = np.arange((n + 3) // 4, dtype=np.uint64)
    counter = np.stack([group, np.full_like(group, layer), np.full_like(group, step & 0xFFFFFFFF),
                        np.full_like(group, step >> 32)], axis=-1)
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64)
    words = philox4x32(counter, key).reshape(-1)[:n]
    return philox_uniform(words) >= np.float32(p)


def dropout_forward(x, p, seed, layer, step, train):
    """Paper dropout: train zeroes units with probability p (survivors unscaled); test scales by 1-p."""
    if not train:
        return x * x.dtype.type(1 - np.float32(p))
    return np.where(dropout_mask(x.size, p, seed, layer, step).reshape(x.shape), x, 0).astype(x.dtype)


def dropout_backward(dout, p, seed, layer, step):
    """The forward's mask, regenerated, applied to the gradient."""
    return dropout_forward(dout, p, seed, layer, step, train=True)


def augment_images(images, mean, offsets, flips, alphas, eigval, eigvec, crop):
    """uint8 images [N][H][W][3] -> float32 crops [N][3][crop][crop]: crop at offsets[n] = (y, x),
    mirror where flips[n], subtract the mean image [H][W][3] at the same place, and add the PCA
    lighting sum_i alphas[n][i] * eigval[i] * eigvec[:, i] to every pixel."""
    N = images.shape[0]
    out = np.empty((N, 3, crop, crop), dtype=np.float32)
    light = (alphas.astype(np.float32) * eigval.astype(np.float32)) @ eigvec.astype(np.float32).T  # [N][3]
    for n in range(N):
        oy, ox = offsets[n]
        window = np.s_[oy:oy + crop, ox:ox + crop]
        patch = images[n][window].astype(np.float32) - mean[window].astype(np.float32)
        if flips[n]:
            patch = patch[:, ::-1]
        out[n] = patch.transpose(2, 0, 1) + light[n][:, None, None]
    return out


def relu_forward(x):
    return np.where(x > 0, x, 0).astype(x.dtype)


def relu_backward(dout, out):
    return np.where(out > 0, dout, 0).astype(dout.dtype)


def _lrn_window_sum(v, lower, upper):
    """s[:, c] = sum of v[:, j] over j in [c - lower, c + upper] clipped to the channels (axis 1)."""
    C = v.shape[1]
    s = np.zeros_like(v)
    for c in range(C):
        s[:, c] = v[:, max(0, c - lower):min(C, c + upper + 1)].sum(axis=1)
    return s


def lrn_forward(x, size, alpha, beta, k):
    """Cross-channel LRN of x [N][C][H][W] (C = one tower's channels):
    out = x / scale^beta, scale = k + alpha/size * sum over the window [c - size//2, c + (size-1)//2]
    (clipped at 0 and C-1) of x^2. Returns (out, scale)."""
    scale = k + alpha / size * _lrn_window_sum(x * x, size // 2, (size - 1) // 2)
    return (x * scale ** -beta).astype(x.dtype), scale.astype(x.dtype)


def lrn_backward(dout, x, out, scale, size, alpha, beta, k):
    """dx[i] = dout[i] * scale[i]^-beta - 2*alpha*beta/size * x[i] * sum_{j: i in window(j)}
    dout[j] * out[j] / scale[j]; i is in window(j) iff j is in [i - (size-1)//2, i + size//2]."""
    r = _lrn_window_sum(dout * out / scale, (size - 1) // 2, size // 2)
    return (dout * scale ** -beta - 2 * alpha * beta / size * x * r).astype(x.dtype)


def pool_output_size(H, size, stride):
    """Windows that fit entirely: floor((H - size) / stride) + 1 (55 -> 27 -> 13 -> 6 in AlexNet)."""
    return (H - size) // stride + 1


def _pool_argmax(x, size, stride, OH, OW):
    """Winner of every window as flat indices into the H*W plane, [N][C][OH][OW]; windows
    overhanging the bottom/right are clipped; ties go to the first maximum in row-major order."""
    N, C, H, W = x.shape
    winners = np.empty((N, C, OH, OW), dtype=np.int64)
    for oy in range(OH):
        for ox in range(OW):
            y0, x0 = oy * stride, ox * stride
            y1, x1 = min(y0 + size, H), min(x0 + size, W)
            window = x[:, :, y0:y1, x0:x1].reshape(N, C, -1)
            first = np.argmax(window, axis=2)  # argmax returns the first maximum
            winners[:, :, oy, ox] = (y0 + first // (x1 - x0)) * W + x0 + first % (x1 - x0)
    return winners


def maxpool_forward(x, size, stride, OH=None, OW=None):
    """Max over size x size windows with the given stride, x [N][C][H][W] -> [N][C][OH][OW]."""
    N, C, H, W = x.shape
    OH = OH or pool_output_size(H, size, stride)
    OW = OW or pool_output_size(W, size, stride)
    winners = _pool_argmax(x, size, stride, OH, OW)
    return np.take_along_axis(x.reshape(N, C, H * W), winners.reshape(N, C, -1), axis=2).reshape(N, C, OH, OW)


def maxpool_backward(dout, x, size, stride):
    """Each window's gradient goes to its winner (first maximum); sums where windows overlap,
    added in (oy, ox) order like the kernel."""
    N, C, H, W = x.shape
    OH, OW = dout.shape[2:]
    winners = _pool_argmax(x, size, stride, OH, OW)
    dx = np.zeros((N * C, H * W), dtype=dout.dtype)
    rows = np.arange(N * C)
    for oy in range(OH):
        for ox in range(OW):
            dx[rows, winners[:, :, oy, ox].reshape(-1)] += dout[:, :, oy, ox].reshape(-1)
    return dx.reshape(x.shape)


def softmax_forward(logits):
    """Row-wise softmax of logits [N][K], shifted by the row max for stability."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def topk_rank(logits, labels):
    """Position of each label in a stable descending sort of its row: the number of logits
    above it plus the number of equal logits at lower class indices."""
    target = logits[np.arange(len(labels)), labels][:, None]
    lower = np.arange(logits.shape[1])[None, :] < labels[:, None]
    return ((logits > target) | ((logits == target) & lower)).sum(axis=1)


def softmax_cross_entropy(logits, labels):
    """Per-row loss log(sum exp(x - m)) + m - x[label], gradient of the batch-mean loss
    (softmax - onehot) / N, and the top-1 / top-5 correct counts [2]."""
    N, K = logits.shape
    m = logits.max(axis=1, keepdims=True)
    e = np.exp(logits - m)
    s = e.sum(axis=1, keepdims=True)
    rows = np.arange(N)
    losses = (np.log(s) + m)[:, 0] - logits[rows, labels]
    dlogits = e / s
    dlogits[rows, labels] -= 1
    rank = topk_rank(logits, labels)
    correct = np.array([(rank < 1).sum(), (rank < 5).sum()], dtype=np.int32)
    return losses, dlogits / N, correct


def sgd_update(w, v, g, lr, momentum, weight_decay):
    """The paper's rule: v <- momentum*v - weight_decay*lr*w - lr*g ; w <- w + v. Returns (w, v)."""
    t = w.dtype.type
    v = t(momentum) * v - t(weight_decay) * t(lr) * w - t(lr) * g
    return w + v, v


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

_CDEFS.append("""
int alexnet_philox4x32(uint32_t* out, const uint32_t* counter, const uint32_t* key);
int alexnet_augment_images(float* out, const uint8_t* images, const float* mean, const int* offsets,
                           const uint8_t* flips, const float* alphas, const float* eigval,
                           const float* eigvec, int N, int H, int W, int crop);
int alexnet_relu_forward(float* out, const float* inp, long n);
int alexnet_relu_backward(float* dinp, const float* dout, const float* out, long n);
int alexnet_lrn_forward(float* out, float* scale, const float* inp, int N, int C, int H, int W,
                        int size, float alpha, float beta, float k);
int alexnet_lrn_backward(float* dinp, const float* dout, const float* inp, const float* out,
                         const float* scale, int N, int C, int H, int W, int size, float alpha,
                         float beta, float k);
int alexnet_maxpool_forward(float* out, const float* inp, int N, int C, int H, int W, int size,
                            int stride, int OH, int OW);
int alexnet_maxpool_backward(float* dinp, const float* dout, const float* inp, int N, int C, int H,
                             int W, int size, int stride, int OH, int OW);
int alexnet_dropout_forward(float* out, const float* inp, long n, float p, uint64_t seed,
                            uint32_t layer, uint64_t step, int train);
int alexnet_dropout_backward(float* dinp, const float* dout, long n, float p, uint64_t seed,
                             uint32_t layer, uint64_t step);
int alexnet_softmax_cross_entropy(float* losses, float* dlogits, int* correct, const float* logits,
                                  const int* labels, int N, int K);
int alexnet_softmax_forward(float* probs, const float* logits, int N, int K);
int alexnet_sgd_update(float* w, float* v, const float* g, long n, float lr, float momentum,
                       float weight_decay);
""")


def _f32(x):
    return np.ascontiguousarray(x, dtype=np.float32)


def _require_shape(op, name, array, shape):
    """The C API sees bare pointers, so the bindings check that the arrays agree."""
    shape = tuple(shape)
    if array.shape != shape:
        raise AlexNetError(f"{op}: {name} has shape {array.shape}, expected {shape}")


def _require_nchw(op, x):
    if x.ndim != 4:
        raise AlexNetError(f"{op}: expected an N x C x H x W array, got shape {x.shape}")


def cuda_philox4x32(counter, key):
    """One Philox4x32-10 block from the library's host path: uint32 [4], [2] -> uint32 [4]."""
    counter = np.ascontiguousarray(counter, dtype=np.uint32)
    key = np.ascontiguousarray(key, dtype=np.uint32)
    _require_shape("philox4x32", "counter", counter, (4,))
    _require_shape("philox4x32", "key", key, (2,))
    out = np.empty(4, dtype=np.uint32)
    _check(library()[1].alexnet_philox4x32(_ptr(out, "uint32_t"), _ptr(counter, "uint32_t"), _ptr(key, "uint32_t")))
    return out


def cuda_augment_images(images, mean, offsets, flips, alphas, eigval, eigvec, crop):
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if images.ndim != 4 or images.shape[3] != 3:
        raise AlexNetError(f"augment_images: expected N x H x W x 3 images, got shape {images.shape}")
    N, H, W, _ = images.shape
    mean, alphas, eigval, eigvec = _f32(mean), _f32(alphas), _f32(eigval), _f32(eigvec)
    offsets = np.ascontiguousarray(offsets, dtype=np.int32)
    flips = np.ascontiguousarray(flips, dtype=np.uint8)
    for name, array, shape in [("mean", mean, (H, W, 3)), ("offsets", offsets, (N, 2)), ("flips", flips, (N,)),
                               ("alphas", alphas, (N, 3)), ("eigval", eigval, (3,)), ("eigvec", eigvec, (3, 3))]:
        _require_shape("augment_images", name, array, shape)
    out = np.empty((N, 3, crop, crop), dtype=np.float32)
    _check(library()[1].alexnet_augment_images(
        _ptr(out), _ptr(images, "uint8_t"), _ptr(mean), _ptr(offsets, "int"), _ptr(flips, "uint8_t"),
        _ptr(alphas), _ptr(eigval), _ptr(eigvec), N, H, W, crop))
    return out


def cuda_relu_forward(x):
    x = _f32(x)
    out = np.empty_like(x)
    _check(library()[1].alexnet_relu_forward(_ptr(out), _ptr(x), x.size))
    return out


def cuda_relu_backward(dout, out):
    dout, out = _f32(dout), _f32(out)
    _require_shape("relu_backward", "out", out, dout.shape)
    dinp = np.empty_like(dout)
    _check(library()[1].alexnet_relu_backward(_ptr(dinp), _ptr(dout), _ptr(out), dout.size))
    return dinp


def cuda_lrn_forward(x, size, alpha, beta, k):
    """Returns (out, scale) like lrn_forward."""
    x = _f32(x)
    _require_nchw("lrn_forward", x)
    out, scale = np.empty_like(x), np.empty_like(x)
    _check(library()[1].alexnet_lrn_forward(_ptr(out), _ptr(scale), _ptr(x), *x.shape, size, alpha, beta, k))
    return out, scale


def cuda_lrn_backward(dout, x, out, scale, size, alpha, beta, k):
    dout, x, out, scale = _f32(dout), _f32(x), _f32(out), _f32(scale)
    _require_nchw("lrn_backward", x)
    for name, array in [("dout", dout), ("out", out), ("scale", scale)]:
        _require_shape("lrn_backward", name, array, x.shape)
    dinp = np.empty_like(x)
    _check(library()[1].alexnet_lrn_backward(_ptr(dinp), _ptr(dout), _ptr(x), _ptr(out), _ptr(scale),
                                             *x.shape, size, alpha, beta, k))
    return dinp


def cuda_maxpool_forward(x, size, stride, OH=None, OW=None):
    x = _f32(x)
    _require_nchw("maxpool_forward", x)
    N, C, H, W = x.shape
    OH = OH or pool_output_size(H, size, stride)
    OW = OW or pool_output_size(W, size, stride)
    out = np.empty((N, C, OH, OW), dtype=np.float32)
    _check(library()[1].alexnet_maxpool_forward(_ptr(out), _ptr(x), N, C, H, W, size, stride, OH, OW))
    return out


def cuda_maxpool_backward(dout, x, size, stride):
    dout, x = _f32(dout), _f32(x)
    _require_nchw("maxpool_backward", x)
    _require_nchw("maxpool_backward", dout)
    _require_shape("maxpool_backward", "dout", dout, x.shape[:2] + dout.shape[2:])
    dinp = np.empty_like(x)
    _check(library()[1].alexnet_maxpool_backward(_ptr(dinp), _ptr(dout), _ptr(x), *x.shape, size, stride,
                                                 *dout.shape[2:]))
    return dinp


def cuda_dropout_forward(x, p, seed, layer, step, train):
    x = _f32(x)
    out = np.empty_like(x)
    _check(library()[1].alexnet_dropout_forward(_ptr(out), _ptr(x), x.size, p, seed, layer, step, int(train)))
    return out


def cuda_dropout_backward(dout, p, seed, layer, step):
    dout = _f32(dout)
    dinp = np.empty_like(dout)
    _check(library()[1].alexnet_dropout_backward(_ptr(dinp), _ptr(dout), dout.size, p, seed, layer, step))
    return dinp


def cuda_softmax_cross_entropy(logits, labels):
    """Returns (losses [N], dlogits [N][K], correct [2]) like softmax_cross_entropy."""
    logits = _f32(logits)
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    if logits.ndim != 2:
        raise AlexNetError(f"softmax_cross_entropy: expected N x K logits, got shape {logits.shape}")
    N, K = logits.shape
    _require_shape("softmax_cross_entropy", "labels", labels, (N,))
    losses, dlogits, correct = np.empty(N, np.float32), np.empty_like(logits), np.empty(2, np.int32)
    _check(library()[1].alexnet_softmax_cross_entropy(_ptr(losses), _ptr(dlogits), _ptr(correct, "int"),
                                                      _ptr(logits), _ptr(labels, "int"), N, K))
    return losses, dlogits, correct


def cuda_softmax_forward(logits):
    logits = _f32(logits)
    if logits.ndim != 2:
        raise AlexNetError(f"softmax_forward: expected N x K logits, got shape {logits.shape}")
    probs = np.empty_like(logits)
    _check(library()[1].alexnet_softmax_forward(_ptr(probs), _ptr(logits), *logits.shape))
    return probs


def cuda_sgd_update(w, v, g, lr, momentum, weight_decay):
    """Returns the updated (w, v); the inputs are left unchanged."""
    w, v, g = np.array(w, dtype=np.float32), np.array(v, dtype=np.float32), _f32(g)
    _require_shape("sgd_update", "v", v, w.shape)
    _require_shape("sgd_update", "g", g, w.shape)
    _check(library()[1].alexnet_sgd_update(_ptr(w), _ptr(v), _ptr(g), w.size, lr, momentum, weight_decay))
    return w, v


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
