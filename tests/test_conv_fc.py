"""Convolution and fully connected: NumPy reference against the definition and finite
differences, the CUDA kernels (CPU build) against the NumPy reference, bad arguments.

Tolerance for a CUDA result against the float64 NumPy reference (computed from the
same float32 inputs, so the reference is exact to ~1e-16): each output is a float32 sum
of L products, accumulated one by one (over a few split partial sums at most). Every
addition rounds with relative error <= u = 2^-24 of the running sum, whose magnitude
is at most S = sum_i |a_i b_i| (plus |bias|). Modelling the L rounding errors as
independent with zero mean, the error is about u * sqrt(L) * S; we allow
8 * u * sqrt(L + 1) * S per element (a >8 sigma margin for the random data used here;
the worst case L * u * S would be too loose to notice a dropped term at L = 9216).
S is obtained exactly by running the NumPy reference on |inputs|.

With --precision tf32 or bf16 the kernels round both matrix operands (to 10 or 7
mantissa bits) and then multiply exactly and add in float32, so against a NumPy product
of the *rounded* operands the same tolerance holds, with S the sum of the rounded
products (NumPy on the rounded |inputs|: rounding commutes with |.|). Against the
unrounded product, each term a*b is off by at most (2 u_f + u_f^2)|a b| (u_f = 2^-11,
2^-8: half a unit in the format's last place), so the gap is bounded by that times S
plus the float32 tolerance. And the output must lie much nearer the rounded product than
the unrounded one (a mean distance 8 times smaller: a float32 sum misses the first by
about u sqrt(L) typical products, the second by about u_f sqrt(L), 2^13 or 2^16 times
more), or the operands were not rounded at all.
"""
import numpy as np
import pytest

import alexnet
from alexnet import (AlexNetError, conv_backward_data, conv_backward_weights, conv_forward,
                     conv_output_size, fc_backward_data, fc_backward_weights, fc_forward)
from model_fixtures import UNIT_ROUNDOFF

U = 2.0 ** -24
LOW_PRECISIONS = ["tf32", "bf16"]


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def f64(*arrays):
    return [a.astype(np.float64) for a in arrays]


