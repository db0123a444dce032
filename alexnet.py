"""AlexNet, the Python side.

    python alexnet.py prepare SOURCE [PATH] --out DIR    # images -> dataset folder
    python alexnet.py train --data DIR [FLAGS]           # train_alexnet(_cpu) with FLAGS
    python alexnet.py demo                               # the one-command demo
    python alexnet.py eval CKPT --data DIR               # centre-crop and 10-view errors
    python alexnet.py predict CKPT IMAGE... --data DIR   # top-5 classes of images
    python alexnet.py show filters|curves|predictions    # the paper's pictures as PNG

Sections, in reading order:
  1. NumPy reference of every layer (forward and backward), named like the CUDA kernels
  2. NumPy reference of the whole two-tower model
  3. dataset files: the binary formats, read_shard, read_stats
  4. data preparation: synthetic, CIFAR-10, ImageNet
  5. checkpoints; the train command
  6. the shared library: cffi bindings to train_alexnet.cu's C API
  7. evaluation (centre crop, ten views), prediction, pictures, the demo
  8. command line
"""
import argparse
import hashlib
import json
import math
import os
import re
import signal
import stat
import sys
import zlib
from collections import deque, namedtuple
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial

ROOT = os.path.dirname(os.path.abspath(__file__))
REQUIRED_MODULES = ("numpy", "tqdm", "PIL", "cffi")   # requirements.txt, installed into .venv by make


def missing_module_message(name):
    return (f"the Python module {name} is missing: run alexnet.py with .venv/bin/python "
            "(`make venv` creates it) or activate .venv")


try:
    import numpy as np
except ModuleNotFoundError as e:   # the command line says so in one line; an importer gets the exception
    if __name__ != "__main__" or e.name not in REQUIRED_MODULES:
        raise
    sys.exit(f"error: {missing_module_message(e.name)}")


class AlexNetError(Exception):
    """A user-facing error: the command line prints it as one line and exits 1."""


COMMANDS = {}  # name -> (add_arguments(parser), run(args)); each section registers its commands


# -----------------------------------------------------------------------------
# 1. NumPy reference: layers

# --- 1a. convolution and fully connected
#
# Layouts as in train_alexnet.cu: activations [N][C][H][W], conv weight
# [K][C/groups][R][S], fc input [N][in], fc weight [out][in]. Output pixel (oy, ox) of a
# convolution reads input rows oy*stride - pad + r (likewise columns); anything outside
# the input reads 0, which covers the padding and conv1's overhang on the bottom/right.
# The functions compute in the dtype of their inputs (float32 or float64).
#
# precision: the arithmetic of train_alexnet.cu's --precision. "fp32" multiplies the
# operands as they are; "tf32" and "bf16" first round both matrix operands as the tensor
# cores read them (round_operand); the products and sums are then exact here, while the
# GPU's are FP32. Biases and the bias gradient are never rounded.

PRECISIONS = ("fp32", "tf32", "bf16")


def round_operand(x, precision):
    """x as a tensor core reads it: each value as float32, rounded to TF32 (10 mantissa bits,
    to nearest with ties away from zero, as cvt.rna.tf32.f32) or to BF16 (7 bits, to nearest
    even, as cvt.rn.bf16x2.f32), returned in x's dtype; "fp32" returns x unchanged. The
    rounding is done on the bit pattern: add half a unit of the kept last bit (plus the kept
    last bit's value minus one, for ties to even), then clear the dropped bits."""
    if precision == "fp32":
        return x
    if precision not in PRECISIONS:
        raise AlexNetError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    if precision == "tf32":
        rounded = (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
    else:
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32).astype(np.asarray(x).dtype)


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


def conv_forward(inp, weight, bias, stride=1, pad=0, groups=1, out_hw=None, relu=False, precision="fp32"):
    """out[n][k] = [relu](bias[k] + sum over c in k's group, r, s of w[k][c][r][s] * window)."""
    inp, weight = round_operand(inp, precision), round_operand(weight, precision)
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


def conv_backward_data(dout, weight, in_hw, stride=1, pad=0, groups=1, precision="fp32"):
    """dinp: every tap (r, s) of every window adds dout * w back onto the pixel it read."""
    dout, weight = round_operand(dout, precision), round_operand(weight, precision)
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


def conv_backward_weights(dout, inp, kernel_hw, stride=1, pad=0, groups=1, precision="fp32"):
    """(dweight, dbias): dw[k][c][r][s] = sum over images and windows of dout * window."""
    dbias = dout.sum(axis=(0, 2, 3))
    dout, inp = round_operand(dout, precision), round_operand(inp, precision)
    N, K, OH, OW = dout.shape
    C = inp.shape[1]
    Cg, Kg = C // groups, K // groups
    cols = _unrolled_input(inp, kernel_hw, stride, pad, (OH, OW))
    dweight = np.concatenate([
        np.einsum("nkyx,ncyxrs->kcrs", dout[:, g * Kg:(g + 1) * Kg], cols[:, g * Cg:(g + 1) * Cg],
                  optimize=True)
        for g in range(groups)])
    return dweight, dbias


def fc_forward(inp, weight, bias, relu=False, precision="fp32"):
    """out[n][o] = [relu](bias[o] + sum_i inp[n][i] * w[o][i])."""
    out = round_operand(inp, precision) @ round_operand(weight, precision).T + bias
    return np.maximum(out, 0) if relu else out


def fc_backward_data(dout, weight, precision="fp32"):
    """dinp[n][i] = sum_o dout[n][o] * w[o][i]."""
    return round_operand(dout, precision) @ round_operand(weight, precision)


def fc_backward_weights(dout, inp, precision="fp32"):
    """(dweight, dbias): dw[o][i] = sum_n dout[n][o] * inp[n][i], db[o] = sum_n dout[n][o]."""
    return round_operand(dout, precision).T @ round_operand(inp, precision), dout.sum(axis=0)

# --- 1b. the other layers
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


