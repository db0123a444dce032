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
"""
import numpy as np
import pytest

import alexnet
from alexnet import (AlexNetError, conv_backward_data, conv_backward_weights, conv_forward,
                     conv_output_size, fc_backward_data, fc_backward_weights, fc_forward)

U = 2.0 ** -24


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

def check_conv(shape, seed=0):
    """Forward (with ReLU), backward data, backward weights and bias: CUDA vs NumPy."""
    N, C, H, W, K, R, S, stride, pad, groups, out_hw = shape
    rng = np.random.default_rng(seed)
    inp, weight, bias = f32(rng, N, C, H, W), f32(rng, K, C // groups, R, S), f32(rng, K)
    args = (stride, pad, groups)
    out = alexnet.cuda_conv_forward(inp, weight, bias, *args, out_hw, relu=True)
    inp64, weight64, bias64 = f64(inp, weight, bias)
    assert_within(out, conv_forward(inp64, weight64, bias64, *args, out_hw, relu=True),
                  conv_forward(abs(inp64), abs(weight64), abs(bias64), *args, out_hw),
                  C // groups * R * S, "conv_forward")

    dout = f32(rng, *out.shape)
    (dout64,) = f64(dout)
    taps = (K // groups) * -(-R // stride) * -(-S // stride)  # products reaching one pixel
    assert_within(alexnet.cuda_conv_backward_data(dout, weight, (H, W), *args),
                  conv_backward_data(dout64, weight64, (H, W), *args),
                  conv_backward_data(abs(dout64), abs(weight64), (H, W), *args), taps,
                  "conv_backward_data")

    dweight, dbias = alexnet.cuda_conv_backward_weights(dout, inp, (R, S), *args)
    ref_dweight, ref_dbias = conv_backward_weights(dout64, inp64, (R, S), *args)
    mag_dweight, mag_dbias = conv_backward_weights(abs(dout64), abs(inp64), (R, S), *args)
    positions = N * out.shape[2] * out.shape[3]
    assert_within(dweight, ref_dweight, mag_dweight, positions, "conv_backward_weights")
    assert_within(dbias, ref_dbias, mag_dbias, positions, "conv bias gradient")


def check_fc(N, n_in, n_out, seed=0):
    rng = np.random.default_rng(seed)
    inp, weight, bias = f32(rng, N, n_in), f32(rng, n_out, n_in), f32(rng, n_out)
    inp64, weight64, bias64 = f64(inp, weight, bias)
    out = alexnet.cuda_fc_forward(inp, weight, bias, relu=True)
    assert_within(out, fc_forward(inp64, weight64, bias64, relu=True),
                  fc_forward(abs(inp64), abs(weight64), abs(bias64)), n_in, "fc_forward")
    dout = f32(rng, N, n_out)
    (dout64,) = f64(dout)
    assert_within(alexnet.cuda_fc_backward_data(dout, weight), fc_backward_data(dout64, weight64),
                  fc_backward_data(abs(dout64), abs(weight64)), n_out, "fc_backward_data")
    dweight, dbias = alexnet.cuda_fc_backward_weights(dout, inp)
    ref_dweight, ref_dbias = fc_backward_weights(dout64, inp64)
    mag_dweight, mag_dbias = fc_backward_weights(abs(dout64), abs(inp64))
    assert_within(dweight, ref_dweight, mag_dweight, N, "fc_backward_weights")
    assert_within(dbias, ref_dbias, mag_dbias, N, "fc bias gradient")


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


def test_cuda_conv_bitwise_deterministic_across_schedules(monkeypatch):
    """The split weight-gradient reduction (conv1's shape: 5 splits) gives the same bits
    whatever order the runtime runs blocks and threads in."""
    shape = ALEXNET_CONVS["conv1"]
    N, C, H, W, K, R, S, stride, pad, groups, (OH, OW) = shape
    rng = np.random.default_rng(7)
    dout, inp = f32(rng, N, K, OH, OW), f32(rng, N, C, H, W)
    results = []
    for order in ["forward", "reverse", "random"]:
        monkeypatch.setenv("CUDA_CPU_SCHEDULE", order)
        results.append(alexnet.cuda_conv_backward_weights(dout, inp, (R, S), stride, pad, groups))
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
        lambda: lib.alexnet_conv_forward(buffer, buffer, buffer, buffer, *dims.values(), 1),
        lambda: lib.alexnet_conv_backward_data(buffer, buffer, buffer, *dims.values()),
        lambda: lib.alexnet_conv_backward_weights(buffer, buffer, buffer, buffer, *dims.values()),
    ]:
        assert call() == 1
        error = ffi.string(lib.alexnet_last_error()).decode()
        assert message in error and "\n" not in error


def test_c_api_rejects_null_pointers():
    ffi, lib = alexnet.library()
    buffer, null = ffi.new("float[]", 4096), ffi.NULL
    dims = GOOD_CONV.values()
    calls = [
        lambda: lib.alexnet_conv_forward(buffer, null, buffer, buffer, *dims, 0),
        lambda: lib.alexnet_conv_forward(buffer, buffer, buffer, null, *dims, 0),
        lambda: lib.alexnet_conv_backward_data(null, buffer, buffer, *dims),
        lambda: lib.alexnet_conv_backward_weights(buffer, null, buffer, buffer, *dims),
        lambda: lib.alexnet_fc_forward(null, buffer, buffer, buffer, 2, 3, 4, 0),
        lambda: lib.alexnet_fc_backward_data(buffer, buffer, null, 2, 3, 4),
        lambda: lib.alexnet_fc_backward_weights(buffer, buffer, buffer, null, 2, 3, 4),
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
    for call in [lambda: lib.alexnet_fc_forward(buffer, buffer, buffer, buffer, *dims, 0),
                 lambda: lib.alexnet_fc_backward_data(buffer, buffer, buffer, *dims),
                 lambda: lib.alexnet_fc_backward_weights(buffer, buffer, buffer, buffer, *dims)]:
        assert call() == 1
        assert message in ffi.string(lib.alexnet_last_error()).decode()


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


def blocks_per_sm(tile_m, tile_n):
    threads = tile_m * tile_n // 64
    return min(32, 2048 // threads, 65536 // (threads * 128), 228 * 1024 // (TILE_SHARED[tile_m, tile_n] + 1024))


def plan_reference(rows, cols, depth, batches):
    def tiles(tm, tn):
        return -(-rows // tm) * -(-cols // tn) * batches
    tile = (128, 128)
    wide, tall = tiles(64, 128) * 2, tiles(128, 64) * 2
    if 4 * min(wide, tall) < 3 * tiles(128, 128) * 4:
        tile = (64, 128) if wide <= tall else (128, 64)
    slots, n = SMS * blocks_per_sm(*tile), tiles(*tile)
    best, best_fill = 1, 0.0
    for s in range(1, min(64, max(1, depth // 128)) + 1):
        fill = n * s / (-(-n * s // slots) * slots)
        if fill > best_fill:
            best, best_fill = s, fill
        if fill >= 0.9:
            break
    slices = -(-depth // 16)
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


@pytest.mark.parametrize("N", [128, 2])
def test_gemm_plans_follow_the_rule(N):
    for op, shape in tower_products(N):
        assert alexnet.cuda_gemm_plan(op, **shape) == plan_reference(*gemm_sizes(op, **shape)), (op, shape)


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