def assert_within(got, ref, magnitude, length, what):
    """|got - ref| <= 8 u sqrt(length + 1) * magnitude, elementwise (see the module doc)."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    tol = 8 * U * np.sqrt(length + 1) * magnitude
    excess = np.abs(got - ref) - tol
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= 0, (f"{what}: at {worst} got {got[worst]}, want {ref[worst]} "
                                f"+- {tol[worst]:.3g} (L={length})")


# ---------------------------------------------------------------------------------------
# The NumPy reference: forward against the definition, backward against finite differences

def conv_by_definition(inp, weight, bias, stride, pad, groups, OH, OW):
    N, C, H, W = inp.shape
    K, Cg, R, S = weight.shape
    out = np.empty((N, K, OH, OW))
    for n, k, oy, ox in np.ndindex(N, K, OH, OW):
        total = bias[k]
        for c, r, s in np.ndindex(Cg, R, S):
            y, x = oy * stride - pad + r, ox * stride - pad + s
            if 0 <= y < H and 0 <= x < W:
                total += weight[k, c, r, s] * inp[n, k // (K // groups) * Cg + c, y, x]
        out[n, k, oy, ox] = total
    return out


# (N, C, H, W, K, R, S, stride, pad, groups, (OH, OW)): the last one overhangs the
# bottom/right edge like conv1 (windows at 0, 3, 6 of a 7-wide input, 4 wide)
SMALL_CONVS = [
    (2, 4, 7, 6, 4, 3, 2, 2, 1, 2, None),
    (1, 3, 5, 5, 2, 3, 3, 1, 0, 1, None),
    (2, 2, 7, 7, 3, 4, 4, 3, 0, 1, (3, 3)),
]


@pytest.mark.parametrize("shape", SMALL_CONVS)
def test_numpy_conv_forward_matches_definition(shape):
    N, C, H, W, K, R, S, stride, pad, groups, out_hw = shape
    rng = np.random.default_rng(1)
    inp, weight, bias = (rng.standard_normal(s) for s in [(N, C, H, W), (K, C // groups, R, S), K])
    out = conv_forward(inp, weight, bias, stride, pad, groups, out_hw)
    OH, OW = out.shape[2:]
    assert (OH, OW) == (out_hw or (conv_output_size(H, R, stride, pad),
                                   conv_output_size(W, S, stride, pad)))
    np.testing.assert_allclose(out, conv_by_definition(inp, weight, bias, stride, pad, groups,
                                                       OH, OW), rtol=1e-12, atol=1e-12)
    relu = conv_forward(inp, weight, bias, stride, pad, groups, out_hw, relu=True)
    np.testing.assert_array_equal(relu, np.maximum(out, 0))


def test_conv1_geometry_overhangs_by_three_zero_pixels():
    """224 crop, k=11, stride 4 -> 55, the same as a 227 input with 3 zero rows/columns
    appended on the bottom/right (as in the authors' 2012 code)."""
    assert conv_output_size(224, 11, 4, 0) == 55
    rng = np.random.default_rng(2)
    inp, weight = rng.standard_normal((1, 3, 224, 224)), rng.standard_normal((2, 3, 11, 11))
    bias = np.zeros(2)
    padded = np.zeros((1, 3, 227, 227))
    padded[:, :, :224, :224] = inp
    out = conv_forward(inp, weight, bias, stride=4)
    assert out.shape == (1, 2, 55, 55)
    np.testing.assert_allclose(out, conv_forward(padded, weight, bias, stride=4),
                               rtol=1e-12, atol=1e-12)


def numeric_gradient(loss, array, h=1e-3):
    """Centred differences of loss() w.r.t. every element of array (float64, in place).
    The losses here are linear in array, so the only error is rounding, ~1e-16 * |loss| / h
    ~ 1e-12 for these O(10) losses: rtol 1e-8 is safe, and a wrong gradient is off by O(1)."""
    grad = np.empty_like(array)
    for i in np.ndindex(array.shape):
        saved = array[i]
        array[i] = saved + h
        plus = loss()
        array[i] = saved - h
        minus = loss()
        array[i] = saved
        grad[i] = (plus - minus) / (2 * h)
    return grad


@pytest.mark.parametrize("shape", SMALL_CONVS)
def test_numpy_conv_backward_matches_finite_differences(shape):
    N, C, H, W, K, R, S, stride, pad, groups, out_hw = shape
    rng = np.random.default_rng(3)
    inp, weight, bias = (rng.standard_normal(s) for s in [(N, C, H, W), (K, C // groups, R, S), K])
    dout = rng.standard_normal(conv_forward(inp, weight, bias, stride, pad, groups, out_hw).shape)
    loss = lambda: np.sum(dout * conv_forward(inp, weight, bias, stride, pad, groups, out_hw))
    dinp = conv_backward_data(dout, weight, (H, W), stride, pad, groups)
    dweight, dbias = conv_backward_weights(dout, inp, (R, S), stride, pad, groups)
    np.testing.assert_allclose(dinp, numeric_gradient(loss, inp), rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(dweight, numeric_gradient(loss, weight), rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(dbias, numeric_gradient(loss, bias), rtol=1e-8, atol=1e-9)


def test_numpy_fc_matches_definition_and_finite_differences():
    rng = np.random.default_rng(4)
    inp, weight, bias = (rng.standard_normal(s) for s in [(3, 5), (4, 5), 4])
    definition = np.array([[bias[o] + sum(inp[n, i] * weight[o, i] for i in range(5))
                            for o in range(4)] for n in range(3)])
    np.testing.assert_allclose(fc_forward(inp, weight, bias), definition, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(fc_forward(inp, weight, bias, relu=True),
                                  np.maximum(definition, 0))
    dout = rng.standard_normal((3, 4))
    loss = lambda: np.sum(dout * fc_forward(inp, weight, bias))
    dweight, dbias = fc_backward_weights(dout, inp)
    np.testing.assert_allclose(fc_backward_data(dout, weight), numeric_gradient(loss, inp),
                               rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(dweight, numeric_gradient(loss, weight), rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(dbias, numeric_gradient(loss, bias), rtol=1e-8, atol=1e-9)


# ---------------------------------------------------------------------------------------
# The CUDA kernels (CPU build) against the NumPy reference

def check_product(got, twin, operands, length, precision, what):
    """A kernel's output against its NumPy twin, twin(*operands, precision) -> array (the
    other arguments bound), as the module doc says: the float32 tolerance against the
    product of the operands rounded in `precision`; for tf32/bf16 also the bounded gap to
    the unrounded product, and the output much nearer the rounded product."""
    magnitudes = [abs(x) for x in operands]
    rounded = twin(*operands, precision)
    assert_within(got, rounded, twin(*magnitudes, precision), length, f"{what} ({precision})")
    if precision == "fp32":
        return
    u, exact, magnitude = UNIT_ROUNDOFF[precision], twin(*operands, "fp32"), twin(*magnitudes, "fp32")
    fp32_tol = 8 * U * np.sqrt(length + 1) * magnitude
    gap = np.abs(got - exact)
    excess = gap - ((2 * u + u * u) * magnitude + (1 + u) ** 2 * fp32_tol)
    worst = np.unravel_index(np.argmax(excess), gap.shape)
    assert excess[worst] <= 0, f"{what} ({precision}): at {worst} {gap[worst]:.3g} from the unrounded product"
    if gap.any():  # else every output is exact either way (a lone product under a ReLU, say)
        nearer = np.mean(np.abs(got - rounded)) * 8 < np.mean(gap)
        assert nearer, f"{what} ({precision}): not much nearer the rounded product than the unrounded one"


def check_conv(shape, seed=0, precision="fp32", backward_data=True):
    """Forward (with ReLU), backward data (unless told not to), backward weights and bias:
    CUDA vs NumPy."""
    N, C, H, W, K, R, S, stride, pad, groups, out_hw = shape
    rng = np.random.default_rng(seed)
    inp, weight, bias = f32(rng, N, C, H, W), f32(rng, K, C // groups, R, S), f32(rng, K)
    args = (stride, pad, groups)
    out = alexnet.cuda_conv_forward(inp, weight, bias, *args, out_hw, relu=True, precision=precision)
    check_product(out, lambda x, w, b, p: conv_forward(x, w, b, *args, out_hw, relu=True, precision=p),
                  f64(inp, weight, bias), C // groups * R * S, precision, "conv_forward")

    dout = f32(rng, *out.shape)
    if backward_data:
        taps = (K // groups) * -(-R // stride) * -(-S // stride)  # products reaching one pixel
        check_product(alexnet.cuda_conv_backward_data(dout, weight, (H, W), *args, precision=precision),
                      lambda d, w, p: conv_backward_data(d, w, (H, W), *args, precision=p),
                      f64(dout, weight), taps, precision, "conv_backward_data")

    dweight, dbias = alexnet.cuda_conv_backward_weights(dout, inp, (R, S), *args, precision=precision)
    positions = N * out.shape[2] * out.shape[3]
    check_product(dweight, lambda d, x, p: conv_backward_weights(d, x, (R, S), *args, precision=p)[0],
                  f64(dout, inp), positions, precision, "conv_backward_weights")
    check_product(dbias, lambda d, p: d.sum(axis=(0, 2, 3)), f64(dout), positions, "fp32",
                  "conv bias gradient (never rounded)")


def check_fc(N, n_in, n_out, seed=0, precision="fp32"):
    rng = np.random.default_rng(seed)
    inp, weight, bias = f32(rng, N, n_in), f32(rng, n_out, n_in), f32(rng, n_out)
    out = alexnet.cuda_fc_forward(inp, weight, bias, relu=True, precision=precision)
    check_product(out, lambda x, w, b, p: fc_forward(x, w, b, relu=True, precision=p), f64(inp, weight, bias),
                  n_in, precision, "fc_forward")
    dout = f32(rng, N, n_out)
    check_product(alexnet.cuda_fc_backward_data(dout, weight, precision=precision), fc_backward_data,
                  f64(dout, weight), n_out, precision, "fc_backward_data")
    dweight, dbias = alexnet.cuda_fc_backward_weights(dout, inp, precision=precision)
    check_product(dweight, lambda d, x, p: fc_backward_weights(d, x, p)[0], f64(dout, inp), N, precision,
                  "fc_backward_weights")
    check_product(dbias, lambda d, p: d.sum(axis=0), f64(dout), N, "fp32", "fc bias gradient (never rounded)")


# The layers of one tower of the paper's network at batch 2, as the model calls them, plus the
# grouped conv5 of the network seen as one (groups=2).
ALEXNET_CONVS = {
    "conv1": (2, 3, 224, 224, 48, 11, 11, 4, 0, 1, (55, 55)),
    "conv2": (2, 48, 27, 27, 128, 5, 5, 1, 2, 1, None),
    "conv3": (2, 256, 13, 13, 192, 3, 3, 1, 1, 1, None),
    "conv4": (2, 192, 13, 13, 192, 3, 3, 1, 1, 1, None),
    "conv5": (2, 192, 13, 13, 128, 3, 3, 1, 1, 1, None),
    "conv5-grouped": (2, 384, 13, 13, 256, 3, 3, 1, 1, 2, None),
}
ALEXNET_FCS = {"fc6": (2, 9216, 2048), "fc7": (2, 4096, 2048), "fc8": (2, 4096, 1000)}

# Sizes that divide no tile (64x64, 16x256, slices of 16 and 32): odd, C=3, K=1,
# batch 1, stride > kernel (pixels no window covers), overhang, groups.
AWKWARD_CONVS = [
    (1, 3, 11, 13, 1, 3, 3, 1, 1, 1, None),
    (3, 5, 9, 7, 17, 2, 3, 2, 0, 1, None),
    (2, 6, 10, 10, 66, 3, 3, 3, 0, 3, None),     # ceil rule: the last window overhangs by 2
    (1, 3, 25, 25, 5, 11, 11, 4, 0, 1, (4, 4)),  # floor rule (PyTorch): no overhang
    (1, 4, 17, 17, 6, 1, 1, 2, 0, 2, None),
    (5, 34, 6, 5, 18, 5, 3, 1, 2, 2, None),
    (1, 1, 1, 1, 1, 1, 1, 1, 0, 1, None),
    (4, 4, 24, 24, 6, 3, 3, 1, 1, 2, None),      # weight gradient split in 2, with groups
]
AWKWARD_FCS = [(1, 1, 1), (1, 37, 5), (3, 17, 65), (17, 65, 3), (67, 33, 129)]


@pytest.mark.parametrize("schedule", ["forward", "random"], indirect=True)
@pytest.mark.parametrize("layer", ALEXNET_CONVS)
def test_cuda_conv_alexnet_layers(layer, schedule):
    check_conv(ALEXNET_CONVS[layer])


@pytest.mark.parametrize("schedule", ["forward", "random"], indirect=True)
@pytest.mark.parametrize("layer", ALEXNET_FCS)
def test_cuda_fc_alexnet_layers(layer, schedule):
    check_fc(*ALEXNET_FCS[layer])


@pytest.mark.parametrize("shape", AWKWARD_CONVS)
def test_cuda_conv_awkward_shapes(shape, schedule):
    check_conv(shape, seed=5)


@pytest.mark.parametrize("shape", AWKWARD_FCS)
def test_cuda_fc_awkward_shapes(shape, schedule):
    check_fc(*shape, seed=6)


# The tensor-core path: every product of a training step at batch 2 (conv1's input gradient
# is never computed in training, and its 3-row product is the emulation's slowest) and the
# awkward shapes, each under the default schedule (the test below covers the orders).
@pytest.mark.parametrize("precision", LOW_PRECISIONS)
@pytest.mark.parametrize("layer", ALEXNET_CONVS)
def test_cuda_conv_alexnet_layers_on_tensor_cores(layer, precision):
    check_conv(ALEXNET_CONVS[layer], precision=precision, backward_data=layer != "conv1")


@pytest.mark.parametrize("precision", LOW_PRECISIONS)
@pytest.mark.parametrize("layer", [pytest.param("fc6", marks=pytest.mark.slow), "fc7", "fc8"])
def test_cuda_fc_alexnet_layers_on_tensor_cores(layer, precision):
    """fc6 is fc7 with twice the inputs, and the emulation's slowest: a slow test."""
    check_fc(*ALEXNET_FCS[layer], precision=precision)


@pytest.mark.parametrize("precision", LOW_PRECISIONS)
@pytest.mark.parametrize("shape", AWKWARD_CONVS)
def test_cuda_conv_awkward_shapes_on_tensor_cores(shape, precision):
    check_conv(shape, seed=5, precision=precision)


@pytest.mark.parametrize("precision", LOW_PRECISIONS)
@pytest.mark.parametrize("shape", AWKWARD_FCS)
def test_cuda_fc_awkward_shapes_on_tensor_cores(shape, precision):
    check_fc(*shape, seed=6, precision=precision)


@pytest.mark.parametrize("precision", alexnet.PRECISIONS)
def test_cuda_conv_bitwise_deterministic_across_schedules(monkeypatch, precision):
    """The split weight-gradient reduction (conv1's shape: 5 splits) gives the same bits
    whatever order the runtime runs blocks and threads in, in every precision."""
    shape = ALEXNET_CONVS["conv1"]
    N, C, H, W, K, R, S, stride, pad, groups, (OH, OW) = shape
    rng = np.random.default_rng(7)
    dout, inp = f32(rng, N, K, OH, OW), f32(rng, N, C, H, W)
    assert alexnet.cuda_gemm_plan("conv_backward_weights", N, C, K, H, R, stride, pad, precision)["splits"] > 1
    results = []
    for order in ["forward", "reverse", "random"]:
        monkeypatch.setenv("CUDA_CPU_SCHEDULE", order)
        results.append(alexnet.cuda_conv_backward_weights(dout, inp, (R, S), stride, pad, groups,
                                                          precision=precision))
    for dweight, dbias in results[1:]:
        np.testing.assert_array_equal(dweight, results[0][0])
        np.testing.assert_array_equal(dbias, results[0][1])


# ---------------------------------------------------------------------------------------
# Bad arguments to the C API: an error code and a one-line message, never a crash

GOOD_CONV = dict(N=1, C=4, H=5, W=5, K=2, R=3, S=3, stride=1, pad=1, groups=2, OH=5, OW=5)


@pytest.mark.parametrize("change, message", [
    (dict(N=0), "positive"),
    (dict(C=-4), "positive"),
    (dict(R=0), "positive"),
    (dict(stride=0), "stride"),
    (dict(pad=-1), "pad"),
    (dict(pad=3), "pad"),                 # a window of padding only
    (dict(groups=0), "groups"),
    (dict(groups=3), "groups"),           # divides neither C=4 nor K=2
    (dict(K=3), "groups"),                # groups=2 does not divide K
    (dict(OH=4), "inconsistent"),
    (dict(OW=7), "inconsistent"),
    (dict(R=8, OH=0), "larger"),
    (dict(N=1 << 20, C=1 << 12), "2^31"),
])
def test_conv_c_api_rejects_bad_shapes(change, message):
    ffi, lib = alexnet.library()
    dims = {**GOOD_CONV, **change}
    buffer = ffi.new("float[]", 4096)
    for call in [
        lambda: lib.alexnet_conv_forward(buffer, buffer, buffer, buffer, *dims.values(), 1, 0),
        lambda: lib.alexnet_conv_backward_data(buffer, buffer, buffer, *dims.values(), 0),
        lambda: lib.alexnet_conv_backward_weights(buffer, buffer, buffer, buffer, *dims.values(), 0),
    ]:
        assert call() == 1
        error = ffi.string(lib.alexnet_last_error()).decode()
        assert message in error and "\n" not in error


def test_c_api_rejects_null_pointers():
    ffi, lib = alexnet.library()
    buffer, null = ffi.new("float[]", 4096), ffi.NULL
    dims = GOOD_CONV.values()
    calls = [
        lambda: lib.alexnet_conv_forward(buffer, null, buffer, buffer, *dims, 0, 0),
        lambda: lib.alexnet_conv_forward(buffer, buffer, buffer, null, *dims, 0, 1),
        lambda: lib.alexnet_conv_backward_data(null, buffer, buffer, *dims, 2),
        lambda: lib.alexnet_conv_backward_weights(buffer, null, buffer, buffer, *dims, 0),
        lambda: lib.alexnet_fc_forward(null, buffer, buffer, buffer, 2, 3, 4, 0, 0),
        lambda: lib.alexnet_fc_backward_data(buffer, buffer, null, 2, 3, 4, 1),
        lambda: lib.alexnet_fc_backward_weights(buffer, buffer, buffer, null, 2, 3, 4, 2),
    ]
    for call in calls:
        assert call() == 1
        assert "null pointer" in ffi.string(lib.alexnet_last_error()).decode()


@pytest.mark.parametrize("dims, message", [
    ((0, 3, 4), "positive"), ((2, -3, 4), "positive"), ((2, 3, 0), "positive"),
    ((1 << 16, 1 << 16, 1), "2^31"),
])
def test_fc_c_api_rejects_bad_shapes(dims, message):
    ffi, lib = alexnet.library()
    buffer = ffi.new("float[]", 4096)
    for call in [lambda: lib.alexnet_fc_forward(buffer, buffer, buffer, buffer, *dims, 0, 0),
                 lambda: lib.alexnet_fc_backward_data(buffer, buffer, buffer, *dims, 0),
                 lambda: lib.alexnet_fc_backward_weights(buffer, buffer, buffer, buffer, *dims, 0)]:
        assert call() == 1
        assert message in ffi.string(lib.alexnet_last_error()).decode()


def test_c_api_rejects_unknown_precisions():
    ffi, lib = alexnet.library()
    buffer, dims = ffi.new("float[]", 4096), GOOD_CONV.values()
    for precision in (-1, 3):
        for call in [lambda: lib.alexnet_conv_forward(buffer, buffer, buffer, buffer, *dims, 0, precision),
                     lambda: lib.alexnet_conv_backward_weights(buffer, buffer, buffer, buffer, *dims, precision),
                     lambda: lib.alexnet_fc_backward_data(buffer, buffer, buffer, 2, 3, 4, precision)]:
            assert call() == 1
            assert f"precision must be 0 (fp32), 1 (tf32) or 2 (bf16), got {precision}" == \
                ffi.string(lib.alexnet_last_error()).decode()
    with pytest.raises(AlexNetError, match="precision must be one of fp32, tf32, bf16, got 'fp16'"):
        alexnet.cuda_fc_forward(np.ones((1, 1)), np.ones((1, 1)), np.ones(1), precision="fp16")


def test_python_wrappers_reject_mismatched_arrays():
    rng = np.random.default_rng(8)
    with pytest.raises(AlexNetError, match="groups"):
        alexnet.cuda_conv_forward(f32(rng, 1, 4, 5, 5), f32(rng, 2, 3, 3, 3), f32(rng, 2), groups=2)
    with pytest.raises(AlexNetError, match="bias"):
        alexnet.cuda_conv_forward(f32(rng, 1, 4, 5, 5), f32(rng, 2, 4, 3, 3), f32(rng, 3))
    with pytest.raises(AlexNetError, match="inconsistent"):
        alexnet.cuda_conv_forward(f32(rng, 1, 4, 5, 5), f32(rng, 2, 4, 3, 3), f32(rng, 2),
                                  out_hw=(4, 4))
    with pytest.raises(AlexNetError, match="weight"):
        alexnet.cuda_conv_backward_data(f32(rng, 1, 2, 5, 5), f32(rng, 3, 4, 3, 3), (5, 5), pad=1)
    with pytest.raises(AlexNetError, match="weight"):
        alexnet.cuda_fc_forward(f32(rng, 2, 5), f32(rng, 3, 4), f32(rng, 3))
    with pytest.raises(AlexNetError, match="input"):
        alexnet.cuda_fc_backward_weights(f32(rng, 2, 5), f32(rng, 3, 4))


# ---------------------------------------------------------------------------------------
# How the matrix products are launched: tile and split choice from the device
#
# The library reads the SM count and the blocks per SM (occupancy) from the device; the
# CPU runtime answers for an H100 (132 SMs; occupancy as in tests/test_runtime.py, with
# 128 registers a thread). The rule, restated here from its documentation: 128x128
# tiles unless 64x128 (or 128x64) pads at least a quarter less; then the fewest splits of
# the reduction (each >= 128 deep, at most 64) whose blocks fill the waves to >= 90%,
# else the best filling.

SMS = 132
TILE_SHARED = {(128, 128): 34816, (64, 128): 26624, (128, 64): 26624}  # 2 x 16 x (TM+TN+8) floats + tables


def blocks_per_sm(tile_m, tile_n, precision="fp32"):
    """What the CPU runtime's occupancy calculator answers (128 registers a thread): the
    tensor-core kernel has 256 threads and static shared memory, which it does not see."""
    threads, shared = (tile_m * tile_n // 64, TILE_SHARED[tile_m, tile_n]) if precision == "fp32" else (256, 0)
    return min(32, 2048 // threads, 65536 // (threads * 128), 228 * 1024 // (shared + 1024))


def plan_reference(rows, cols, depth, batches, precision="fp32"):
    def tiles(tm, tn):
        return -(-rows // tm) * -(-cols // tn) * batches
    tile = (128, 128)
    wide, tall = tiles(64, 128) * 2, tiles(128, 64) * 2
    if 4 * min(wide, tall) < 3 * tiles(128, 128) * 4:
        tile = (64, 128) if wide <= tall else (128, 64)
    if precision != "fp32" and tile == (64, 128) and 4 * tiles(32, 128) < 3 * tiles(64, 128) * 2:
        tile = (32, 128)
    slots, n = SMS * blocks_per_sm(*tile, precision), tiles(*tile)
    best, best_fill = 1, 0.0
    for s in range(1, min(64, max(1, depth // 128)) + 1):
        fill = n * s / (-(-n * s // slots) * slots)
        if fill > best_fill:
            best, best_fill = s, fill
        if fill >= 0.9:
            break
    slice_k = 32 if precision == "bf16" else 16  # 16 words of one TF32 or two BF16 values
    slices = -(-depth // slice_k)
    per_split = -(-slices // best)
    return dict(tile_m=tile[0], tile_n=tile[1], splits=-(-slices // per_split), tiles=n, slots=slots)


# One tower of the paper's network at batch 128: conv (C, H, K, R, stride, pad), fc (in, out).
TOWER_CONVS = [(3, 224, 48, 11, 4, 0), (48, 27, 128, 5, 1, 2), (256, 13, 192, 3, 1, 1),
               (192, 13, 192, 3, 1, 1), (192, 13, 128, 3, 1, 1)]
TOWER_FCS = [(9216, 2048), (4096, 2048), (4096, 500)]


def gemm_sizes(op, N, C, K, H=1, R=1, stride=1, pad=0):
    """(rows, cols, depth, batches) of each product, from the table in train_alexnet.cu."""
    OH = conv_output_size(H, R, stride, pad)
    phase, taps = -(-H // stride), -(-R // stride)
    return {"conv_forward": (K, N * OH * OH, C * R * R, 1),
            "conv_backward_data": (C, N * phase * phase, K * taps * taps, stride * stride),
            "conv_backward_weights": (K, C * R * R, N * OH * OH, 1),
            "fc_forward": (N, K, C, 1), "fc_backward_data": (N, C, K, 1),
            "fc_backward_weights": (K, C, N, 1)}[op]


def tower_products(N):
    for C, H, K, R, stride, pad in TOWER_CONVS:
        for op in alexnet.GEMM_OPS[:3]:
            yield op, dict(N=N, C=C, K=K, H=H, R=R, stride=stride, pad=pad)
    for fin, fout in TOWER_FCS:
        for op in alexnet.GEMM_OPS[3:]:
            yield op, dict(N=N, C=fin, K=fout)


@pytest.mark.parametrize("precision", alexnet.PRECISIONS)
@pytest.mark.parametrize("N", [128, 2])
def test_gemm_plans_follow_the_rule(N, precision):
    for op, shape in tower_products(N):
        assert alexnet.cuda_gemm_plan(op, **shape, precision=precision) == \
            plan_reference(*gemm_sizes(op, **shape), precision), (op, shape)


def test_small_products_get_small_tensor_core_tiles():
    """conv1's forward product at batch 2 has 48 rows: 64x128 tiles, in every precision; the
    small preset's 8 filters per tower get 32x128 tiles on the tensor cores."""
    for precision in alexnet.PRECISIONS:
        assert alexnet.cuda_gemm_plan("conv_forward", 2, 3, 48, 224, 11, 4, 0, precision)["tile_m"] == 64
    small = dict(N=32, C=3, K=8, H=28, R=5, stride=1, pad=2)
    assert alexnet.cuda_gemm_plan("conv_forward", **small)["tile_m"] == 64
    assert alexnet.cuda_gemm_plan("conv_forward", **small, precision="bf16")["tile_m"] == 32


def test_no_training_product_ends_in_a_mostly_empty_wave():
    """At batch 128, every product of a training step keeps the GPU >= 90% busy over its
    waves of blocks, unless its reduction is too short to split further."""
    for op, shape in tower_products(128):
        plan = alexnet.cuda_gemm_plan(op, **shape)
        rows, cols, depth, batches = gemm_sizes(op, **shape)
        blocks = plan["tiles"] * plan["splits"]
        fill = blocks / (-(-blocks // plan["slots"]) * plan["slots"])
        assert fill >= 0.9 or plan["splits"] >= min(64, depth // 128), (op, shape, plan, fill)


def test_fc6_forward_at_batch_128_is_split_k():
    """16 tiles of 128x128 for 264 resident blocks: the reduction over 9216 inputs is
    split 15 ways, the fewest that fill the wave to 90% (240 blocks, 91%)."""
    plan = alexnet.cuda_gemm_plan("fc_forward", N=128, C=9216, K=2048)
    assert (plan["tile_m"], plan["tile_n"], plan["tiles"], plan["slots"], plan["splits"]) == (128, 128, 16, 264, 15)