def augment_images(images, mean, offsets, flips, alphas, eigval, eigvec, crop, centre_mean=False, divisor=1.0):
    """uint8 images [N][H][W][3] -> float32 crops [N][3][crop][crop]: crop at offsets[n] = (y, x),
    mirror where flips[n], subtract the mean image [H][W][3] at the same place (centre_mean: its
    centre crop, unmirrored, as the 2012 code does), add the PCA lighting
    sum_i alphas[n][i] * eigval[i] * eigvec[:, i] to every pixel, and divide by `divisor`."""
    N, H, W, _ = images.shape
    out = np.empty((N, 3, crop, crop), dtype=np.float32)
    light = (alphas.astype(np.float32) * eigval.astype(np.float32)) @ eigvec.astype(np.float32).T  # [N][3]
    centre = np.s_[(H - crop) // 2:(H - crop) // 2 + crop, (W - crop) // 2:(W - crop) // 2 + crop]
    for n in range(N):
        oy, ox = offsets[n]
        window = np.s_[oy:oy + crop, ox:ox + crop]
        patch = images[n][window].astype(np.float32)
        if not centre_mean:
            patch -= mean[window].astype(np.float32)
        if flips[n]:
            patch = patch[:, ::-1]
        if centre_mean:
            patch = patch - mean[centre].astype(np.float32)
        out[n] = (patch.transpose(2, 0, 1) + light[n][:, None, None]) / np.float32(divisor)
    return out


def relu_forward(x):
    return np.where(x > 0, x, 0).astype(x.dtype)


def relu_backward(dout, out):
    return np.where(out > 0, dout, 0).astype(dout.dtype)


def _lrn_window_sum(v, lower, upper, axis=1):
    """s[c] = sum of v[j] over j in [c - lower, c + upper] clipped to the array, along `axis`
    (the channels, unless told otherwise)."""
    v = np.moveaxis(v, axis, 0)
    C = v.shape[0]
    s = np.zeros_like(v)
    for c in range(C):
        s[c] = v[max(0, c - lower):min(C, c + upper + 1)].sum(axis=0)
    return np.moveaxis(s, 0, axis)


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


def _spatial_window_sum(v, lower, upper):
    """The sum over rows [y - lower, y + upper] x columns [x - lower, x + upper], clipped to the
    map, at every pixel (y, x) of v [N][C][H][W]."""
    return _lrn_window_sum(_lrn_window_sum(v, lower, upper, axis=2), lower, upper, axis=3)


def spatial_norm_forward(x, size, alpha, beta, k):
    """Response normalisation within each map of x [N][C][H][W] (the authors' 2012 code, after
    conv2's LRN): out = x / scale^beta, scale = k + alpha/size^2 * sum of x^2 over the size x size
    window [y - size//2, y + (size-1)//2] x the same for x, clipped to the map. Returns (out, scale)."""
    scale = k + alpha / size ** 2 * _spatial_window_sum(x * x, size // 2, (size - 1) // 2)
    return (x * scale ** -beta).astype(x.dtype), scale.astype(x.dtype)


def spatial_norm_backward(dout, x, out, scale, size, alpha, beta, k):
    """As lrn_backward, with the transposed window in both spatial directions:
    dx[p] = dout[p] scale[p]^-beta - 2 alpha beta / size^2 * x[p] * sum_{q: p in win(q)} dout[q] out[q] / scale[q]."""
    r = _spatial_window_sum(dout * out / scale, (size - 1) // 2, size // 2)
    return (dout * scale ** -beta - 2 * alpha * beta / size ** 2 * x * r).astype(x.dtype)


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


NAN_RANK = np.iinfo(np.int32).max   # the rank of a label in a row with a NaN: never in the top k


def topk_rank(logits, labels):
    """Position of each label in a stable descending sort of its row: the number of logits
    above it plus the number of equal logits at lower class indices; NAN_RANK for a row
    with a NaN (comparisons with NaN are false, which would rank its label first)."""
    target = logits[np.arange(len(labels)), labels][:, None]
    lower = np.arange(logits.shape[1])[None, :] < labels[:, None]
    rank = ((logits > target) | ((logits == target) & lower)).sum(axis=1)
    return np.where(np.isnan(logits).any(axis=1), NAN_RANK, rank)


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
# 2. NumPy reference: the whole model
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
PAPER_LAYERS = dict(conv1_relu_after_pool=0, spatial_size=0, spatial_alpha=0.0, spatial_beta=0.0, spatial_k=0.0)

# The presets of train_alexnet.cu (section 11), sizes for the whole network.
PRESETS = {
    "alexnet": dict(preset=0, crop=224, conv_out=(96, 256, 384, 384, 256), conv_kernel=(11, 5, 3, 3, 3),
                    conv_stride=(4, 1, 1, 1, 1), conv_pad=(0, 2, 1, 1, 1), fc_out=(4096, 4096),
                    pool_size=3, pool_stride=2, lrn_size=5, lrn_alpha=1e-4, lrn_beta=0.75, lrn_k=2.0,
                    init_std=0.01, **PAPER_LAYERS),
    "small": dict(preset=1, crop=28, conv_out=(16, 32, 48, 48, 32), conv_kernel=(5, 5, 3, 3, 3),
                  conv_stride=(1, 1, 1, 1, 1), conv_pad=(2, 2, 1, 1, 1), fc_out=(128, 128),
                  pool_size=3, pool_stride=2, lrn_size=5, lrn_alpha=1e-4, lrn_beta=0.75, lrn_k=2.0,
                  init_std=0.05, **PAPER_LAYERS),
}
# the authors' 2012 run: the paper's sizes; conv1 LRN pool ReLU; a 5x5 within-map normalisation
# after conv2's LRN
PRESETS["alexnet-2012-code"] = dict(PRESETS["alexnet"], preset=2, conv1_relu_after_pool=1, spatial_size=5,
                                    spatial_alpha=1e-3, spatial_beta=0.75, spatial_k=1.0)
PRESET_NAMES = tuple(PRESETS)

# How each preset is trained beyond the flags (the .cu's RECIPES; epochs counted from 0).
PAPER_RECIPE = dict(init_std_scale=(1,) * 8, flag_defaults={}, crop_chunk=1, centre_mean=False,
                    lighting_stdev=False, lighting_epochs=0, bias_lr_scale=0.0, conv1_slow_epoch=-1,
                    conv1_frozen_epoch=-1)
RECIPES = {
    "alexnet": PAPER_RECIPE,
    "small": PAPER_RECIPE,
    "alexnet-2012-code": dict(init_std_scale=(1, 1, 3, 3, 3, 1, 1, 1),
                              flag_defaults={"lr_steps": (24, 50, 78), "patience": 0}, crop_chunk=32,
                              centre_mean=True, lighting_stdev=True, lighting_epochs=66, bias_lr_scale=2.0,
                              conv1_slow_epoch=66, conv1_frozen_epoch=71),
}


def learning_rates(preset, lr, epoch, drops):
    """{"weights", "biases", "conv1_weights", "conv1_biases": rate, "conv1_frozen": bool} of one
    step in `epoch`, after `drops` divisions by 10 of the base rate `lr` (the .cu's learning_rates)."""
    recipe, lr = RECIPES[preset], np.float32(lr)
    rate = np.float32(np.float64(lr) * 0.1 ** drops)
    biases = np.float32(recipe["bias_lr_scale"]) * lr if recipe["bias_lr_scale"] else rate
    slow = 0 <= recipe["conv1_slow_epoch"] <= epoch
    return dict(weights=rate, biases=biases, conv1_weights=np.float32(0.1) * rate if slow else rate,
                conv1_biases=biases, conv1_frozen=0 <= recipe["conv1_frozen_epoch"] <= epoch)


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
        if (out := conv_output_size(size, k, arch["conv_stride"][i], arch["conv_pad"][i])) < 1:
            raise AlexNetError(f"{LAYERS[i]}: a {size}x{size} input is too small for a {k}x{k} kernel")
        size = out
        if CONV_POOLED[i]:
            if size < arch["pool_size"]:
                raise AlexNetError(f"{LAYERS[i]}: output {size} is smaller than the pooling window")
            size = pool_output_size(size, arch["pool_size"], arch["pool_stride"])
        channels = K
    features = channels * size * size
    for name, out in zip(LAYERS[5:], (*arch["fc_out"], arch["classes"])):
        shapes[f"{name}.weight"] = (out, features)
        shapes[f"{name}.bias"] = (out,)
        features = out
    return shapes


def init_params(arch, rng):
    """The paper's initialisation (float32): weights ~ N(0, std^2) with std = init_std times the
    preset's scale for the layer, biases 0 or 1."""
    params, scales = {}, RECIPES[PRESET_NAMES[arch["preset"]]]["init_std_scale"]
    for name, shape in parameter_shapes(arch).items():
        layer = LAYERS.index(name.split(".")[0])
        params[name] = (rng.normal(0, arch["init_std"] * scales[layer], shape) if name.endswith("weight")
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


def _relu_after_pool(arch, i):
    """The 2012 code's conv1: conv, LRN, pool, then the ReLU."""
    return i == 0 and arch["conv1_relu_after_pool"] == 1


def _spatial_norm(arch, i):
    """The 2012 code's conv2: a within-map normalisation between the LRN and the pooling."""
    return i == 1 and arch["spatial_size"] > 0


def _spatial_settings(arch):
    return arch["spatial_size"], arch["spatial_alpha"], arch["spatial_beta"], arch["spatial_k"]


def model_forward(arch, params, x, labels, dropout=0.5, seed=0, step=0, train=True, precision="fp32"):
    """Forward pass on crops x [N][3][crop][crop]: (per-image losses, top-1/top-5 correct
    counts, cache for model_backward). precision: of the conv and fc products."""
    cache = {"x": x}
    a = x
    for i in range(5):
        name = LAYERS[i]
        cache[f"{name}.in"] = a
        a = conv_forward(a, params[f"{name}.weight"], params[f"{name}.bias"], arch["conv_stride"][i],
                         arch["conv_pad"][i], CONV_GROUPS[i], relu=not _relu_after_pool(arch, i),
                         precision=precision)
        cache[f"{name}.out"] = a
        if CONV_LRN[i]:
            a, cache[f"{name}.scale"] = _lrn_towers(a, arch)
            cache[f"{name}.lrn"] = a
        if _spatial_norm(arch, i):
            a, cache[f"{name}.spatial_scale"] = spatial_norm_forward(a, *_spatial_settings(arch))
            cache[f"{name}.spatial"] = a
        if CONV_POOLED[i]:
            a = maxpool_forward(a, arch["pool_size"], arch["pool_stride"])
        if _relu_after_pool(arch, i):
            a = cache[f"{name}.pool"] = relu_forward(a)
    a = a.reshape(len(a), -1)  # (channel, y, x) of pool5, tower 0's channels first
    for f, name in enumerate(LAYERS[5:]):
        cache[f"{name}.in"] = a
        a = fc_forward(a, params[f"{name}.weight"], params[f"{name}.bias"], relu=f < 2, precision=precision)
        if f < 2:
            cache[f"{name}.out"] = a
            a = _dropout_towers(a, dropout, seed, f, step, train)
    losses, dlogits, correct = softmax_cross_entropy(a, labels)
    cache["dlogits"] = dlogits
    return losses, correct, cache


def model_backward(arch, params, cache, dropout=0.5, seed=0, step=0, precision="fp32"):
    """Gradients of the batch-mean loss of the last model_forward: {name: array}."""
    grads = {}
    d = cache["dlogits"]
    for f in (2, 1, 0):
        name = LAYERS[5 + f]
        if f < 2:
            d = _dropout_towers(d, dropout, seed, f, step, True, backward=True)
            d = relu_backward(d, cache[f"{name}.out"])
        grads[f"{name}.weight"], grads[f"{name}.bias"] = fc_backward_weights(d, cache[f"{name}.in"], precision)
        d = fc_backward_data(d, params[f"{name}.weight"], precision)
    for i in (4, 3, 2, 1, 0):
        name = LAYERS[i]
        out = cache[f"{name}.out"]
        if CONV_POOLED[i]:
            P = pool_output_size(out.shape[2], arch["pool_size"], arch["pool_stride"])
            d = d.reshape(len(d), out.shape[1], P, P)
            if _relu_after_pool(arch, i):
                d = relu_backward(d, cache[f"{name}.pool"])
            pooled = cache[f"{name}.spatial"] if _spatial_norm(arch, i) else (
                cache[f"{name}.lrn"] if CONV_LRN[i] else out)
            d = maxpool_backward(d, pooled, arch["pool_size"], arch["pool_stride"])
        if _spatial_norm(arch, i):
            d = spatial_norm_backward(d, cache[f"{name}.lrn"], cache[f"{name}.spatial"],
                                      cache[f"{name}.spatial_scale"], *_spatial_settings(arch))
        if CONV_LRN[i]:
            d = np.concatenate([
                lrn_backward(dh, xh, oh, sh, arch["lrn_size"], arch["lrn_alpha"], arch["lrn_beta"],
                             arch["lrn_k"])
                for dh, xh, oh, sh in zip(np.split(d, 2, axis=1), np.split(out, 2, axis=1),
                                          np.split(cache[f"{name}.lrn"], 2, axis=1), cache[f"{name}.scale"])],
                axis=1)
        if not _relu_after_pool(arch, i):
            d = relu_backward(d, out)
        inp, k = cache[f"{name}.in"], arch["conv_kernel"][i]
        grads[f"{name}.weight"], grads[f"{name}.bias"] = conv_backward_weights(
            d, inp, (k, k), arch["conv_stride"][i], arch["conv_pad"][i], CONV_GROUPS[i], precision)
        if i > 0:
            d = conv_backward_data(d, params[f"{name}.weight"], inp.shape[2:], arch["conv_stride"][i],
                                   arch["conv_pad"][i], CONV_GROUPS[i], precision)
    return grads


def model_step(arch, params, momentum, x, labels, lr, momentum_coef, weight_decay, dropout=0.5,
               seed=0, step=0, precision="fp32"):
    """One SGD step as train_alexnet does it (no weight decay on biases): (mean loss, new params,
    new momentum). lr: one rate for every parameter, or a learning_rates() dict. precision: of the
    conv and fc products; the update is the same in every precision."""
    rates = lr if isinstance(lr, dict) else dict(weights=lr, biases=lr, conv1_weights=lr, conv1_biases=lr,
                                                 conv1_frozen=False)
    losses, _, cache = model_forward(arch, params, x, labels, dropout, seed, step, train=True, precision=precision)
    grads = model_backward(arch, params, cache, dropout, seed, step, precision)
    new_params, new_momentum = {}, {}
    for name in params:
        layer, kind = name.split(".")
        if layer == "conv1" and rates["conv1_frozen"]:
            new_params[name], new_momentum[name] = params[name], momentum[name]
            continue
        group = ("conv1_" if layer == "conv1" else "") + ("weights" if kind == "weight" else "biases")
        wd = weight_decay if kind == "weight" else 0.0
        new_params[name], new_momentum[name] = sgd_update(params[name], momentum[name], grads[name], rates[group],
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
# 3. Dataset files
#
# A dataset folder (written by `prepare`, read by the training executables):
#   train_000.bin, train_001.bin, ...  shards of the training split
#   val_000.bin, ...                   shards of the validation split
#   stats.bin                          mean image and RGB PCA of the training split
#   classes.txt                        line i is the name of label i
# Shard: int32 header[256] = {SHARD_MAGIC, version, N, H, W, C, classes, 0...},
#        int32 labels[N], uint8 pixels[N][H][W][C] (RGB). Little-endian throughout.
# Stats: int32 header[256] = {STATS_MAGIC, version, H, W, C, 0...}, float32 mean[H][W][C]
#        (0..255), float32 eigval[3] (descending), float32 eigvec[3][3] (column i is the
#        eigenvector of eigval[i]).

SHARD_MAGIC = 20121001
STATS_MAGIC = 20121002
FORMAT_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
SHARD_MAX_BYTES = 1 << 30   # default bound on one shard file
MAX_IMAGE_SIDE = 8192       # plausible ranges of header fields (the executable's too)
MAX_CLASSES = 1000000

Shard = namedtuple("Shard", "labels pixels num_classes")   # int32 [N], uint8 [N][H][W][C]
Stats = namedtuple("Stats", "mean eigval eigvec")          # float32 [H][W][C], [3], [3][3]


def _require_regular_file(path):
    """Refuse what is not a regular file before opening it (a FIFO would block the open)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        broken = "a broken symbolic link: " if os.path.islink(path) else ""
        raise AlexNetError(f"cannot open {path}: {broken}{e.strerror}")
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise AlexNetError(f"{path} is {kind}, not a regular file")


def _read_header(path, magic, what):
    """The int32 header of a dataset file, after checking its magic and version."""
    _require_regular_file(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise AlexNetError(f"cannot read {path}: {e.strerror}")
    if len(raw) < HEADER_BYTES:
        raise AlexNetError(f"{path}: truncated {what} (shorter than its {HEADER_BYTES}-byte header)")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != magic:
        raise AlexNetError(f"{path}: not a {what} (magic {header[0]}, expected {magic})")
    if header[1] != FORMAT_VERSION:
        raise AlexNetError(f"{path}: {what} version {header[1]}, this code reads version {FORMAT_VERSION}")
    return header


def shard_bytes(n, height, width, channels=3):
    """The exact size of a shard file of n images."""
    return HEADER_BYTES + 4 * n + n * height * width * channels


def read_shard(path):
    """A shard as memory-mapped arrays (nothing is read until used)."""
    h = _read_header(path, SHARD_MAGIC, "dataset shard")
    n, height, width, channels, classes = (int(v) for v in h[2:7])
    if (n < 0 or not 1 <= height <= MAX_IMAGE_SIDE or not 1 <= width <= MAX_IMAGE_SIDE   # N = 0: every image was skipped
            or channels != 3 or not 1 <= classes <= MAX_CLASSES):
        raise AlexNetError(f"{path}: impossible shard header (N={n} H={height} W={width} C={channels} "
                           f"classes={classes}; sides 1..{MAX_IMAGE_SIDE}, C 3, classes 1..{MAX_CLASSES})")
    size, expected = os.path.getsize(path), shard_bytes(n, height, width, channels)
    if size != expected:
        raise AlexNetError(f"{path}: {size} bytes, but its header says {expected} (truncated or corrupt shard)")
    labels = np.memmap(path, dtype="<i4", mode="r", offset=HEADER_BYTES, shape=(n,))
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        raise AlexNetError(f"{path}: label {labels[bad[0]]} of image {bad[0]} is out of range [0, {classes})")
    pixels = np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_BYTES + 4 * n,
                       shape=(n, height, width, channels))
    return Shard(labels, pixels, classes)


def read_stats(path):
    """The training-set statistics: mean image, RGB eigenvalues and eigenvectors."""
    h = _read_header(path, STATS_MAGIC, "statistics file")
    height, width, channels = (int(v) for v in h[2:5])
    if not 1 <= height <= MAX_IMAGE_SIDE or not 1 <= width <= MAX_IMAGE_SIDE or channels != 3:
        raise AlexNetError(f"{path}: impossible statistics header (H={height} W={width} C={channels}; "
                           f"sides 1..{MAX_IMAGE_SIDE}, C 3)")
    count = height * width * channels + 3 + 9
    size, expected = os.path.getsize(path), HEADER_BYTES + 4 * count
    if size != expected:
        raise AlexNetError(f"{path}: {size} bytes, but its header says {expected} (truncated or corrupt)")
    values = np.memmap(path, dtype="<f4", mode="r", offset=HEADER_BYTES, shape=(count,))
    stats = Stats(values[:-12].reshape(height, width, channels), values[-12:-9], values[-9:].reshape(3, 3))
    # what the loaders subtract and add to every image: a NaN or a wild value would spread
    # into every activation (a mean of 0..255 pixels; a covariance's eigenvalues, -1 allowing
    # for rounding around a zero one, as the executable does; unit vectors)
    for name, array, lowest, highest in (("mean", stats.mean, 0, 255), ("eigenvalue", stats.eigval, -1, 255.0**2),
                                         ("eigenvector component", stats.eigvec, -1.001, 1.001)):
        if (bad := np.flatnonzero(~((array >= lowest) & (array <= highest)))).size:
            raise AlexNetError(f"{path}: {name} {array.flat[bad[0]]:g} is outside [{lowest:g}, {highest:g}] "
                               "(corrupt statistics)")
    return stats


def read_text_lines(path):
    """The lines of a UTF-8 text file; a file that cannot be read or decoded is an AlexNetError."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except OSError as e:
        raise AlexNetError(f"cannot read {path}: {e.strerror}")
    except UnicodeDecodeError as e:
        raise AlexNetError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})")


def read_classes(folder):
    """The class names of a dataset folder (classes.txt, line i = label i)."""
    return read_text_lines(os.path.join(folder, "classes.txt"))


def shard_paths(folder, split):
    """The shard files of one split ("train" or "val"), in order; at least one. Shards are
    numbered from 000 without gaps and each is a readable regular file (the executable's
    rule too): a missing number or a broken link is an error, never a shorter split."""
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise AlexNetError(f"cannot read {folder}: {e.strerror}")
    numbers = set()
    for name in names:   # the names the executable opens: train_000.bin ... train_999.bin, train_1000.bin ...
        if (m := re.fullmatch(rf"{split}_(\d{{3,}})\.bin", name)) and name == f"{split}_{int(m.group(1)):03d}.bin":
            numbers.add(int(m.group(1)))
    if not numbers:
        raise AlexNetError(f"{folder}: no {split}_000.bin "
                           f"(prepare the dataset first: {python_command('prepare', '...')})")
    paths = [os.path.join(folder, f"{split}_{k:03d}.bin") for k in range(max(numbers) + 1)]
    for k, path in enumerate(paths):
        if k not in numbers:
            raise AlexNetError(f"{path} is missing, but {paths[-1]} exists: shards must be numbered without gaps")
        _require_regular_file(path)
    return paths


def read_split(folder, split):
    """All images of a split in memory: (labels int32 [N], pixels uint8 [N][H][W][C]).
    For small sets (tests, the demo); large ones are read shard by shard with read_shard."""
    shards = [read_shard(p) for p in shard_paths(folder, split)]
    if len({s.pixels.shape[1:] for s in shards}) != 1:
        raise AlexNetError(f"{folder}: the {split} shards have different image sizes")
    return (np.concatenate([s.labels for s in shards]).astype(np.int32),
            np.concatenate([s.pixels for s in shards]))


def _header(magic, *fields):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:2 + len(fields)] = (magic, FORMAT_VERSION, *fields)
    return header.tobytes()


def _replace_atomically(path, write):
    """Write a file under a temporary name, then rename it: never a half-written `path`."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_shard(path, labels, pixels, num_classes):
    """Write a whole shard from arrays (the streaming writer is ShardWriter)."""
    n, height, width, channels = pixels.shape
    _replace_atomically(path, lambda f: (
        f.write(_header(SHARD_MAGIC, n, height, width, channels, num_classes)),
        f.write(np.ascontiguousarray(labels, dtype="<i4").tobytes()),
        f.write(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())))


def write_stats(path, mean, eigval, eigvec):
    height, width, channels = mean.shape
    _replace_atomically(path, lambda f: (
        f.write(_header(STATS_MAGIC, height, width, channels)),
        f.write(np.asarray(mean, dtype="<f4").tobytes()),
        f.write(np.asarray(eigval, dtype="<f4").tobytes()),
        f.write(np.asarray(eigvec, dtype="<f4").tobytes())))


def write_classes(folder, names):
    text = "".join(name + "\n" for name in names)
    _replace_atomically(os.path.join(folder, "classes.txt"), lambda f: f.write(text.encode()))


def shard_checksum(shard):
    """crc32 of a shard's pixels, then its labels: what prepare.json records of a shard."""
    crc = 0
    for start in range(0, len(shard.pixels), 256):
        crc = zlib.crc32(np.ascontiguousarray(shard.pixels[start:start + 256]), crc)
    return zlib.crc32(np.ascontiguousarray(shard.labels, dtype="<i4"), crc)


def crc32_combine(crc_a, crc_b, length_b):
    """zlib.crc32 of A + B from crc_a = crc32(A), crc_b = crc32(B) and B's length. For
    messages of one length crc32 is affine (xor-linear plus a constant), so crc(A + B) =
    crc(A + zeros) ^ crc(zeros + B) ^ crc(zeros + zeros); leading zeros change only the
    constant, so the last two terms are crc(B) ^ crc(zeros of B's length)."""
    zeros = bytes(length_b)
    return zlib.crc32(zeros, crc_a) ^ crc_b ^ zlib.crc32(zeros)


def _write_at(path, offset, data):
    """Write an array's bytes into an existing file at a byte offset (from any process)."""
    view = memoryview(np.asarray(data).reshape(-1).view(np.uint8))   # flat: empty arrays too
    fd = os.open(path, os.O_WRONLY)
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    finally:
        os.close(fd)


class ShardWriter:
    """One shard, written to `path + ".tmp"` and renamed when complete (`finish`, then
    `publish`, so that the caller can record the shard in between). Image k of the
    `expected` planned ones has its slot at `offset(k)`; the worker tasks write chunks of
    images straight into their slots (`_write_at`), so that pixels never travel back to
    the main process, which records each chunk's labels and checksum in order (`add`).
    A chunk with unreadable images leaves its last slots empty: `finish` then moves the
    later pixels down over them and over the unused label slots."""

    def __init__(self, path, expected, height, width, num_classes):
        self.path, self.tmp, self.expected, self.num_classes = path, path + ".tmp", expected, num_classes
        self.shape, self.image_bytes = (height, width, 3), height * width * 3
        self.labels, self.chunks, self.crc = [], [], 0   # chunks: (first slot, images)
        open(self.tmp, "wb").close()

    def offset(self, slot):
        return HEADER_BYTES + 4 * self.expected + slot * self.image_bytes

    def add(self, slot, labels, crc):
        """Record the chunk written at `slot`: its labels and the crc32 of its pixels."""
        self.labels.append(np.asarray(labels, dtype="<i4"))
        self.chunks.append((slot, len(labels)))
        self.crc = crc32_combine(self.crc, crc, len(labels) * self.image_bytes)

    def finish(self):
        """Complete the temporary file; returns (images, shard_checksum)."""
        labels = np.concatenate(self.labels or [np.zeros(0, "<i4")])
        n = len(labels)
        with open(self.tmp, "r+b") as f:
            if n < self.expected:   # compact: each chunk right after the one before
                dst = HEADER_BYTES + 4 * n
                for slot, images in self.chunks:
                    src, left = self.offset(slot), images * self.image_bytes
                    while left and src != dst:   # dst < src: moving forward is safe
                        f.seek(src)
                        block = f.read(min(left, 1 << 26))
                        f.seek(dst)
                        f.write(block)
                        src, dst, left = src + len(block), dst + len(block), left - len(block)
                    dst += left
                f.truncate(shard_bytes(n, *self.shape))
            f.seek(0)
            f.write(_header(SHARD_MAGIC, n, *self.shape, self.num_classes))
            f.write(labels.tobytes())
        return n, zlib.crc32(labels, self.crc)

    def publish(self):
        os.replace(self.tmp, self.path)

    def abandon(self):
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


# -----------------------------------------------------------------------------
# 4. Data preparation
#
#   python alexnet.py prepare synthetic          --out DIR   (the built-in default)
#   python alexnet.py prepare cifar10 PATH       --out DIR
#   python alexnet.py prepare imagenet PATH      --out DIR
#
# A source describes each split as a list of items (an image index, a CIFAR record, an
# image path) whose labels are known before any pixel is read. Worker processes turn
# chunks of items into pixels and the exact integer sums behind the statistics; the main
# process streams the chunks, in order, into shards of a fixed number of planned images,
# and records each finished shard in DIR/prepare.json so that a rerun verifies and skips
# it. The result does not depend on the number of workers.

Split = namedtuple("Split", "name items labels load chunk size")
# items: list of picklable descriptions; labels: int32 [len(items)];
# load(items, labels) -> (pixels uint8 [k][H][W][3] of the readable items, ok bool [len(items)],
#                         errors [(item, reason)]); chunk: items per worker task; size: image side.
Source = namedtuple("Source", "splits classes size settings")

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
MANIFEST = "prepare.json"
SKIPPED_LOG = "skipped.txt"


class PixelSums:
    """Exact integer sums over the training pixels, in one streaming pass: per-pixel sums
    for the mean image, and the sums of R, G, B and of their six pairwise products for
    the covariance. Integers, so the totals do not depend on the order of the chunks or
    the number of workers; only the final mean and covariance are float64."""

    def __init__(self, height, width):
        self.images, self.pixels = 0, 0
        self.image_sum = np.zeros((height, width, 3), dtype=np.int64)
        self.rgb_products = [[0] * 3 for _ in range(3)]

    def add(self, pixels):
        """Add a chunk of images, uint8 [n][H][W][3]."""
        self.images += len(pixels)
        self.image_sum += pixels.sum(axis=0, dtype=np.uint32)   # exact below 2^32 / 255 images
        planes = np.ascontiguousarray(pixels.reshape(-1, 3).T)   # [3][pixels]
        self.pixels += planes.shape[1]
        product = np.empty(planes.shape[1], dtype=np.uint16)      # each product <= 255^2 < 2^16
        for i in range(3):
            for j in range(i, 3):
                np.multiply(planes[i], planes[j], out=product, dtype=np.uint16)
                self.rgb_products[i][j] += int(product.sum(dtype=np.uint64))
                self.rgb_products[j][i] = self.rgb_products[i][j]
        return self

    def merge(self, other):
        self.images += other.images
        self.pixels += other.pixels
        self.image_sum += other.image_sum
        for i in range(3):
            for j in range(3):
                self.rgb_products[i][j] += other.rgb_products[i][j]
        return self

    def statistics(self):
        """(mean image float64 [H][W][3], eigval [3] descending, eigvec [3][3], column i
        the eigenvector of eigval[i] with its largest-magnitude component positive)."""
        n, s, q = self.pixels, [int(v) for v in self.image_sum.sum(axis=(0, 1))], self.rgb_products
        # cov = E[xx^T] - E[x]E[x]^T = (n q - s s^T) / n^2, the numerator in exact integers
        cov = np.array([[(n * q[i][j] - s[i] * s[j]) / n**2 for j in range(3)] for i in range(3)])
        eigval, eigvec = np.linalg.eigh(cov)
        eigval, eigvec = np.maximum(eigval[::-1], 0), eigvec[:, ::-1]   # a rounding-error -1e-14 is 0
        eigvec = eigvec * np.sign(eigvec[np.abs(eigvec).argmax(axis=0), range(3)])
        return self.image_sum / self.images, eigval, eigvec


# --- 4a. the built-in synthetic set
#
# Ten classes of shapes and textures, each drawn with anti-aliased edges from a signed
# distance d(u, v) in the shape's own frame (unit = the shape's radius r, so d * r is in
# pixels); every image has its own position (within the training crop margin), radius,
# rotation, background colour and gradient, foreground colour, a clutter line and noise.
# Colours are random and the sign of the contrast varies per image (lighter shapes on dark
# backgrounds, darker on light ones), so no fixed pixel pattern belongs to a class: a linear
# classifier on raw pixels stays near chance, while a convnet learns the shapes. Shapes are
# large, contrast high and clutter mild, so that the small preset learns the set within
# the demo's few minutes on two CPU cores.

SYNTHETIC_CLASSES = ("disc", "ring", "square", "frame", "triangle",
                     "plus", "crescent", "star", "stripes", "checker")


def _synthetic_distance(label, u, v):
    """Signed distance (negative inside) of class `label` at frame coordinates u, v."""
    radius, box = np.hypot(u, v), np.maximum(np.abs(u), np.abs(v))
    if label == 0:
        return radius - 1
    if label == 1:
        return np.abs(radius - 0.7) - 0.3
    if label == 2:
        return box - 0.85
    if label == 3:
        return np.abs(box - 0.7) - 0.22
    if label == 4:   # equilateral triangle: three half-planes, inradius 0.55
        return np.max([u * np.cos(a) + v * np.sin(a) for a in np.radians([90, 210, 330])], axis=0) - 0.55
    if label == 5:
        return np.minimum(np.maximum(np.abs(u) - 1, np.abs(v) - 0.3), np.maximum(np.abs(u) - 0.3, np.abs(v) - 1))
    if label == 6:   # a disc minus an offset disc
        return np.maximum(radius - 1, 0.8 - np.hypot(u - 0.5, v))
    if label == 7:   # five-pointed star; 0.6 keeps the slope of d near 1 at the edge
        return 0.6 * (radius - 0.6 - 0.4 * np.cos(5 * np.arctan2(v, u)))
    if label == 8:   # a disc of stripes, period 2/3
        k = 3 * np.pi
        return np.maximum(radius - 1, -np.sin(k * u) / k)
    k = 2 * np.pi    # label 9: a square of checks, cell 1/2
    return np.maximum(box - 0.9, -np.sin(k * u) * np.sin(k * v) / k)


def _synthetic_parameters(seed, split_id, index, size):
    """The random choices for one image, from its own generator: an image depends only on
    (seed, split, index), not on chunking or workers."""
    g = np.random.default_rng([seed, split_id, index])
    background = g.uniform(0, 255, 3)
    contrast = g.uniform(100, 160, 3)
    return np.concatenate([
        size / 2 + g.uniform(-size / 8, size / 8, 2),        # 0:2 centre (crop margin 1/8)
        [g.uniform(0.28, 0.36) * size, g.uniform(0, 2 * np.pi)],  # 2 radius, 3 rotation
        background,                                           # 4:7
        background + np.where(background.mean() < 128, contrast, -contrast),  # 7:10 foreground
        [g.uniform(0, 2 * np.pi), g.uniform(0, 30)],          # 10 gradient direction, 11 amplitude
        g.uniform(0, size, 4), g.uniform(0, 255, 3),          # 12:16 clutter line ends, 16:19 its colour
    ]), g.normal(0, 3, (size, size, 3))


def synthetic_images(items, size, seed, split_id):
    """Render images for items [(index, label)]: uint8 [n][size][size][3]."""
    drawn = [_synthetic_parameters(seed, split_id, index, size) for index, _ in items]
    p = np.stack([d[0] for d in drawn]).astype(np.float32)[:, :, None, None]   # [n][19][1][1]
    labels = np.array([label for _, label in items])
    y, x = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5)
    dx, dy, radius, cos, sin = x - p[:, 0], y - p[:, 1], p[:, 2], np.cos(p[:, 3]), np.sin(p[:, 3])
    u, v = (cos * dx + sin * dy) / radius, (cos * dy - sin * dx) / radius
    distance = np.empty(u.shape, dtype=np.float32)
    for label in np.unique(labels):
        mask = labels == label
        distance[mask] = _synthetic_distance(label, u[mask], v[mask])
    alpha = np.clip(0.5 - distance * radius, 0, 1)[..., None]     # anti-aliased coverage
    gradient = p[:, 11] * ((x - size / 2) * np.cos(p[:, 10]) + (y - size / 2) * np.sin(p[:, 10])) / size
    image = (p[:, 4:7].transpose(0, 2, 3, 1) + gradient[..., None]) * (1 - alpha) \
        + p[:, 7:10].transpose(0, 2, 3, 1) * alpha
    ax, ay, ex, ey = p[:, 12], p[:, 13], p[:, 14] - p[:, 12], p[:, 15] - p[:, 13]
    t = np.clip(((x - ax) * ex + (y - ay) * ey) / (ex * ex + ey * ey + 1e-6), 0, 1)
    line = 0.3 * np.clip(1 - np.hypot(x - ax - t * ex, y - ay - t * ey), 0, 1)[..., None]
    image = image * (1 - line) + p[:, 16:19].transpose(0, 2, 3, 1) * line
    image += np.stack([d[1] for d in drawn])
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _load_synthetic(items, labels, size, seed, split_id):
    return synthetic_images(items, size, seed, split_id), np.ones(len(items), bool), []


def synthetic_source(path=None, size=32, train_images=10000, val_images=2000, seed=0):
    if path is not None:
        raise AlexNetError("the synthetic source takes no PATH")
    if size < 16 or train_images < 1 or val_images < 1:
        raise AlexNetError("synthetic: --size must be >= 16 and --train-images, --val-images >= 1")
    splits = []
    for split_id, (name, n) in enumerate((("train", train_images), ("val", val_images))):
        labels = np.random.default_rng([seed, split_id]).permutation(np.arange(n) % len(SYNTHETIC_CLASSES))
        items = list(zip(range(n), labels.tolist()))
        load = partial(_load_synthetic, size=size, seed=seed, split_id=split_id)
        splits.append(Split(name, items, labels.astype(np.int32), load, 500, size))
    return Source(splits, list(SYNTHETIC_CLASSES), size,
                  dict(size=size, train_images=train_images, val_images=val_images, seed=seed))


# --- 4b. CIFAR-10, binary version: records of 1 label byte + 3072 bytes (R, G, B planes of 32x32)

CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "val": ["test_batch.bin"]}


def _load_cifar10(items, labels):
    pixels = np.empty((len(items), 32, 32, 3), dtype=np.uint8)
    handles = {}
    try:
        for k, (path, record) in enumerate(items):
            f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
            f.seek(record * CIFAR_RECORD + 1)
            pixels[k] = np.frombuffer(f.read(CIFAR_RECORD - 1), np.uint8).reshape(3, 32, 32).transpose(1, 2, 0)
    finally:
        for f in handles.values():
            f.close()
    return pixels, np.ones(len(items), bool), []


def cifar10_source(path):
    if path is None:
        raise AlexNetError("cifar10 needs PATH: the folder of data_batch_1.bin ... test_batch.bin")
    if os.path.isdir(os.path.join(path, "cifar-10-batches-bin")):
        path = os.path.join(path, "cifar-10-batches-bin")
    if not os.path.isdir(path):
        raise AlexNetError(f"{path}: no such folder")
    missing = [n for names in CIFAR_FILES.values() for n in names + ["batches.meta.txt"]
               if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise AlexNetError(f"{path}: missing {', '.join(sorted(set(missing)))} (expected the CIFAR-10 binary version)")
    classes = [line.strip() for line in read_text_lines(os.path.join(path, "batches.meta.txt")) if line.strip()]
    if len(classes) != 10:
        raise AlexNetError(f"{path}/batches.meta.txt: {len(classes)} class names, expected 10")
    splits = []
    for name, files in CIFAR_FILES.items():
        items, labels = [], []
        for file in files:
            full = os.path.join(path, file)
            data = np.fromfile(full, dtype=np.uint8)
            if len(data) == 0 or len(data) % CIFAR_RECORD:
                raise AlexNetError(f"{full}: {len(data)} bytes, not a whole number of {CIFAR_RECORD}-byte records")
            file_labels = data[::CIFAR_RECORD]
            if (bad := np.flatnonzero(file_labels >= 10)).size:
                raise AlexNetError(f"{full}: record {bad[0]} has label {file_labels[bad[0]]}, expected 0..9")
            items += [(full, r) for r in range(len(file_labels))]
            labels.append(file_labels)
        splits.append(Split(name, items, np.concatenate(labels).astype(np.int32), _load_cifar10, 1000, 32))
    return Source(splits, classes, 32, dict(path=os.path.abspath(path)))


# --- 4c. ImageNet (ILSVRC2012 as distributed) and single images

def load_image(path, size=256):
    """One image as the network sees it: shorter side scaled to `size`, the central
    size x size square, RGB uint8 [size][size][3]. Greyscale, CMYK and palette images are
    converted to RGB; EXIF orientation is ignored, as the standard pipelines do. The JPEG
    decoder downscales by 2, 4 or 8 while the shorter side stays >= size (Pillow's draft
    mode); the rest is one antialiased bilinear resize of just the central square."""
    from PIL import Image
    with Image.open(path) as im:
        width, height = im.size
        drafted = im.draft("RGB", (size, size))    # None: not a JPEG, decoded at full size
        scale = drafted[1][2] / width if drafted else 1.0
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        box = tuple(scale * c for c in (left, top, left + side, top + side))
        im = im.resize((size, size), Image.BILINEAR, box=box)
        return np.asarray(im.convert("RGB") if im.mode == "L" else im)


def _load_images(items, labels, size):
    pixels, ok, errors = [], np.zeros(len(items), bool), []
    for k, path in enumerate(items):
        try:
            pixels.append(load_image(path, size))
            ok[k] = True
        except Exception as e:   # Pillow raises many kinds (OSError, SyntaxError, ValueError...)
            errors.append((path, f"{type(e).__name__}: {e}".splitlines()[0]))
    return np.array(pixels, dtype=np.uint8).reshape(-1, size, size, 3), ok, errors


def _image_files(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


def _read_val_labels(path, synsets):
    """A validation labels file, lines 'IMAGE LABEL' (whitespace or comma separated; a
    header line 'ImageId,...' is skipped; IMAGE with or without extension; LABEL a synset
    or an index into the sorted synsets of train/; only the first label is used). Returns
    {image name without extension: synset}."""
    labels = {}
    for number, line in enumerate(read_text_lines(path), 1):
        fields = re.split(r"[,\s]+", line.strip())
        if fields == [""] or (number == 1 and fields[0] == "ImageId"):
            continue
        if len(fields) < 2:
            raise AlexNetError(f"{path} line {number}: expected 'IMAGE LABEL', got {line.strip()!r} "
                               "(the devkit's ILSVRC2012_validation_ground_truth.txt uses its own class order: "
                               "sort val/ into synset folders or give IMAGE SYNSET lines)")
        image, label = os.path.splitext(os.path.basename(fields[0]))[0], fields[1]
        if label.isdigit():
            if int(label) >= len(synsets):
                raise AlexNetError(f"{path} line {number}: label {label} out of range 0..{len(synsets) - 1}")
            label = synsets[int(label)]
        elif not re.fullmatch(r"n\d{8}", label):
            raise AlexNetError(f"{path} line {number}: label {label!r} is neither a synset (n01440764) nor an index")
        if image in labels:
            raise AlexNetError(f"{path} line {number}: {image} is listed twice")
        labels[image] = label
    if not labels:
        raise AlexNetError(f"{path}: no labels")
    return labels


def _read_synset_words(path, synsets):
    names = {}
    for line in read_text_lines(path):
        synset, _, words = line.strip().partition(" ")
        names[synset] = words.strip()
    if missing := [s for s in synsets if s not in names]:
        raise AlexNetError(f"{path}: no name for {len(missing)} synsets (first: {missing[0]})")
    return [f"{s} {names[s]}" for s in synsets]


def imagenet_source(path, size=256, val_labels=None, synset_words=None, classes=None, seed=0):
    if path is None:
        raise AlexNetError("imagenet needs PATH: the folder holding train/ and val/")
    if size < 1 or (classes is not None and classes < 1):
        raise AlexNetError("imagenet: --size and --classes must be >= 1")
    train_dir, val_dir = os.path.join(path, "train"), os.path.join(path, "val")
    for folder in (train_dir, val_dir):
        if not os.path.isdir(folder):
            raise AlexNetError(f"{folder}: no such folder (expected PATH/train/<synset>/*.JPEG and PATH/val/)")
    all_synsets = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    if not all_synsets:
        raise AlexNetError(f"{train_dir}: no class folders (expected train/n01440764/*.JPEG ...)")
    synsets = all_synsets[:classes] if classes else all_synsets
    index = {s: i for i, s in enumerate(synsets)}
    train = []
    for s in synsets:
        files = _image_files(os.path.join(train_dir, s))
        if not files:
            raise AlexNetError(f"{os.path.join(train_dir, s)}: no images")
        train += [(f, index[s]) for f in files]
    # shuffled once, so that every shard holds every class; the loader reshuffles each epoch
    train = [train[i] for i in np.random.default_rng(seed).permutation(len(train))]

    val_folders = sorted(d for d in os.listdir(val_dir) if os.path.isdir(os.path.join(val_dir, d)))
    val_files = _image_files(val_dir)
    if val_folders and val_files:
        raise AlexNetError(f"{val_dir}: holds both class folders and images; expected one layout")
    if val_folders:
        if val_labels:
            raise AlexNetError(f"{val_dir} is sorted into class folders: --val-labels is for a flat val/")
        val = [(f, index[s]) for s in val_folders if s in index for f in _image_files(os.path.join(val_dir, s))]
        left_out = sum(len(_image_files(os.path.join(val_dir, s))) for s in val_folders if s not in index)
    else:
        if not val_files:
            raise AlexNetError(f"{val_dir}: no images")
        if not val_labels:
            raise AlexNetError(f"{val_dir} is flat: give its labels with --val-labels FILE")
        labels = _read_val_labels(val_labels, all_synsets)
        names = {os.path.splitext(os.path.basename(f))[0]: f for f in val_files}
        if unlabelled := sorted(set(names) - set(labels)):
            raise AlexNetError(f"{val_labels} does not match {val_dir}: no label for {len(unlabelled)} images "
                               f"(first: {unlabelled[0]})")
        if unknown := sorted(set(labels) - set(names)):
            raise AlexNetError(f"{val_labels} does not match {val_dir}: {len(unknown)} listed images are not there "
                               f"(first: {unknown[0]})")
        val = [(names[n], index[labels[n]]) for n in sorted(names) if labels[n] in index]
        left_out = len(names) - len(val)
    if left_out:
        print(f"left out {left_out} validation images of classes not among the {len(synsets)} of train/")
    if not val:
        raise AlexNetError(f"{val_dir}: no images of the {len(synsets)} training classes")
    load = partial(_load_images, size=size)
    splits = [Split(name, [f for f, _ in items], np.array([l for _, l in items], np.int32), load, 32, size)
              for name, items in (("train", train), ("val", val))]
    names = _read_synset_words(synset_words, synsets) if synset_words else synsets
    return Source(splits, names, size, dict(path=os.path.abspath(path), size=size, classes=len(synsets), seed=seed))


SOURCES = {"synthetic": synthetic_source, "cifar10": cifar10_source, "imagenet": imagenet_source}


# --- 4d. the worker pool and resumable sharding

def _run_task(task):
    """One worker task: load a chunk of items, write their pixels into their slots of the
    shard file, and return the labels of those read, the errors, the chunk's sums (for the
    training split) and the crc32 of the pixels written."""
    load, items, labels, height, width, with_sums, path, offset = task
    pixels, ok, errors = load(items, labels)
    pixels = np.ascontiguousarray(pixels)   # what crc32 reads is what _write_at writes
    _write_at(path, offset, pixels)
    sums = PixelSums(height, width).add(pixels) if with_sums else None
    return labels[ok], errors, sums, zlib.crc32(pixels)


def _verify_shard(task):
    """A shard from an earlier run: its sums (empty unless with_sums) if its size, header
    and checksum match what was recorded, else False. (Finished shards are not fsync'ed:
    this check is what keeps a shard damaged by a crash out.)"""
    path, record, height, width, num_classes, with_sums = task
    try:
        shard = read_shard(path)
    except AlexNetError:
        return False
    if (shard_checksum(shard) != record["crc32"] or shard.labels.shape[0] != record["images"]
            or shard.pixels.shape[1:3] != (height, width) or shard.num_classes != num_classes):
        return False
    sums = PixelSums(height, width)
    if with_sums:
        for start in range(0, len(shard.pixels), 256):
            sums.add(np.asarray(shard.pixels[start:start + 256]))
    return sums


def _ignore_sigint():
    """Workers leave Ctrl-C to the main process, which stops them and cleans up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_workers(pool):
    """Cancel the tasks not yet started and wait for the running ones (at most a chunk
    each), so that no worker writes into a file after this returns."""
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def _ordered(pool, function, tasks, ahead):
    """function(task) for every task, results in order, at most `ahead` tasks in flight
    (so that tasks are created, and their shard files opened, just ahead of the workers)."""
    if pool is None:
        yield from map(function, tasks)
        return
    tasks, pending = iter(tasks), deque()
    for task in tasks:
        pending.append(pool.submit(function, task))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _fingerprint(source_name, source, shard_images):
    h = hashlib.sha256(json.dumps([source_name, source.settings, source.classes, source.size, shard_images]).encode())
    for split in source.splits:
        h.update(json.dumps([split.name, [str(item) for item in split.items]]).encode())
        h.update(split.labels.tobytes())
    return h.hexdigest()


def _dataset_files(out):
    """The files in `out` that prepare writes (and may replace), temporary ones included."""
    names = "|".join(re.escape(n) for n in ("stats.bin", "classes.txt", MANIFEST, SKIPPED_LOG))
    return [f for f in os.listdir(out) if re.fullmatch(rf"((train|val)_\d{{3,}}\.bin|{names})(\.tmp)?", f)]


def _open_output(out, fingerprint, force):
    """The manifest of an earlier run to resume, after making sure `out` is ours to write."""
    os.makedirs(out, exist_ok=True)
    manifest = None
    try:
        with open(os.path.join(out, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):   # none, or damaged: then the folder is not known to be ours
        pass
    ours = manifest is not None and manifest.get("fingerprint") == fingerprint and not force
    if not ours and _dataset_files(out) and not force:
        raise AlexNetError(f"{out} holds a dataset prepared from other inputs or settings: "
                           "choose another --out or pass --force to replace it")
    for f in _dataset_files(out):
        if not ours or f.endswith(".tmp"):   # replaced, or left by a run killed mid-shard
            os.remove(os.path.join(out, f))
    return manifest if ours else {"fingerprint": fingerprint, "shards": {}, "complete": False}


def _save_manifest(out, manifest):
    _replace_atomically(os.path.join(out, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def _resume(pool, out, plan, manifest, sums, workers, num_classes):
    """Verify the shards that an earlier run finished; returns the names of those kept
    (their training statistics are added to `sums`), forgets the others."""
    earlier = [(split, name) for split, name, _, _ in plan if name in manifest["shards"]]
    checks = [(os.path.join(out, name), manifest["shards"][name], split.size, split.size, num_classes,
               split.name == "train") for split, name in earlier]
    done = set()
    for (_, name), result in zip(earlier, _ordered(pool, _verify_shard, checks, 2 * workers)):
        if result is False:
            del manifest["shards"][name]
        else:
            done.add(name)
            sums.merge(result)
    if done:
        print(f"resuming: {len(done)} finished shards verified, {len(plan) - len(done)} to go")
    return done


def _write_shards(pool, out, pending, manifest, sums, workers, num_classes, on_error, desc):
    """Load the items of the planned shards `pending` in worker tasks that write the
    pixels into the shard files, and finish the shards in order, recording each in the
    manifest. On any error the workers are stopped first, then the unfinished files go."""
    from tqdm import tqdm
    writers = {}

    def tasks():   # a shard's file exists before the first task that writes into it
        for split, name, start, end in pending:
            writer = writers[name] = ShardWriter(os.path.join(out, name), end - start, split.size,
                                                 split.size, num_classes)
            for i in range(start, end, split.chunk):
                j = min(i + split.chunk, end)
                yield (split.load, split.items[i:j], split.labels[i:j], split.size, split.size,
                       split.name == "train", writer.tmp, writer.offset(i - start))

    results = _ordered(pool, _run_task, tasks(), 2 * workers)
    try:
        with tqdm(total=sum(end - start for _, _, start, end in pending), unit="img", desc=desc,
                  disable=None, smoothing=0.1) as progress:
            for split, name, start, end in pending:
                skipped = []
                for i in range(start, end, split.chunk):
                    labels, errors, chunk_sums, crc = next(results)
                    if errors and on_error == "stop":
                        raise AlexNetError(f"{errors[0][0]}: unreadable image ({errors[0][1]}); "
                                           "pass --on-error skip to leave such images out")
                    skipped += errors
                    writers[name].add(i - start, labels, crc)
                    if chunk_sums is not None:
                        sums.merge(chunk_sums)
                    progress.update(len(labels) + len(errors))
                # recorded before the rename: a stop in between leaves a recorded shard
                # without its file, which the rerun's verification redoes, never a
                # finished shard that the rerun does not know of
                images, crc = writers[name].finish()
                manifest["shards"][name] = {"images": images, "crc32": crc, "skipped": skipped}
                _save_manifest(out, manifest)
                writers[name].publish()
                del writers[name]
    except BaseException:
        _stop_workers(pool)
        for writer in writers.values():
            writer.abandon()
        raise


def _finish(out, source, manifest, sums):
    """stats.bin, classes.txt and the log of skipped images, once every shard is done."""
    if sums.images == 0:
        raise AlexNetError("no readable training images")
    write_stats(os.path.join(out, "stats.bin"), *sums.statistics())
    write_classes(out, source.classes)
    skipped = [entry for record in manifest["shards"].values() for entry in record["skipped"]]
    log = os.path.join(out, SKIPPED_LOG)
    if skipped:
        _replace_atomically(log, lambda f: f.write("".join(f"{p}\t{why}\n" for p, why in skipped).encode()))
        print(f"skipped {len(skipped)} unreadable images, listed in {log}")
    elif os.path.exists(log):
        os.remove(log)
    manifest["complete"] = True
    _save_manifest(out, manifest)
    counts = [sum(r["images"] for n, r in manifest["shards"].items() if n.startswith(split + "_"))
              for split in ("train", "val")]
    print(f"{out}: {counts[0]} training and {counts[1]} validation images of {source.size}x{source.size}, "
          f"{len(source.classes)} classes")


def prepare(source_name, path=None, out=None, workers=None, shard_images=None, on_error="stop",
            force=False, **options):
    """Prepare a dataset folder (see section 3) from a source; returns the folder."""
    source = SOURCES[source_name](path, **{k: v for k, v in options.items() if v is not None})
    out = out or os.path.join("data", source_name)
    try:
        return _prepare(source_name, source, out, workers, shard_images, on_error, force)
    except OSError as e:   # the output folder: not creatable, not writable, disk full
        raise AlexNetError(f"{e.filename or out}: {e.strerror}")


def _prepare(source_name, source, out, workers, shard_images, on_error, force):
    size, num_classes = source.size, len(source.classes)
    shard_images = shard_images or (SHARD_MAX_BYTES - HEADER_BYTES) // (4 + 3 * size * size)
    workers = workers or os.cpu_count() or 1
    if shard_images < 1 or workers < 1:
        raise AlexNetError("--shard-images and --workers must be >= 1")
    manifest = _open_output(out, _fingerprint(source_name, source, shard_images), force)
    if manifest["complete"] and all(os.path.exists(os.path.join(out, f))
                                    for f in list(manifest["shards"]) + ["stats.bin", "classes.txt"]):
        print(f"{out}: already prepared (--force to prepare it again)")
        return out
    # shard k of a split holds its items [k * shard_images, (k + 1) * shard_images)
    plan = [(split, f"{split.name}_{k:03d}.bin", start, min(start + shard_images, len(split.items)))
            for split in source.splits for k, start in enumerate(range(0, len(split.items), shard_images))]
    sums = PixelSums(size, size)
    pool = ProcessPoolExecutor(workers, initializer=_ignore_sigint) if workers > 1 else None
    try:
        if pool is not None:   # fork every worker now, before the progress bar starts a thread
            pool.submit(int).result()
        done = _resume(pool, out, plan, manifest, sums, workers, num_classes)
        pending = [shard for shard in plan if shard[1] not in done]
        _write_shards(pool, out, pending, manifest, sums, workers, num_classes, on_error, f"prepare {source_name}")
    except BrokenProcessPool:
        raise AlexNetError("a worker process died (killed, or out of memory?); "
                           "run the same command again to resume")
    finally:
        _stop_workers(pool)
    _finish(out, source, manifest, sums)
    return out


def _prepare_arguments(p):
    p.description = "Turn images into a dataset folder (shards, stats.bin, classes.txt)."
    p.add_argument("source", choices=sorted(SOURCES), help="synthetic (built in), cifar10 or imagenet")
    p.add_argument("path", nargs="?",
                   help="cifar10: the folder of data_batch_*.bin; imagenet: the folder of train/ and val/")
    p.add_argument("--out", help="output folder (default data/SOURCE)")
    p.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    p.add_argument("--shard-images", type=int, help="images per shard (default: as many as fit in 1 GiB)")
    p.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                   help="unreadable images: stop with an error (default), or leave them out "
                        "and list them in DIR/skipped.txt")
    p.add_argument("--force", action="store_true", help="replace a dataset prepared from other inputs or settings")
    p.add_argument("--size", type=int, help="image side (synthetic: default 32; imagenet: default 256)")
    p.add_argument("--seed", type=int, help="synthetic: the images; imagenet: the order of training images (default 0)")
    p.add_argument("--train-images", type=int, help="synthetic: training images (default 10000)")
    p.add_argument("--val-images", type=int, help="synthetic: validation images (default 2000)")
    p.add_argument("--val-labels", help="imagenet with a flat val/: lines 'IMAGE SYNSET' or 'IMAGE INDEX'")
    p.add_argument("--synset-words", help="imagenet: lines 'n01440764 tench, Tinca tinca' for class names")
    p.add_argument("--classes", type=int, help="imagenet: only the first N synsets of train/")


def _prepare_command(args):
    per_source = {"synthetic": ("size", "seed", "train_images", "val_images"), "cifar10": (),
                  "imagenet": ("size", "seed", "val_labels", "synset_words", "classes")}
    options = {k: getattr(args, k) for k in per_source[args.source]}
    given = [k for k in ("size", "seed", "train_images", "val_images", "val_labels", "synset_words", "classes")
             if getattr(args, k) is not None and k not in options]
    if given:
        raise AlexNetError(f"{args.source} takes no --{given[0].replace('_', '-')}")
    prepare(args.source, args.path, args.out, args.workers, args.shard_images, args.on_error, args.force, **options)


COMMANDS["prepare"] = (_prepare_arguments, _prepare_command)


# -----------------------------------------------------------------------------
# 5. Checkpoints and the train command

# --- 5a. checkpoints
#
# Little-endian: int32 header[256], float32 parameters (PARAMETER order, PyTorch layouts,
# output rows [0, K/2) from tower 0), float32 momentum in the same order. The header
# fields are listed below; "f32" fields hold float32 bits, "i64" fields two int32 words
# (low first). doc/formats.md, "Checkpoint", documents the same table.

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
    ("image_height", 68, "i32", 1), ("image_width", 69, "i32", 1),  # 0: not recorded (older checkpoints)
    ("conv1_relu_after_pool", 70, "i32", 1), ("spatial_size", 71, "i32", 1),  # 0 in older checkpoints
    ("spatial_alpha", 72, "f32", 1), ("spatial_beta", 73, "f32", 1), ("spatial_k", 74, "f32", 1),
    ("precision", 75, "i32", 1),  # of the matrix products: index in PRECISIONS (0 fp32, also older checkpoints)
)
# The training state of a fresh run: the executables' defaults.
_DEFAULT_STATE = dict(step=0, seed=1, batch=128, lr=0.01, momentum=0.9, weight_decay=0.0005, dropout=0.5,
                      augment=1, eval_every=0, patience=3, max_drops=3, plateau_drops=0, bad_evals=0,
                      best_error=float("inf"), loss=float("nan"), epochs=90, steps=0, lr_steps=(),
                      image_height=0, image_width=0, precision=0)


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


# The ranges a checkpoint's header fields must lie in: (lowest, highest, highest excluded).
# The training options are the executables' flag ranges, which they apply on --resume.
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
_HEADER_RANGES = dict(
    crop=(1, MAX_IMAGE_SIDE, False), classes=(2, MAX_CLASSES, False), step=(0, INT32_MAX, False),
    seed=(0, INT64_MAX, False), batch=(1, 1 << 16, False), lr=(1e-12, 100, False), momentum=(0, 1, True),
    weight_decay=(0, 1, False), dropout=(0, 1, True), augment=(0, 1, False), eval_every=(0, INT32_MAX, False),
    patience=(0, 1000000, False), max_drops=(0, 100, False), plateau_drops=(0, 100, False),
    bad_evals=(0, 1000000, False), epochs=(1, 1000000, False), steps=(0, INT32_MAX, False),
    precision=(0, len(PRECISIONS), True),
)
MAX_LR_STEPS = 8
_FIELD_AT = {name: at for name, at, _, _ in _HEADER}


def _header_problem(fields, count_of_lr_steps):
    """What is wrong with a checkpoint's decoded header fields, or None."""
    for name, (lowest, highest, excluded) in _HEADER_RANGES.items():
        value = fields[name]
        if isinstance(value, float):   # a float32 field: --lr 1e-12 is stored as 9.99999998e-13
            lowest, highest = float(np.float32(lowest)), float(np.float32(highest))
        if not (lowest <= value < highest if excluded else lowest <= value <= highest):
            return f"{name} {value:g} is outside [{lowest:g}, {highest:g}{')' if excluded else ']'}"
    for i, layer in enumerate(LAYERS[:5]):
        k, pad = fields["conv_kernel"][i], fields["conv_pad"][i]
        if fields["conv_out"][i] < 2 or fields["conv_out"][i] % 2 or k < 1 or fields["conv_stride"][i] < 1 \
                or not 0 <= pad < k:
            return f"bad geometry for {layer}"
    if any(width < 2 or width % 2 for width in fields["fc_out"]):
        return "fc6 and fc7 widths must be positive and even"
    if min(fields["pool_size"], fields["pool_stride"], fields["lrn_size"]) < 1:
        return "pooling window and stride and LRN size must be positive"
    if not all(np.isfinite(fields[name]) for name in ("lrn_alpha", "lrn_beta", "lrn_k")) \
            or not 0 < fields["init_std"] < np.inf:
        return "LRN settings not finite, or an initialisation std that is not positive"
    if fields["conv1_relu_after_pool"] not in (0, 1):
        return f"conv1 ReLU order {fields['conv1_relu_after_pool']}"
    if fields["spatial_size"] and not (1 <= fields["spatial_size"] <= 64 and fields["spatial_alpha"] >= 0
                                       and 0 < fields["spatial_k"] < np.inf and np.isfinite(fields["spatial_alpha"])
                                       and np.isfinite(fields["spatial_beta"])):
        return f"bad within-map normalisation settings (size {fields['spatial_size']})"
    if not 0 <= count_of_lr_steps <= MAX_LR_STEPS or not all(1 <= e <= 1000000 for e in fields["lr_steps"]):
        return f"{count_of_lr_steps} --lr-steps epochs (at most {MAX_LR_STEPS}, each 1..1000000)"
    if not (fields["best_error"] == np.inf or 0 <= fields["best_error"] <= 1):
        return f"best validation error {fields['best_error']:g} (a fraction, or inf before any)"
    if not (np.isnan(fields["loss"]) or 0 <= fields["loss"] < np.inf):
        return f"last loss {fields['loss']:g}"
    size = (fields["image_height"], fields["image_width"])
    if size != (0, 0) and not all(fields["crop"] <= side <= MAX_IMAGE_SIDE for side in size):
        return f"image size {size[0]}x{size[1]} (crop {fields['crop']})"
    return None


def read_checkpoint_header(path):
    """The header fields of a checkpoint after checking them and the file's size, without
    reading the parameters. The dict also works as the `arch` of model_forward."""
    _require_regular_file(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise AlexNetError(f"cannot read {path}: {e.strerror}")
    if size < HEADER_BYTES:
        raise AlexNetError(f"{path} is truncated: shorter than its {HEADER_BYTES}-byte header")
    h = np.frombuffer(raw, dtype="<i4")
    header = _decode_header(h)
    if header["magic"] != CHECKPOINT_MAGIC:
        raise AlexNetError(f"{path} is not an AlexNet checkpoint (magic {header['magic']}, "
                           f"expected {CHECKPOINT_MAGIC})")
    if header["version"] != CHECKPOINT_VERSION:
        raise AlexNetError(f"{path}: checkpoint version {header['version']}, expected {CHECKPOINT_VERSION}")
    if header["arch"] is None:
        raise AlexNetError(f"{path}: unknown preset number {header['preset']}")
    if problem := _header_problem(header, int(h[_FIELD_AT["lr_steps"] - 1])):
        raise AlexNetError(f"{path}: bad header: {problem}")
    try:
        shapes = parameter_shapes(header)
    except AlexNetError as e:
        raise AlexNetError(f"{path}: bad architecture in the header: {e}")
    total = sum(math.prod(s) for s in shapes.values())
    if header["parameters"] != total or size != HEADER_BYTES + 8 * total:
        raise AlexNetError(f"{path} is truncated or damaged: {size} bytes, {header['parameters']} parameters "
                           f"in the header; its architecture needs {total} ({HEADER_BYTES + 8 * total} bytes)")
    return header


def load_checkpoint(path):
    """(header fields, {name: float32 parameter}, {name: float32 momentum}) of a checkpoint
    written by train_alexnet or save_checkpoint. Anything wrong with the file, non-finite
    numbers included (as the executables refuse them), is an AlexNetError."""
    header = read_checkpoint_header(path)
    shapes, total = parameter_shapes(header), header["parameters"]
    try:
        values = np.fromfile(path, dtype="<f4", offset=HEADER_BYTES)
    except OSError as e:
        raise AlexNetError(f"cannot read {path}: {e.strerror}")
    if len(values) != 2 * total:
        raise AlexNetError(f"{path} changed while it was read")
    params, momentum, pos = {}, {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        params[name] = values[pos:pos + n].reshape(shape).astype(np.float32)
        momentum[name] = values[total + pos:total + pos + n].reshape(shape).astype(np.float32)
        pos += n
    for what, tensors in (("", params), ("the momentum of ", momentum)):
        for name, value in tensors.items():
            if (bad := np.flatnonzero(~np.isfinite(value))).size:
                raise AlexNetError(f"{path}: {what}{name}[{bad[0]}] is {value.flat[bad[0]]:g}: "
                                   "a checkpoint holds finite numbers only")
    return header, params, momentum


def save_checkpoint(path, header, params, momentum=None):
    """Write a checkpoint the executables resume from. header: an architecture (see
    architecture()) or a loaded header, plus any training-state fields (the rest take the
    executables' defaults, i.e. step 0); momentum defaults to zeros. Written atomically."""
    fields = dict(_DEFAULT_STATE, **header)
    fields.update(magic=CHECKPOINT_MAGIC, version=CHECKPOINT_VERSION)
    shapes = parameter_shapes(fields)
    fields["parameters"] = sum(math.prod(s) for s in shapes.values())
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


# --- 5b. the train command

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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_trainer(path, flags):
    """Run a training executable with flags; returns its exit status. A stop signal is the
    trainer's to handle (finish the step, checkpoint; a second one ends it at once), so
    each one is forwarded to it and this waits for it. The trainer has its own session:
    Ctrl-C in a terminal, sent to the whole foreground group, would otherwise reach it
    twice, directly and forwarded."""
    import subprocess
    trainer, early = None, []

    def forward(signum, frame):
        if trainer is None:
            early.append(signum)   # arrived before the trainer started: passed on once it has
        else:
            trainer.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        try:
            trainer = subprocess.Popen([path, *flags], start_new_session=True)
        except OSError as e:
            raise AlexNetError(f"cannot run {path}: {e.strerror}")
        for signum in early:
            trainer.send_signal(signum)
        status = trainer.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - status if status < 0 else status   # killed by signal N: 128 + N, as a shell reports it


def _train(args):
    """Run ./train_alexnet when a GPU is usable, else ./train_alexnet_cpu, with the flags."""
    name = "train_alexnet" if _gpu_usable() and os.path.exists(os.path.join(ROOT, "train_alexnet")) \
        else "train_alexnet_cpu"
    path = os.path.join(ROOT, name)
    if not os.path.exists(path):
        raise AlexNetError(f"{path} not found: run `make` first")
    return run_trainer(path, args.flags)


COMMANDS["train"] = (_train_arguments, _train)


# -----------------------------------------------------------------------------
# 6. The shared library (cffi)
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

# --- 6a. bindings: convolution and fully connected
# Same names and arguments as the NumPy twins in section 1a, with cuda_ in front.
# Inputs are converted to contiguous float32; array shapes are checked here, the
# sizes passed on are checked again by the library.

_CONV_DIMS = ("int N, int C, int H, int W, int K, int R, int S, int stride, int pad, int groups, "
              "int OH, int OW")
_CDEFS += [
    "int alexnet_conv_forward(float* out, const float* inp, const float* weight, "
    f"const float* bias, {_CONV_DIMS}, int relu, int precision);",
    "int alexnet_conv_backward_data(float* dinp, const float* dout, const float* weight, "
    f"{_CONV_DIMS}, int precision);",
    "int alexnet_conv_backward_weights(float* dweight, float* dbias, const float* dout, "
    f"const float* inp, {_CONV_DIMS}, int precision);",
    "int alexnet_fc_forward(float* out, const float* inp, const float* weight, const float* bias, "
    "int N, int in, int out_features, int relu, int precision);",
    "int alexnet_fc_backward_data(float* dinp, const float* dout, const float* weight, int N, "
    "int in, int out_features, int precision);",
    "int alexnet_fc_backward_weights(float* dweight, float* dbias, const float* dout, "
    "const float* inp, int N, int in, int out_features, int precision);",
]


def _precision_number(precision):
    """The C API's number for a precision name: its index in PRECISIONS."""
    if precision not in PRECISIONS:
        raise AlexNetError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS.index(precision)


def _float32(array, shape, what):
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


def cuda_conv_forward(inp, weight, bias, stride=1, pad=0, groups=1, out_hw=None, relu=False, precision="fp32"):
    _, lib = library()
    inp, weight = _float32(inp, (-1,) * 4, "input"), _float32(weight, (-1,) * 4, "weight")
    bias = _float32(bias, (weight.shape[0],), "bias")
    dims = _conv_dims(inp.shape, weight.shape, stride, pad, groups, out_hw)
    N, _, _, _, K, _, _, _, _, _, OH, OW = dims
    out = np.empty((N, K, OH, OW), np.float32)
    _check(lib.alexnet_conv_forward(_ptr(out), _ptr(inp), _ptr(weight), _ptr(bias), *dims,
                                    int(relu), _precision_number(precision)))
    return out


def cuda_conv_backward_data(dout, weight, in_hw, stride=1, pad=0, groups=1, precision="fp32"):
    _, lib = library()
    dout = _float32(dout, (-1,) * 4, "dout")
    N, K, OH, OW = dout.shape
    weight = _float32(weight, (K, -1, -1, -1), "weight")
    dims = _conv_dims((N, weight.shape[1] * groups, *in_hw), weight.shape, stride, pad, groups,
                      (OH, OW))
    dinp = np.empty(dims[:4], np.float32)
    _check(lib.alexnet_conv_backward_data(_ptr(dinp), _ptr(dout), _ptr(weight), *dims,
                                          _precision_number(precision)))
    return dinp


def cuda_conv_backward_weights(dout, inp, kernel_hw, stride=1, pad=0, groups=1, precision="fp32"):
    _, lib = library()
    dout = _float32(dout, (-1,) * 4, "dout")
    N, K, OH, OW = dout.shape
    inp = _float32(inp, (N, -1, -1, -1), "input")
    weight_shape = (K, inp.shape[1] // max(groups, 1), *kernel_hw)
    dims = _conv_dims(inp.shape, weight_shape, stride, pad, groups, (OH, OW))
    dweight, dbias = np.empty(weight_shape, np.float32), np.empty(K, np.float32)
    _check(lib.alexnet_conv_backward_weights(_ptr(dweight), _ptr(dbias), _ptr(dout), _ptr(inp),
                                             *dims, _precision_number(precision)))
    return dweight, dbias


def cuda_fc_forward(inp, weight, bias, relu=False, precision="fp32"):
    _, lib = library()
    inp, weight = _float32(inp, (-1, -1), "input"), _float32(weight, (-1, inp.shape[1]), "weight")
    bias = _float32(bias, (weight.shape[0],), "bias")
    out = np.empty((inp.shape[0], weight.shape[0]), np.float32)
    _check(lib.alexnet_fc_forward(_ptr(out), _ptr(inp), _ptr(weight), _ptr(bias), *inp.shape,
                                  weight.shape[0], int(relu), _precision_number(precision)))
    return out


def cuda_fc_backward_data(dout, weight, precision="fp32"):
    _, lib = library()
    dout, weight = _float32(dout, (-1, -1), "dout"), _float32(weight, (-1, -1), "weight")
    _float32(dout, (-1, weight.shape[0]), "dout")
    dinp = np.empty((dout.shape[0], weight.shape[1]), np.float32)
    _check(lib.alexnet_fc_backward_data(_ptr(dinp), _ptr(dout), _ptr(weight), *dinp.shape,
                                        weight.shape[0], _precision_number(precision)))
    return dinp


def cuda_fc_backward_weights(dout, inp, precision="fp32"):
    _, lib = library()
    dout, inp = _float32(dout, (-1, -1), "dout"), _float32(inp, (-1, -1), "input")
    _float32(inp, (dout.shape[0], -1), "input")
    dweight = np.empty((dout.shape[1], inp.shape[1]), np.float32)
    dbias = np.empty(dout.shape[1], np.float32)
    _check(lib.alexnet_fc_backward_weights(_ptr(dweight), _ptr(dbias), _ptr(dout), _ptr(inp),
                                           *inp.shape, dout.shape[1], _precision_number(precision)))
    return dweight, dbias


_CDEFS.append("int alexnet_gemm_plan(int op, int N, int C, int H, int W, int K, int R, int S, "
              "int stride, int pad, int OH, int OW, int precision, long* out);")
GEMM_OPS = ("conv_forward", "conv_backward_data", "conv_backward_weights",
            "fc_forward", "fc_backward_data", "fc_backward_weights")


def cuda_gemm_plan(op, N, C, K, H=1, R=1, stride=1, pad=0, precision="fp32"):
    """How the library runs one layer's matrix product on the current device: a dict of
    tile_m, tile_n, splits (of the reduction), tiles (per split) and slots (blocks the
    device holds at once). Square images and filters; fc layers: C = in, K = out features."""
    OH = conv_output_size(H, R, stride, pad)
    ffi, lib = library()
    out = ffi.new("long[5]")
    _check(lib.alexnet_gemm_plan(GEMM_OPS.index(op), N, C, H, H, K, R, R, stride, pad, OH, OH,
                                 _precision_number(precision), out))
    return dict(zip(("tile_m", "tile_n", "splits", "tiles", "slots"), list(out)))

# --- 6b. bindings: the other layers

_CDEFS.append("""
int alexnet_philox4x32(uint32_t* out, const uint32_t* counter, const uint32_t* key);
int alexnet_augment_images(float* out, const uint8_t* images, const float* mean, const int* offsets,
                           const uint8_t* flips, const float* alphas, const float* eigval,
                           const float* eigvec, int N, int H, int W, int crop, int centre_mean, float divisor);
int alexnet_augmentation_draws(int* offsets, uint8_t* flips, float* alphas, float* divisor, const char* preset,
                               uint64_t seed, long step, long epoch, int n, int H, int W, int crop);
int alexnet_view_geometry(int* ys, int* xs, uint8_t* flips, int H, int W, int crop);
int alexnet_relu_forward(float* out, const float* inp, long n);
int alexnet_relu_backward(float* dinp, const float* dout, const float* out, long n);
int alexnet_lrn_forward(float* out, float* scale, const float* inp, int N, int C, int H, int W,
                        int size, float alpha, float beta, float k);
int alexnet_lrn_backward(float* dinp, const float* dout, const float* inp, const float* out,
                         const float* scale, int N, int C, int H, int W, int size, float alpha,
                         float beta, float k);
int alexnet_spatial_norm_forward(float* out, float* scale, const float* inp, int N, int C, int H, int W,
                                 int size, float alpha, float beta, float k);
int alexnet_spatial_norm_backward(float* dinp, const float* dout, const float* inp, const float* out,
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


def cuda_augmentation_draws(seed, step, n, H, W, crop, preset="alexnet", epoch=0):
    """The random crop offsets [n][2], flips [n] and lighting weights [n][3] that the
    executable's loader draws for the first n images of training batch `step` (in `epoch`)
    of a run of `preset`, and the divisor of those crops."""
    offsets, flips, alphas = np.empty((n, 2), np.int32), np.empty(n, np.uint8), np.empty((n, 3), np.float32)
    divisor = np.empty(1, np.float32)
    _check(library()[1].alexnet_augmentation_draws(_ptr(offsets, "int"), _ptr(flips, "uint8_t"), _ptr(alphas),
                                                   _ptr(divisor), preset.encode(), seed, step, epoch, n, H, W, crop))
    return offsets, flips, alphas, float(divisor[0])


def cuda_view_geometry(H, W, crop):
    """The executable's ten test views of an H x W image, as (y, x, flip) like ten_views."""
    ys, xs, flips = np.empty(10, np.int32), np.empty(10, np.int32), np.empty(10, np.uint8)
    _check(library()[1].alexnet_view_geometry(_ptr(ys, "int"), _ptr(xs, "int"), _ptr(flips, "uint8_t"), H, W, crop))
    return [(int(y), int(x), int(f)) for y, x, f in zip(ys, xs, flips)]


def cuda_augment_images(images, mean, offsets, flips, alphas, eigval, eigvec, crop, centre_mean=False, divisor=1.0):
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
        _ptr(alphas), _ptr(eigval), _ptr(eigvec), N, H, W, crop, int(centre_mean), divisor))
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


def _cuda_normalisation_forward(op, x, size, alpha, beta, k):
    x = _f32(x)
    _require_nchw(op, x)
    out, scale = np.empty_like(x), np.empty_like(x)
    _check(getattr(library()[1], "alexnet_" + op)(_ptr(out), _ptr(scale), _ptr(x), *x.shape, size, alpha, beta, k))
    return out, scale


def _cuda_normalisation_backward(op, dout, x, out, scale, size, alpha, beta, k):
    dout, x, out, scale = _f32(dout), _f32(x), _f32(out), _f32(scale)
    _require_nchw(op, x)
    for name, array in [("dout", dout), ("out", out), ("scale", scale)]:
        _require_shape(op, name, array, x.shape)
    dinp = np.empty_like(x)
    _check(getattr(library()[1], "alexnet_" + op)(_ptr(dinp), _ptr(dout), _ptr(x), _ptr(out), _ptr(scale), *x.shape,
                                                  size, alpha, beta, k))
    return dinp


def cuda_lrn_forward(x, size, alpha, beta, k):
    """Returns (out, scale) like lrn_forward."""
    return _cuda_normalisation_forward("lrn_forward", x, size, alpha, beta, k)


def cuda_lrn_backward(dout, x, out, scale, size, alpha, beta, k):
    return _cuda_normalisation_backward("lrn_backward", dout, x, out, scale, size, alpha, beta, k)


def cuda_spatial_norm_forward(x, size, alpha, beta, k):
    """Returns (out, scale) like spatial_norm_forward."""
    return _cuda_normalisation_forward("spatial_norm_forward", x, size, alpha, beta, k)


def cuda_spatial_norm_backward(dout, x, out, scale, size, alpha, beta, k):
    return _cuda_normalisation_backward("spatial_norm_backward", dout, x, out, scale, size, alpha, beta, k)


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
# 7. Evaluation, prediction and pictures
#
# The paper tests on the centre crop, or on ten views: the four corner crops and the
# centre crop, each also mirrored, with the ten softmax outputs averaged. Both run
# through the library's model (alexnet_api.cu, 15c): the same kernels, the same
# preprocessing (the augmentation kernel without lighting: crop, mirror, mean
# subtraction) and the same view order as the executables' --eval (section 13b).
# NumpyModel is the reference that the tests compare it with.

# --- 7a. ten views, the models, the evaluation loop

def ten_views(H, W, crop):
    """The paper's ten test views of an H x W image as (y, x, flip): the corners and the
    centre, then the same five mirrored. View 4 is the plain centre crop."""
    cy, cx = (H - crop) // 2, (W - crop) // 2
    corners = [(0, 0), (0, W - crop), (H - crop, 0), (H - crop, W - crop), (cy, cx)]
    return [(y, x, flip) for flip in (0, 1) for y, x in corners]


CENTRE_VIEW = 4  # index of the centre crop in ten_views

_CDEFS.append("""
int alexnet_model_open(void** model, const char* checkpoint, int batch, int H, int W, const float* mean,
                       int precision);
int alexnet_model_shape(void* model, int* crop, int* classes);
int alexnet_model_probabilities(void* model, float* probs, const uint8_t* images, const int* offsets,
                                const uint8_t* flips, int n);
void alexnet_model_close(void* model);
""")


class LibraryModel:
    """A checkpoint's network in the shared library (CPU or GPU build): softmax outputs for
    batches of uint8 images [n][H][W][3] of the dataset's size, each cropped at (y, x),
    mirrored when flip is 1 and mean-subtracted on the device, as the executables do.
    precision: of the matrix products (PRECISIONS; None: the checkpoint's)."""

    def __init__(self, checkpoint, mean, batch, precision=None):
        ffi, lib = library()
        H, W, _ = mean.shape
        handle = ffi.new("void **")
        _check(lib.alexnet_model_open(handle, os.fsencode(checkpoint), batch, H, W,
                                      _ptr(np.ascontiguousarray(mean, np.float32)),
                                      -1 if precision is None else _precision_number(precision)))
        self.handle, self.batch, self.shape = handle[0], batch, mean.shape
        crop, classes = ffi.new("int *"), ffi.new("int *")
        _check(lib.alexnet_model_shape(self.handle, crop, classes))
        self.crop, self.classes = crop[0], classes[0]

    def probabilities(self, images, offsets, flips):
        """Softmax outputs [n][classes] (float32); offsets [n][2] as (y, x), flips [n]."""
        _, lib = library()
        if images.shape[1:] != self.shape or len(offsets) != len(images) or len(flips) != len(images):
            raise AlexNetError(f"model probabilities: expected images [n]{list(self.shape)}, offsets [n][2] "
                               f"and flips [n]; got {images.shape}, {np.shape(offsets)}, {np.shape(flips)}")
        probs = np.empty((len(images), self.classes), np.float32)
        _check(lib.alexnet_model_probabilities(
            self.handle, _ptr(probs), _ptr(np.ascontiguousarray(images, np.uint8), "uint8_t"),
            _ptr(np.ascontiguousarray(offsets, np.int32), "int"),
            _ptr(np.ascontiguousarray(flips, np.uint8), "uint8_t"), len(images)))
        return probs

    def close(self):
        if self.handle is not None:
            library()[1].alexnet_model_close(self.handle)
            self.handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class NumpyModel:
    """The same function as LibraryModel from the NumPy references (sections 1 and 2), in
    float64: augment_images without lighting, model_forward in test mode, softmax; the matrix
    operands rounded as `precision` says (None: the checkpoint's)."""

    def __init__(self, checkpoint, mean, precision=None):
        self.arch, params, _ = load_checkpoint(checkpoint)
        self.precision = PRECISIONS[self.arch["precision"]] if precision is None else precision
        self.params = {k: v.astype(np.float64) for k, v in params.items()}
        self.mean = np.asarray(mean, np.float32)
        self.crop, self.classes = self.arch["crop"], self.arch["classes"]

    def probabilities(self, images, offsets, flips):
        n = len(images)
        x = augment_images(np.asarray(images, np.uint8), self.mean, np.asarray(offsets, np.int32),
                           np.asarray(flips, np.uint8), np.zeros((n, 3), np.float32),
                           np.zeros(3, np.float32), np.eye(3, dtype=np.float32), self.crop,
                           centre_mean=RECIPES[self.arch["arch"]]["centre_mean"])
        _, _, cache = model_forward(self.arch, self.params, x.astype(np.float64),
                                    np.zeros(n, np.int64), self.arch["dropout"], train=False,
                                    precision=self.precision)
        logits = fc_forward(cache["fc8.in"], self.params["fc8.weight"], self.params["fc8.bias"],
                            relu=False, precision=self.precision)
        return softmax_forward(logits)


def view_probabilities(model, images, views):
    """Softmax outputs of every view [len(views)][n][classes] and their average (float64,
    summed in view order as the executables do)."""
    n = len(images)
    per_view = [model.probabilities(images, np.tile(np.int32([y, x]), (n, 1)), np.full(n, flip, np.uint8))
                for y, x, flip in views]
    average = np.zeros((n, model.classes))
    for p in per_view:
        average += p
    return per_view, average / len(views)


class Scores:
    """Running loss and top-1/top-5 error from probabilities: loss = -log p[label] (p
    floored at 1e-30 so that a confident miss stays finite); ranks as topk_rank."""

    def __init__(self):
        self.loss, self.top1, self.top5, self.images = 0.0, 0, 0, 0

    def add(self, probs, labels):
        probs, rows = np.asarray(probs, np.float64), np.arange(len(labels))
        self.loss += float(-np.log(np.maximum(probs[rows, labels], 1e-30)).sum())
        rank = topk_rank(probs, labels)
        self.top1 += int((rank < 1).sum())
        self.top5 += int((rank < 5).sum())
        self.images += len(labels)

    def summary(self):
        n = max(self.images, 1)
        return dict(loss=self.loss / n, top1_error=1 - self.top1 / n, top5_error=1 - self.top5 / n,
                    images=self.images)


def evaluate(model, parts, views=10, batch=128, progress=False):
    """Centre-crop and (views=10) ten-view scores of model over parts, pairs of uint8
    images [N][H][W][3] (memory-mapped shards will do) and labels [N]:
    {"centre crop": summary, "10 views": summary}."""
    from tqdm import tqdm
    scores = {"centre crop": Scores(), "10 views": Scores()} if views == 10 else {"centre crop": Scores()}
    with tqdm(total=sum(len(labels) for _, labels in parts), unit="img", disable=not progress,
              desc=f"{views}-view evaluation") as bar:
        for images, labels in parts:
            all_views = ten_views(*images.shape[1:3], model.crop)
            chosen = all_views if views == 10 else [all_views[CENTRE_VIEW]]
            centre = chosen.index(all_views[CENTRE_VIEW])
            for start in range(0, len(images), batch):
                chunk, truth = np.asarray(images[start:start + batch]), np.asarray(labels[start:start + batch])
                per_view, average = view_probabilities(model, chunk, chosen)
                scores["centre crop"].add(per_view[centre], truth)
                if views == 10:
                    scores["10 views"].add(average, truth)
                bar.update(len(chunk))
    return {name: s.summary() for name, s in scores.items()}


# --- 7b. the commands eval and predict

def _use_gpu_library():
    """Let library() load the GPU build when a GPU is usable and ALEXNET_LIB names none."""
    gpu_library = os.path.join(ROOT, "libalexnet.so")
    if "ALEXNET_LIB" not in os.environ and os.path.exists(gpu_library) and _gpu_usable():
        os.environ["ALEXNET_LIB"] = gpu_library


def _dataset(data, split="val"):
    """(shards, mean [H][W][3], class names) of a dataset folder; shards are memory-mapped
    (images, labels) pairs, so that a split never has to fit in memory."""
    paths = shard_paths(data, split)
    shards, names = [read_shard(path) for path in paths], read_classes(data)
    mean = np.array(read_stats(os.path.join(data, "stats.bin")).mean)
    for path, shard in zip(paths, shards):
        if shard.pixels.shape[1:] != mean.shape:
            raise AlexNetError(f"{data}: stats.bin is for {mean.shape} images, the {split} shards hold "
                               f"{shard.pixels.shape[1:]}")
        if shard.num_classes != len(names):
            raise AlexNetError(f"{path} has {shard.num_classes} classes, {data}/classes.txt names {len(names)}")
    return [(shard.pixels, shard.labels) for shard in shards], mean, names


def require_fit(checkpoint, data, image_shape, classes):
    """Refuse a checkpoint made for other data, before its outputs could be scored against
    the wrong labels or its crop taken from the wrong images: the class counts must agree,
    and so must the image size, which the executable records in the checkpoint (both its
    rules). For a checkpoint without that record: the presets crop 7/8 of the side (224 of
    256, 28 of 32), so images of crop to crop + crop/7 pixels fit, and larger ones would
    show the model only their middle. Returns the checkpoint's header."""
    header = read_checkpoint_header(checkpoint)
    if header["classes"] != classes:
        raise AlexNetError(f"{checkpoint} has {header['classes']} classes, the dataset {classes} ({data})")
    crop, (height, width) = header["crop"], image_shape[:2]
    if header["image_height"]:
        if (header["image_height"], header["image_width"]) != (height, width):
            raise AlexNetError(f"{checkpoint} was trained on {header['image_height']}x{header['image_width']} "
                               f"images, the dataset has {height}x{width} ({data})")
        return header
    largest = crop + crop // 7
    if not (crop <= height <= largest and crop <= width <= largest):
        raise AlexNetError(f"{checkpoint} takes {crop}x{crop} crops of images {crop} to {largest} pixels wide "
                           f"(the {header['arch']} preset), not the {height}x{width} images of {data}")
    return header


def _format_scores(name, s):
    return (f"{name:>11} | val loss {s['loss']:.4f} | top-1 error {s['top1_error']:.4f} | "
            f"top-5 error {s['top5_error']:.4f} | {s['images']} images")


def _eval_arguments(p):
    p.description = "Validation loss, top-1 and top-5 error of a checkpoint: centre crop and the paper's 10 views."
    p.add_argument("checkpoint", help="a checkpoint (e.g. out/latest.bin)")
    p.add_argument("--data", required=True, help="dataset folder (its val shards and stats.bin)")
    p.add_argument("--views", type=int, choices=(1, 10), default=10, help="1: centre crop only (default: 10)")
    p.add_argument("--batch", type=int, default=128, help="images per forward pass (default: 128)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="matrix products in fp32, or tf32 / bf16 on tensor cores (default: the checkpoint's)")


def _eval(args):
    if args.batch < 1:
        raise AlexNetError("--batch must be at least 1")
    _use_gpu_library()
    shards, mean, names = _dataset(args.data)
    require_fit(args.checkpoint, args.data, mean.shape, len(names))
    with LibraryModel(args.checkpoint, mean, args.batch, args.precision) as model:
        scores = evaluate(model, shards, args.views, args.batch, progress=True)
    print(f"{args.checkpoint} on {args.data}")
    for name, s in scores.items():
        print(_format_scores(name, s))


def _read_image(path, shape):
    """An image file preprocessed as the validation images were (load_image: shorter side
    to the dataset's size, central square); the crop and mean subtraction come later."""
    if shape[0] != shape[1]:
        raise AlexNetError(f"predict needs a dataset of square images, not {shape[0]}x{shape[1]}")
    try:
        return load_image(path, shape[0])
    except (OSError, ValueError, SyntaxError) as e:
        raise AlexNetError(f"cannot read {path}: {e}")


def predict(model, images, views=1):
    """Softmax outputs [n][classes] of uint8 images [n][H][W][3] (the centre crop, or the
    average of the ten views)."""
    H, W = images.shape[1:3]
    chosen = ten_views(H, W, model.crop)
    chosen = chosen if views == 10 else [chosen[CENTRE_VIEW]]
    return np.concatenate([view_probabilities(model, images[i:i + model.batch], chosen)[1]
                           for i in range(0, len(images), model.batch)])


def _predict_arguments(p):
    p.description = "Top-5 classes of images, preprocessed as the validation images."
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG or PNG files of any size")
    p.add_argument("--data", required=True, help="the training dataset folder (its stats.bin and classes.txt)")
    p.add_argument("--views", type=int, choices=(1, 10), default=1,
                   help="1: the centre crop (default), 10: the average of the ten views")
    p.add_argument("--top", type=int, default=5, help="classes to show per image (default: 5)")


def _predict(args):
    _use_gpu_library()
    mean = np.array(read_stats(os.path.join(args.data, "stats.bin")).mean)
    names = read_classes(args.data)
    require_fit(args.checkpoint, args.data, mean.shape, len(names))
    images = np.stack([_read_image(path, mean.shape) for path in args.images])
    with LibraryModel(args.checkpoint, mean, min(len(images), 128)) as model:
        probs = predict(model, images, args.views)
    for path, p in zip(args.images, probs):
        print(path)
        for k in np.argsort(-p, kind="stable")[:args.top]:
            print(f"  {p[k]:7.2%}  {names[k]}")


COMMANDS["eval"] = (_eval_arguments, _eval)
COMMANDS["predict"] = (_predict_arguments, _predict)


# --- 7c. pictures (Pillow)

def _font(size):
    """Pillow's built-in scalable font (Pillow >= 10.1), else its small bitmap font."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def normalise_filters(weight):
    """conv1 kernels [K][3][R][S] as uint8 RGB pictures [K][R][S][3]: each kernel
    stretched on its own from its minimum (0) to its maximum (255), as Figure 3 shows them."""
    w = np.asarray(weight, np.float64)
    lo = w.min(axis=(1, 2, 3), keepdims=True)
    span = w.max(axis=(1, 2, 3), keepdims=True) - lo
    v = np.where(span > 0, (w - lo) / np.where(span > 0, span, 1), 0.5)
    return np.round(255 * v).astype(np.uint8).transpose(0, 2, 3, 1)


FILTER_PAD = 3          # pixels between kernels
FILTER_MIN_WIDTH = 800  # kernels are enlarged until the grid is this wide at least, so their structure shows
FILTER_TITLE = 40       # height of the title band at the top
FILTER_LABEL = 30       # height of the label band above each tower's kernels


def filter_grid_geometry(K, R, scale=None, columns=None):
    """(scale, columns, rows per tower, cell size) of the filter grid for K kernels of R x R:
    kernels are enlarged by an integer factor (nearest neighbour) to 48 pixels at least
    and until the grid is FILTER_MIN_WIDTH wide."""
    columns = columns or min(16, K // 2)
    scale = scale or max(-(-48 // R), -(-(FILTER_MIN_WIDTH - FILTER_PAD * (columns + 1)) // (columns * R)))
    return scale, columns, -(-(K // 2) // columns), R * scale + FILTER_PAD


def _tower_top(tower, rows, cell):
    """The first pixel row of a tower's label band: the title, then each tower's label and kernels."""
    return FILTER_TITLE + tower * (FILTER_LABEL + rows * cell)


def filter_cell(k, K, R, scale=None, columns=None):
    """Top-left pixel (x, y) of kernel k in the grid: tower 0's K/2 kernels in the upper
    block, tower 1's in the lower, row by row, each block under its label."""
    scale, columns, rows, cell = filter_grid_geometry(K, R, scale, columns)
    tower, i = divmod(k, K // 2)
    row, col = divmod(i, columns)
    return FILTER_PAD + col * cell, _tower_top(tower, rows, cell) + FILTER_LABEL + row * cell


def filters_image(weight, title="conv1 filters", scale=None, columns=None):
    """The paper's Figure 3 for conv1 weights [K][3][R][R]: a PIL image with a title and
    each tower's kernels under its label (the paper's GPU 1 and GPU 2)."""
    from PIL import Image, ImageDraw
    K, _, R, _ = weight.shape
    scale, columns, rows, cell = filter_grid_geometry(K, R, scale, columns)
    width, height = FILTER_PAD + columns * cell, _tower_top(2, rows, cell)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((width / 2, FILTER_TITLE / 2), title, fill=(0, 0, 0), font=_font(20), anchor="mm")
    for tower in range(2):
        draw.text((FILTER_PAD, _tower_top(tower, rows, cell) + FILTER_LABEL / 2), f"tower {tower} (GPU {tower + 1})",
                  fill=(0, 0, 0), font=_font(16), anchor="lm")
    for k, pixels in enumerate(normalise_filters(weight)):
        tile = Image.fromarray(pixels, "RGB").resize((R * scale, R * scale), Image.NEAREST)
        image.paste(tile, filter_cell(k, K, R, scale, columns))
    return image


def read_training_log(path):
    """The curves of a training log (OUT/log.txt): {"train": [(epoch, loss, top1, top5)],
    "val": [(epoch, loss, top1, top5)], "lr": [(epoch, lr)]}; top1/top5 are None where the
    log has none. A log that restarts from step 0 keeps only the last run; a resumed run
    replaces the steps it repeats."""
    import re
    number = r"([-+0-9.eEinfa]+)"
    header = re.compile(r"\((\d+) steps of \d+ per epoch\).* (starting|resuming) at step")
    step_line = re.compile(rf"^step (\d+)/\d+ \| epoch {number} \| loss {number}")
    eval_line = re.compile(rf"^eval step (\d+) \| val loss {number} \| top-1 error {number} \| "
                           rf"top-5 error {number}")
    top = re.compile(rf"top-1 error {number} \| top-5 error {number}")
    lr = re.compile(rf"\| lr {number}")
    per_epoch, train, val, rates = None, {}, {}, {}
    for line in read_text_lines(path):
        if m := header.search(line):
            per_epoch = int(m.group(1))
            if m.group(2) == "starting":
                train, val, rates = {}, {}, {}
        elif m := step_line.match(line):
            step = int(m.group(1))
            t = top.search(line)
            errors = tuple(float(v) for v in t.groups()) if t else (None, None)
            train[step] = (float(m.group(2)), float(m.group(3)), *errors)
            if r := lr.search(line):
                rates[step] = (float(m.group(2)), float(r.group(1)))
        elif m := eval_line.match(line):
            step = int(m.group(1))
            epoch = step / per_epoch if per_epoch else float(step)
            val[step] = (epoch, *(float(v) for v in m.groups()[1:]))
    if not train:
        raise AlexNetError(f"{path} has no training steps to draw")
    return {"train": [train[s] for s in sorted(train)], "val": [val[s] for s in sorted(val)],
            "lr": [rates[s] for s in sorted(rates)]}


def _nice_ticks(lo, hi, count=5):
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    import math
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]


def _tick_label(v):
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.0e}"


class _Chart:
    """One chart drawn with Pillow primitives: frame, ticks and labels, lines, legend."""

    def __init__(self, draw, box, xs, ys, title, xlabel):
        self.draw, self.font, self.small = draw, _font(16), _font(13)
        self.xt, self.yt = _nice_ticks(min(xs), max(xs)), _nice_ticks(min(ys), max(ys))
        left, top, right, bottom = box
        self.box = (left + 60, top + 52, right - 10, bottom - 45)
        l, t, r, b = self.box
        draw.rectangle(self.box, outline=(0, 0, 0))
        draw.text(((l + r) / 2, top + 5), title, fill=(0, 0, 0), font=self.font, anchor="mt")
        draw.text(((l + r) / 2, bottom - 5), xlabel, fill=(0, 0, 0), font=self.small, anchor="mb")
        for v in self.xt:
            x = self.x(v)
            draw.line([(x, b), (x, b + 5)], fill=(0, 0, 0))
            draw.line([(x, t), (x, b)], fill=(232, 232, 232))
            draw.text((x, b + 8), _tick_label(v), fill=(0, 0, 0), font=self.small, anchor="mt")
        for v in self.yt:
            y = self.y(v)
            draw.line([(l - 5, y), (l, y)], fill=(0, 0, 0))
            draw.line([(l + 1, y), (r - 1, y)], fill=(232, 232, 232))
            draw.text((l - 8, y), _tick_label(v), fill=(0, 0, 0), font=self.small, anchor="rm")
        self.legend_items = []

    def x(self, v):
        l, _, r, _ = self.box
        return l + (v - self.xt[0]) / (self.xt[-1] - self.xt[0]) * (r - l)

    def y(self, v):
        _, t, _, b = self.box
        return b - (v - self.yt[0]) / (self.yt[-1] - self.yt[0]) * (b - t)

    def line(self, points, colour, label, width=2, dots=False):
        points = [(self.x(a), self.y(b)) for a, b in points if b is not None]
        if len(points) > 1:
            self.draw.line(points, fill=colour, width=width)
        if dots or len(points) == 1:
            for x, y in points:
                self.draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        if points:
            self.legend_items.append((label, colour, width))

    def mark(self, epoch, text):
        """A dashed vertical line at epoch with a label: the learning-rate drops."""
        x, (_, t, _, b) = self.x(epoch), self.box
        for y in range(int(t), int(b), 8):
            self.draw.line([(x, y), (x, min(y + 4, b))], fill=(120, 120, 120))
        self.draw.text((x + 3, t + 3), text, fill=(90, 90, 90), font=self.small, anchor="lt")

    def legend(self):
        """One row of samples and labels between the title and the frame."""
        x, (_, t, _, _) = self.box[0], self.box
        for label, colour, width in self.legend_items:
            self.draw.line([(x, t - 12), (x + 24, t - 12)], fill=colour, width=width)
            self.draw.text((x + 30, t - 12), label, fill=(0, 0, 0), font=self.small, anchor="lm")
            x += 30 + self.draw.textlength(label, font=self.small) + 22


CURVES_SIZE = (1400, 520)


def curves_image(curves):
    """Loss and top-1/top-5 error on train and validation against epochs, the learning-rate
    drops marked: a PIL image of CURVES_SIZE."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", CURVES_SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    train, val, half = curves["train"], curves["val"], CURVES_SIZE[0] // 2
    epochs = [e for e, *_ in train] + [e for e, *_ in val] + [0.0]
    drops = [(b[0], b[1]) for a, b in zip(curves["lr"], curves["lr"][1:]) if b[1] < a[1]]
    charts = []
    losses = [v[1] for v in train + val if np.isfinite(v[1])]
    loss = _Chart(draw, (0, 0, half, CURVES_SIZE[1]), epochs, [0.0] + losses, "loss", "epoch")
    loss.line([(e, l) for e, l, *_ in train], (31, 119, 180), "train")
    loss.line([(e, l) for e, l, *_ in val], (214, 39, 40), "validation", width=3, dots=True)
    charts.append(loss)
    error = _Chart(draw, (half, 0, CURVES_SIZE[0], CURVES_SIZE[1]), epochs, [0.0, 1.0], "error", "epoch")
    blue, orange = (31, 119, 180), (255, 127, 14)
    error.line([(e, t1) for e, _, t1, _ in train], blue, "train top-1", width=1)
    error.line([(e, t5) for e, _, _, t5 in train], orange, "train top-5", width=1)
    error.line([(e, t1) for e, _, t1, _ in val], blue, "validation top-1", width=3, dots=True)
    error.line([(e, t5) for e, _, _, t5 in val], orange, "validation top-5", width=3, dots=True)
    charts.append(error)
    for chart in charts:
        for epoch, rate in drops:
            chart.mark(epoch, f"lr {rate:.0e}")
        chart.legend()
    return image


PREDICTION_CELL = (230, 270)  # one image with its label and top-5 bars


def predictions_image(images, labels, probs, class_names, columns=4):
    """The paper's Figure 4: each image (enlarged to 128 pixels) with its true label under
    it and its five most probable classes as bars, the true class's bar in red."""
    from PIL import Image, ImageDraw
    cw, ch = PREDICTION_CELL
    rows = -(-len(images) // columns)
    image = Image.new("RGB", (cw * min(columns, len(images)), ch * rows), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font, bold = _font(13), _font(15)
    for i, (pixels, label, p) in enumerate(zip(images, labels, probs)):
        x0, y0 = (i % columns) * cw, (i // columns) * ch
        picture = Image.fromarray(np.asarray(pixels, np.uint8), "RGB")
        picture = picture.resize((128, 128), Image.NEAREST if picture.width <= 64 else Image.BICUBIC)
        image.paste(picture, (x0 + (cw - 128) // 2, y0 + 8))
        draw.text((x0 + cw / 2, y0 + 142), class_names[label], fill=(0, 0, 0), font=bold, anchor="mt")
        for j, k in enumerate(np.argsort(-p, kind="stable")[:5]):
            y = y0 + 166 + 19 * j
            colour = (240, 128, 128) if k == label else (174, 199, 232)
            draw.rectangle([x0 + 10, y, x0 + 10 + (cw - 20) * float(p[k]), y + 15], fill=colour)
            draw.rectangle([x0 + 10, y, x0 + cw - 10, y + 15], outline=(200, 200, 200))
            draw.text((x0 + 13, y + 8), f"{class_names[k]} {p[k]:.2f}", fill=(0, 0, 0), font=font,
                      anchor="lm")
    return image


def draw_filters(checkpoint, out=None):
    """Write the conv1 filter grid of a checkpoint (default: filters.png beside it); returns the path."""
    header, params, _ = load_checkpoint(checkpoint)
    out = out or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "filters.png")
    filters_image(params["conv1.weight"], f"conv1 filters: {header['arch']} preset, step {header['step']}").save(out)
    return out


def draw_curves(run, out=None):
    """Write the training curves of a run folder (its log.txt) or a log file (default:
    curves.png in the run folder); returns the path."""
    log = os.path.join(run, "log.txt") if os.path.isdir(run) else run
    out = out or os.path.join(os.path.dirname(os.path.abspath(log)), "curves.png")
    curves_image(read_training_log(log)).save(out)
    return out


def draw_predictions(checkpoint, data, out=None, count=8, seed=0, views=10):
    """Write Figure 4 for `count` validation images picked with `seed` (default:
    predictions.png beside the checkpoint); returns the path."""
    shards, mean, names = _dataset(data)
    require_fit(checkpoint, data, mean.shape, len(names))
    sizes = [len(labels) for _, labels in shards]
    pick = np.sort(np.random.default_rng(seed).choice(sum(sizes), min(count, sum(sizes)), replace=False))
    where = np.searchsorted(np.cumsum(sizes), pick, side="right")  # shard of each picked image
    starts = np.cumsum([0] + sizes)
    images = np.stack([shards[s][0][i - starts[s]] for s, i in zip(where, pick)])
    labels = np.array([shards[s][1][i - starts[s]] for s, i in zip(where, pick)])
    with LibraryModel(checkpoint, mean, len(images)) as model:
        probs = predict(model, images, views)
    out = out or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "predictions.png")
    predictions_image(images, labels, probs, names).save(out)
    return out


def _show_arguments(p):
    p.description = "PNG pictures: conv1 filters (Figure 3), training curves, predictions (Figure 4)."
    sub = p.add_subparsers(dest="picture", required=True)
    f = sub.add_parser("filters", help="the conv1 kernels of a checkpoint, tower 0 above tower 1")
    f.add_argument("checkpoint")
    c = sub.add_parser("curves", help="loss and top-1/top-5 error against epochs from a run's log")
    c.add_argument("run", metavar="RUN", help="a training output folder (its log.txt) or a log file")
    r = sub.add_parser("predictions", help="validation images with their top-5 predictions")
    r.add_argument("checkpoint")
    r.add_argument("--data", required=True, help="dataset folder")
    r.add_argument("--count", type=int, default=8, help="images to show (default: 8)")
    r.add_argument("--seed", type=int, default=0, help="which images (default: 0)")
    r.add_argument("--views", type=int, choices=(1, 10), default=10, help="1: centre crop only (default: 10)")
    for s in (f, c, r):
        s.add_argument("--out", metavar="PNG", help="the PNG to write (default: beside the input)")


def _show(args):
    if args.picture == "filters":
        path = draw_filters(args.checkpoint, args.out)
    elif args.picture == "curves":
        path = draw_curves(args.run, args.out)
    else:
        _use_gpu_library()
        if args.count < 1:
            raise AlexNetError("--count must be at least 1")
        path = draw_predictions(args.checkpoint, args.data, args.out, args.count, args.seed, args.views)
    print(f"wrote {path}")


COMMANDS["show"] = (_show_arguments, _show)


# --- 7d. the demo

# The demo's training run: the small preset on the synthetic set, sized to finish in a
# few minutes on two CPU cores (doc/training.md, "The demo run"). 1.4 epochs instead of the paper's
# 90: no dropout (it slows learning down and a run this short does not overfit), the
# paper's learning rate 0.01, divided by 10 after the first epoch (where the paper waits
# for the validation error to stop improving).
DEMO_TRAINING = dict(batch=32, lr=0.01, lr_steps="1", dropout=0.0, steps=450, eval_every=150, precision="fp32")


def _demo_arguments(p):
    p.description = ("The one-command demo (make demo): prepare the synthetic set, train the small "
                     "preset (GPU if usable, else the CPU build), evaluate, and draw filters.png, curves.png "
                     "and predictions.png into the output folder.")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "synthetic"), help="dataset folder (made if missing)")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "demo"), help="output folder")
    for name, value in DEMO_TRAINING.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                       help=f"training: {name.replace('_', ' ')} (default: {value})")
    p.add_argument("--prepare-flags", default="", metavar="FLAGS",
                   help="extra flags for `prepare synthetic` when the dataset is made, in one string")
    p.add_argument("--ten-views", action="store_true",
                   help="evaluate with the paper's 10 views too (ten times the evaluation time); "
                        "default: the centre crop only")


def _elapsed(seconds):
    return f"{int(seconds) // 60}m{seconds % 60:04.1f}s"


def _demo(args):
    import shlex
    import time
    start = time.time()
    gpu = _gpu_usable() and os.path.exists(os.path.join(ROOT, "train_alexnet"))
    executable = os.path.join(ROOT, "train_alexnet" if gpu else "train_alexnet_cpu")
    if not os.path.exists(executable):
        raise AlexNetError(f"{executable} not found: run `make demo`")
    if gpu:
        _use_gpu_library()

    if os.path.exists(os.path.join(args.data, "stats.bin")):
        print(f"[1/4] reusing the synthetic dataset in {args.data}")
    else:
        print(f"[1/4] preparing the synthetic dataset in {args.data}")
        if main(["prepare", "synthetic", "--out", args.data, *shlex.split(args.prepare_flags)]) != 0:
            raise AlexNetError("preparing the synthetic dataset failed")

    print(f"[2/4] training the small preset on the {'GPU' if gpu else 'CPU build'} into {args.out}")
    os.makedirs(args.out, exist_ok=True)
    for name in os.listdir(args.out):  # a fresh run: old checkpoints and log lines would mix in
        if name == "log.txt" or name == "latest.bin" or (name.startswith("ckpt_") and name.endswith(".bin")):
            os.remove(os.path.join(args.out, name))
    flags = ["--data", args.data, "--arch", "small", "--out", args.out, "--batch", str(args.batch),
             "--lr", str(args.lr), "--lr-steps", args.lr_steps, "--dropout", str(args.dropout),
             "--steps", str(args.steps), "--precision", args.precision,
             "--eval-every", str(args.eval_every), "--save-every", "0", "--log-every", str(max(1, args.eval_every // 4))]
    if run_trainer(executable, flags) != 0:  # Ctrl-C: the trainer checkpoints, and the demo goes on with it
        raise AlexNetError("training failed (see the lines above)")
    train_seconds = time.time() - start
    checkpoint = os.path.join(args.out, "latest.bin")

    print("[3/4] evaluating the last checkpoint on the validation set")
    shards, mean, names = _dataset(args.data)
    with LibraryModel(checkpoint, mean, 128) as model:
        scores = evaluate(model, shards, 10 if args.ten_views else 1, 128, progress=True)

    print("[4/4] drawing the filters, the curves and some predictions")
    pictures = [draw_filters(checkpoint), draw_curves(args.out), draw_predictions(checkpoint, args.data)]

    total = time.time() - start
    centre = scores["centre crop"]
    print(f"\ndemo done in {_elapsed(total)} (training {_elapsed(train_seconds)}, "
          f"on the {'GPU' if gpu else 'CPU build'})")
    print(f"  data        {args.data}: {centre['images']} validation images of {mean.shape[0]}x{mean.shape[1]}, "
          f"{len(names)} classes")
    print(f"  checkpoint  {checkpoint}")
    print(f"  log         {os.path.join(args.out, 'log.txt')}")
    print(f"  pictures    {'  '.join(pictures)}")
    for name, s in scores.items():
        print(_format_scores(name, s))
    print("validation accuracy: " + ", ".join(f"{1 - s['top1_error']:.1%} ({name})" for name, s in scores.items()))
    if not args.ten_views:
        print(f"  (the paper's 10 views: {python_command('eval', checkpoint, '--data', args.data)})")


COMMANDS["demo"] = (_demo_arguments, _demo)


# -----------------------------------------------------------------------------
# 8. Command line

def python_command(*words):
    """A command line running alexnet.py as the user can type it here: with this Python
    (the repository's .venv by its relative path, another by the name PATH finds it by)."""
    import shlex
    import shutil
    python = sys.executable
    if os.path.realpath(os.path.dirname(python)).startswith(os.path.realpath(ROOT) + os.sep):
        python = os.path.relpath(python)
    elif (found := shutil.which(os.path.basename(python))) and os.path.samefile(found, python):
        python = os.path.basename(python)
    return shlex.join([python, os.path.relpath(os.path.join(ROOT, "alexnet.py")), *words])


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser (and, through add_subparsers, its subcommands'), whose errors
    name the option a mistyped one was probably meant to be."""
    innermost = None   # the (sub)parser that parsed last: the options a typo was meant for

    def parse_known_args(self, args=None, namespace=None):
        ArgumentParser.innermost, self.arg_strings = self, list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        if ArgumentParser.innermost not in (None, self):   # unknown arguments of a subcommand: its usage
            ArgumentParser.innermost.error(message)
        if message.startswith(("unrecognized arguments", "the following arguments are required")):
            message += self.suggestion()   # (a typo leaves an option unknown, and perhaps one missing)
        super().error(message)

    def suggestion(self):
        """' (--ouy: did you mean --out?)' for the first unknown option with a close match, else ''."""
        import difflib
        options = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        for arg in self.arg_strings:
            name = arg.split("=")[0]
            if re.fullmatch(r"--\w[\w-]*", name) and not any(o.startswith(name) for o in options):
                if close := difflib.get_close_matches(name, options, n=1):
                    return f" ({name}: did you mean {close[0]}?)"
        return ""


def main(argv=None):
    parser = ArgumentParser(prog="alexnet.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args) or 0
    except AlexNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        if e.name not in REQUIRED_MODULES:
            raise
        print(f"error: {missing_module_message(e.name)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
