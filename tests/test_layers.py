"""Layers other than conv/fc: the CUDA kernels (CPU build, through the C API) against the
NumPy twins in alexnet.py, and the NumPy backward passes against float64 finite differences.

Tolerances follow from the accumulation length: a float32 sum of L terms is off by at most
about L * 2^-24 * sum|terms| (EPS below); each test says which L applies. Where the kernel
and NumPy do the same float32 operations in the same order (ReLU, pooling, dropout masks)
the results must be identical.
"""
import numpy as np
import pytest

import alexnet as A
from alexnet import AlexNetError

EPS = 2.0 ** -24  # float32 unit roundoff

# AlexNet's LRN: size 5, alpha 1e-4 (divided by size in the formula), beta 0.75, k 2.
PAPER_LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
# A much stronger normalisation, so that a wrong window or a wrong second term in the
# backward pass moves the result far beyond the tolerance.
STRONG_LRN = dict(size=5, alpha=2.0, beta=0.75, k=1.0)

# Both schedules of the CPU runtime for the bigger cases (all three for the small ones).
TWO_SCHEDULES = pytest.mark.parametrize("schedule", ["forward", "random"], indirect=True)


@pytest.fixture
def rng():
    return np.random.default_rng(2012)


def finite_differences(f, x, h=1e-6):
    """Centred differences of the scalar f at x (float64)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        grad[i] = (f(xp) - f(xm)) / (2 * h)
    return grad


def assert_within(actual, expected, bound, what):
    """|actual - expected| <= bound elementwise (bound: array or scalar)."""
    err = np.abs(actual.astype(np.float64) - expected)
    excess = err - bound
    worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.ndim else ()
    assert np.all(excess <= 0), (f"{what}: error {err[worst]:.3g} exceeds bound {np.broadcast_to(bound, err.shape)[worst]:.3g} "
                                 f"at {worst}")


# -----------------------------------------------------------------------------
# Philox and dropout

# Random123's known-answer vectors for Philox4x32-10 (its tests/kat_vectors).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert list(A.philox4x32(counter, key)) == list(expected)
    assert list(A.cuda_philox4x32(counter, key)) == list(expected)


def test_philox_numpy_matches_library_on_random_inputs(rng):
    counters = rng.integers(0, 2 ** 32, size=(64, 4), dtype=np.uint64)
    keys = rng.integers(0, 2 ** 32, size=(64, 2), dtype=np.uint64)
    expected = A.philox4x32(counters, keys)
    for c, k, e in zip(counters, keys, expected):
        assert np.array_equal(A.cuda_philox4x32(c, k), e)


SEED, LAYER, STEP = 0x1234_5678_9ABC, 7, (5 << 32) + 11  # high words in use too


def test_dropout_kernel_follows_the_documented_rule():
    """The kernel's mask, element by element, from single Philox calls of the host path:
    element i keeps iff (word >> 8) * 2^-24 >= p, word = philox((i/4, layer, step lo, step hi),
    (seed lo, seed hi))[i % 4]."""
    n, p = 4099, 0.5
    kept = A.cuda_dropout_forward(np.ones(n, np.float32), p, SEED, LAYER, STEP, train=True) == 1
    for i in [0, 1, 2, 3, 4, 5, 1000, 2047, 4095, 4096, 4098]:
        word = A.cuda_philox4x32([i // 4, LAYER, STEP & 0xFFFFFFFF, STEP >> 32], [SEED & 0xFFFFFFFF, SEED >> 32])[i % 4]
        assert kept[i] == ((int(word) >> 8) * 2.0 ** -24 >= p), i


@pytest.mark.parametrize("shape", [(2, 2048), (13,), (1,), (3, 5, 7)])
def test_dropout_matches_numpy(schedule, rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    for p in (0.5, 0.1):
        out = A.cuda_dropout_forward(x, p, SEED, LAYER, STEP, train=True)
        assert np.array_equal(out, A.dropout_forward(x, p, SEED, LAYER, STEP, train=True))
        dout = rng.standard_normal(shape).astype(np.float32)
        dinp = A.cuda_dropout_backward(dout, p, SEED, LAYER, STEP)
        assert np.array_equal(dinp, A.dropout_backward(dout, p, SEED, LAYER, STEP))
        assert np.array_equal(dinp == 0, out == 0)  # same mask in both passes (x, dout have no zeros)
        # test time: every unit scaled by 1 - p, one float32 multiplication on both sides
        assert np.array_equal(A.cuda_dropout_forward(x, p, SEED, LAYER, STEP, train=False),
                              A.dropout_forward(x, p, SEED, LAYER, STEP, train=False))


def test_dropout_mask_statistics():
    """Keep rate 1 - p and independence across layers, steps and seeds, within 5 standard
    deviations of a binomial count over n = 2*2048*128 (one AlexNet batch of fc6)."""
    n = 2 * 2048 * 128
    for p in (0.5, 0.1, 0.9):
        kept = A.dropout_mask(n, p, SEED, LAYER, STEP).sum()
        assert abs(kept - n * (1 - p)) < 5 * np.sqrt(n * p * (1 - p)), p
    base = A.dropout_mask(n, 0.5, SEED, LAYER, STEP)
    for other in [A.dropout_mask(n, 0.5, SEED, LAYER + 1, STEP), A.dropout_mask(n, 0.5, SEED, LAYER, STEP + 1),
                  A.dropout_mask(n, 0.5, SEED + 1, LAYER, STEP), A.dropout_mask(n, 0.5, SEED, LAYER, STEP + (1 << 32))]:
        agree = (base == other).sum()
        assert abs(agree - n / 2) < 5 * np.sqrt(n / 4)
    assert A.dropout_mask(n, 0.0, SEED, LAYER, STEP).all()


# -----------------------------------------------------------------------------
# ReLU

@pytest.mark.parametrize("shape", [(2, 48, 55, 55), (2, 4096), (1, 1, 1, 1), (3, 5, 7)])
def test_relu_matches_numpy(schedule, rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    x.flat[::7] = 0.0  # the boundary: ReLU'(0) = 0
    out = A.cuda_relu_forward(x)
    assert np.array_equal(out, A.relu_forward(x))
    dout = rng.standard_normal(shape).astype(np.float32)
    assert np.array_equal(A.cuda_relu_backward(dout, out), A.relu_backward(dout, out))


# -----------------------------------------------------------------------------
# Local response normalisation

def lrn_forward_bounds(x, out64, scale64, size, alpha, beta, k):
    """Error bounds (out, scale) of the kernel's float32 forward. The sliding window sum of squares
    takes 2C additions/subtractions, each off by <= EPS * (largest window sum at that pixel);
    then k + alpha/size * sum (2 roundings of scale), powf (~2 ulp) and the product."""
    C = x.shape[1]
    window_max = A._lrn_window_sum(x * x, size // 2, (size - 1) // 2).max(axis=1, keepdims=True)
    dscale = alpha / size * (2 * C + 2) * EPS * window_max + 2 * EPS * scale64
    dout_bound = np.abs(out64) * (beta * dscale / scale64 + 4 * EPS)
    return 2 * dout_bound, 2 * dscale  # safety factor 2


def lrn_backward_bound(x, dout, out, scale, size, alpha, beta):
    """Error bound of the kernel's float32 backward: the first term (powf and a product) to
    ~4 ulp; the sliding sum of r = dout*out/scale over 2C terms, each r to 3 ulp, off by
    <= (2C + 3) EPS * (largest window sum of |r| at that pixel); then ~8 roundings of the
    second term's products and the final difference."""
    C = x.shape[1]
    r_abs = np.abs(dout * out / scale)
    window = A._lrn_window_sum(r_abs, (size - 1) // 2, size // 2)
    first = np.abs(dout) * scale ** -beta
    second = 2 * alpha * beta / size * np.abs(x)
    bound = 4 * EPS * first + second * ((2 * C + 3) * EPS * window.max(axis=1, keepdims=True) + 8 * EPS * window)
    return 2 * bound  # safety factor 2


def check_lrn(rng, shape, params, amplitude):
    x = (amplitude * rng.standard_normal(shape)).astype(np.float32)
    x64 = x.astype(np.float64)
    out64, scale64 = A.lrn_forward(x64, **params)
    out, scale = A.cuda_lrn_forward(x, **params)
    out_bound, scale_bound = lrn_forward_bounds(x64, out64, scale64, **params)
    assert_within(scale, scale64, scale_bound, "lrn scale")
    assert_within(out, out64, out_bound, "lrn out")

    dout = rng.standard_normal(shape).astype(np.float32)
    dinp = A.cuda_lrn_backward(dout, x, out, scale, **params)
    # reference: float64 arithmetic on the kernel's own float32 inputs
    dout64, out32, scale32 = (a.astype(np.float64) for a in (dout, out, scale))
    expected = A.lrn_backward(dout64, x64, out32, scale32, **params)
    bound = lrn_backward_bound(x64, dout64, out32, scale32, params["size"], params["alpha"], params["beta"])
    assert_within(dinp, expected, bound, "lrn dinp")


@TWO_SCHEDULES
@pytest.mark.parametrize("shape", [(2, 48, 55, 55), (2, 128, 27, 27)])
def test_lrn_alexnet_shapes(schedule, rng, shape):
    # amplitude 30: typical early ReLU outputs, where the paper's normalisation bites (~3%)
    check_lrn(rng, shape, PAPER_LRN, amplitude=30.0)


@pytest.mark.parametrize("shape,size", [((1, 1, 1, 1), 5), ((1, 3, 5, 7), 5), ((2, 7, 3, 4), 5),
                                        ((2, 7, 3, 4), 4), ((1, 6, 2, 3), 1), ((1, 4, 3, 3), 9)])
def test_lrn_awkward_shapes(schedule, rng, shape, size):
    check_lrn(rng, shape, dict(STRONG_LRN, size=size), amplitude=2.0)


@pytest.mark.parametrize("shape,size", [((2, 7, 3, 2), 5), ((1, 6, 2, 2), 4), ((1, 1, 2, 3), 5), ((1, 3, 1, 2), 9)])
def test_lrn_backward_matches_finite_differences(rng, shape, size):
    params = dict(STRONG_LRN, size=size)
    x = 2 * rng.standard_normal(shape)
    dout = rng.standard_normal(shape)
    out, scale = A.lrn_forward(x, **params)
    grad = A.lrn_backward(dout, x, out, scale, **params)
    numeric = finite_differences(lambda z: (A.lrn_forward(z, **params)[0] * dout).sum(), x)
    # centred differences: truncation O(h^2 f''') ~ 1e-12, rounding ~ 1e-16 * |f| / h ~ 1e-9
    np.testing.assert_allclose(grad, numeric, rtol=0, atol=1e-7)


# -----------------------------------------------------------------------------
# Response normalisation within a map (the authors' 2012 code, after conv2's LRN)

# cuda-convnet's cnorm2 layer: 5x5 window, alpha 1e-3 (divided by 25), beta 0.75, k 1.
CODE_2012_SPATIAL = dict(size=5, alpha=1e-3, beta=0.75, k=1.0)
STRONG_SPATIAL = dict(size=5, alpha=20.0, beta=0.75, k=1.0)


def spatial_norm_bounds(x, dout, out, scale, size, alpha, beta):
    """Error bounds (out, scale, dinp) of the kernels: as for the LRN, with a window sum of at most
    size^2 terms in place of the sliding sum over 2C (the kernels sum every window afresh)."""
    terms, area = size * size, size * size
    window_max = A._spatial_window_sum(x * x, size // 2, (size - 1) // 2)
    dscale = alpha / area * (terms + 2) * EPS * window_max + 2 * EPS * scale
    out_bound = np.abs(out) * (beta * dscale / scale + 4 * EPS)
    window_r = A._spatial_window_sum(np.abs(dout * out / scale), (size - 1) // 2, size // 2)
    dinp_bound = (4 * EPS * np.abs(dout) * scale ** -beta
                  + 2 * alpha * beta / area * np.abs(x) * (terms + 11) * EPS * window_r)
    return 2 * out_bound, 2 * dscale, 2 * dinp_bound  # safety factor 2


def check_spatial_norm(rng, shape, params, amplitude):
    x = (amplitude * rng.standard_normal(shape)).astype(np.float32)
    x64 = x.astype(np.float64)
    out64, scale64 = A.spatial_norm_forward(x64, **params)
    out, scale = A.cuda_spatial_norm_forward(x, **params)
    dout = rng.standard_normal(shape).astype(np.float32)
    dinp = A.cuda_spatial_norm_backward(dout, x, out, scale, **params)
    # backward reference: float64 arithmetic on the kernel's own float32 inputs
    dout64, out32, scale32 = (a.astype(np.float64) for a in (dout, out, scale))
    expected = A.spatial_norm_backward(dout64, x64, out32, scale32, **params)
    out_bound, scale_bound, dinp_bound = spatial_norm_bounds(x64, dout64, out32, scale32, params["size"],
                                                             params["alpha"], params["beta"])
    assert_within(scale, scale64, scale_bound, "spatial norm scale")
    assert_within(out, out64, out_bound, "spatial norm out")
    assert_within(dinp, expected, dinp_bound, "spatial norm dinp")


@TWO_SCHEDULES
def test_spatial_norm_conv2_shape(schedule, rng):
    # conv2's maps after the LRN, one tower: amplitude 30, where 1e-3/25 * sum a^2 is ~0.9
    check_spatial_norm(rng, (2, 128, 27, 27), CODE_2012_SPATIAL, amplitude=30.0)


@pytest.mark.parametrize("shape,size", [((1, 1, 1, 1), 5), ((1, 3, 5, 7), 5), ((2, 2, 3, 4), 4),
                                        ((1, 2, 6, 2), 1), ((1, 1, 4, 9), 9), ((1, 2, 110, 111), 5)])
def test_spatial_norm_awkward_shapes(schedule, rng, shape, size):
    check_spatial_norm(rng, shape, dict(STRONG_SPATIAL, size=size), amplitude=0.5)


def test_spatial_norm_window_is_clipped_not_renormalised():
    """One non-zero pixel a at (1, 0): every pixel whose 5x5 window holds it gets scale
    k + alpha/25 * a^2 (the clipped window at the border is not rescaled); the others get k."""
    x = np.zeros((1, 1, 6, 7), np.float32)
    x[0, 0, 1, 0] = 3.0
    out, scale = A.cuda_spatial_norm_forward(x, 5, 10.0, 0.75, 1.0)
    expected = np.ones((6, 7))
    expected[0:4, 0:3] = 1 + 10.0 / 25 * 9
    np.testing.assert_allclose(scale[0, 0], expected, rtol=1e-6)
    assert out[0, 0, 1, 0] == pytest.approx(3.0 * (1 + 10.0 / 25 * 9) ** -0.75, rel=1e-6)


@pytest.mark.parametrize("shape,size", [((1, 2, 4, 5), 5), ((1, 1, 3, 4), 4), ((2, 1, 2, 3), 3), ((1, 1, 5, 5), 9)])
def test_spatial_norm_backward_matches_finite_differences(rng, shape, size):
    params = dict(STRONG_SPATIAL, size=size)
    x = rng.standard_normal(shape)
    dout = rng.standard_normal(shape)
    out, scale = A.spatial_norm_forward(x, **params)
    grad = A.spatial_norm_backward(dout, x, out, scale, **params)
    numeric = finite_differences(lambda z: (A.spatial_norm_forward(z, **params)[0] * dout).sum(), x)
    np.testing.assert_allclose(grad, numeric, rtol=0, atol=1e-7)


# -----------------------------------------------------------------------------
# Max pooling

@pytest.mark.parametrize("shape,size,stride,out_size", [
    ((2, 3, 7, 7), 3, 2, None),      # overlapping, as in AlexNet
    ((1, 2, 9, 8), 2, 3, None),      # gaps between windows
    ((1, 1, 8, 10), 3, 2, (4, 5)),   # last windows overhang the bottom/right edge
])
def test_maxpool_backward_matches_finite_differences(rng, shape, size, stride, out_size):
    x = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float64)  # distinct: no ties
    OH, OW = out_size or (A.pool_output_size(shape[2], size, stride), A.pool_output_size(shape[3], size, stride))
    dout = rng.standard_normal((shape[0], shape[1], OH, OW))
    grad = A.maxpool_backward(dout, x, size, stride)
    numeric = finite_differences(lambda z: (A.maxpool_forward(z, size, stride, OH, OW) * dout).sum(), x, h=1e-3)
    # piecewise linear and values 1 apart: the differences are exact up to rounding
    np.testing.assert_allclose(grad, numeric, rtol=0, atol=1e-9)


def check_maxpool(rng, shape, size, stride, out_size=None, levels=3):
    """Integer inputs from a few levels: many ties, which must go to the first maximum.
    Forward copies values and backward adds in the same (oy, ox) order as NumPy: identical."""
    x = rng.integers(-levels, levels + 1, size=shape).astype(np.float32)
    OH, OW = out_size or (None, None)
    out = A.cuda_maxpool_forward(x, size, stride, OH, OW)
    assert np.array_equal(out, A.maxpool_forward(x, size, stride, OH, OW))
    dout = rng.standard_normal(out.shape).astype(np.float32)
    assert np.array_equal(A.cuda_maxpool_backward(dout, x, size, stride), A.maxpool_backward(dout, x, size, stride))


@TWO_SCHEDULES
@pytest.mark.parametrize("shape", [(2, 48, 55, 55), (2, 128, 27, 27), (2, 128, 13, 13)])
def test_maxpool_alexnet_shapes(schedule, rng, shape):
    check_maxpool(rng, shape, 3, 2)


@pytest.mark.parametrize("shape,size,stride,out_size", [
    ((1, 1, 5, 5), 3, 2, None), ((1, 2, 8, 10), 3, 2, (4, 5)), ((3, 1, 4, 4), 1, 1, None),
    ((1, 2, 9, 9), 2, 3, None), ((2, 3, 7, 9), 3, 2, None), ((1, 1, 3, 3), 3, 3, None)])
def test_maxpool_awkward_shapes(schedule, rng, shape, size, stride, out_size):
    check_maxpool(rng, shape, size, stride, out_size, levels=1)


def test_maxpool_ties_go_to_the_first_maximum(schedule):
    """All-equal 3x3 windows, stride 2 on 5x5: each window's gradient lands on its top-left pixel."""
    x = np.zeros((1, 1, 5, 5), np.float32)
    dout = np.array([[[[1, 2], [3, 4]]]], np.float32)
    expected = np.zeros_like(x)
    expected[0, 0, ::2, ::2][:2, :2] = dout[0, 0]
    assert np.array_equal(A.cuda_maxpool_backward(dout, x, 3, 2), expected)
    assert np.array_equal(A.maxpool_backward(dout, x, 3, 2), expected)


# -----------------------------------------------------------------------------
# Softmax and cross-entropy

def test_softmax_cross_entropy_gradient_matches_finite_differences(rng):
    logits = 3 * rng.standard_normal((3, 7))
    labels = np.array([0, 6, 3])
    _, grad, _ = A.softmax_cross_entropy(logits, labels)
    numeric = finite_differences(lambda z: A.softmax_cross_entropy(z, labels)[0].mean(), logits)
    np.testing.assert_allclose(grad, numeric, rtol=0, atol=1e-8)


def test_topk_rank_is_the_position_in_a_stable_descending_sort(rng):
    logits = rng.integers(0, 4, size=(50, 9)).astype(np.float64)  # many ties
    labels = rng.integers(0, 9, size=50)
    positions = [list(np.argsort(-row, kind="stable")).index(label) for row, label in zip(logits, labels)]
    assert list(A.topk_rank(logits, labels)) == positions


def softmax_bounds(logits, probs):
    """The kernel's float32 errors. exp(x - m) is off by ~2 ulp plus EPS * |x - m| (the rounding
    of x - m), so the sum of K of them by <= (K + 2 + spread) EPS relative, spread = max - min of
    the row: that much absolute in log(sum), and (K + 4 + spread) EPS relative in each
    probability. The loss adds roundings of the size of m and x[label]."""
    K = logits.shape[1]
    spread = (logits.max(axis=1) - logits.min(axis=1))
    relative = (K + 4 + spread) * EPS
    m = np.abs(logits).max(axis=1)
    return 2 * relative[:, None] * probs, 2 * (relative + 4 * EPS * (m + np.log(K) + 1))


def check_softmax(logits, labels):
    logits64 = logits.astype(np.float64)
    losses64, dlogits64, correct64 = A.softmax_cross_entropy(logits64, labels)
    probs64 = A.softmax_forward(logits64)
    prob_bound, loss_bound = softmax_bounds(logits64, probs64)
    losses, dlogits, correct = A.cuda_softmax_cross_entropy(logits, labels)
    assert np.array_equal(correct, correct64)
    assert_within(losses, losses64, loss_bound, "loss")
    N = logits.shape[0]
    assert_within(dlogits, dlogits64, prob_bound / N + 2 * EPS * np.abs(dlogits64), "dlogits")
    assert_within(A.cuda_softmax_forward(logits), probs64, prob_bound, "probs")


@TWO_SCHEDULES
def test_softmax_alexnet_shape(schedule, rng):
    logits = (4 * rng.standard_normal((2, 1000))).astype(np.float32)
    check_softmax(logits, np.array([17, 999]))
    # a label among the top 5 but not the top 1, and the top 1
    order = np.argsort(-logits, axis=1)
    check_softmax(logits, np.array([order[0, 3], order[1, 0]]))


@pytest.mark.parametrize("N,K", [(1, 1), (3, 3), (5, 7), (2, 1000), (1, 257)])
def test_softmax_awkward_shapes_and_ties(schedule, rng, N, K):
    labels = rng.integers(0, K, size=N)
    check_softmax((3 * rng.standard_normal((N, K))).astype(np.float32), labels)
    check_softmax(rng.integers(0, 3, size=(N, K)).astype(np.float32), labels)  # ties in the ranking
    check_softmax((1e4 + rng.standard_normal((N, K))).astype(np.float32), labels)  # exp would overflow unshifted


def test_softmax_topk_counts_by_hand(schedule):
    logits = np.array([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.float32)
    # ranks: 0 (top-1), 5 (miss), 0 (tie, lowest class), 4 (tie: four lower classes first)
    _, _, correct = A.cuda_softmax_cross_entropy(logits, np.array([5, 0, 0, 4]))
    assert list(correct) == [2, 3]


def test_nan_logits_never_count_as_correct(schedule):
    """A NaN compares false with everything, which would rank the label first; a row with a
    NaN anywhere counts as wrong, in the kernel and in NumPy alike, and its loss is NaN."""
    logits = np.array([[np.nan] * 6, [0, 1, 2, 3, 4, 5], [0, 1, np.nan, 3, 4, 5], [5, 4, 3, 2, 1, 0]], np.float32)
    labels = np.array([0, 5, 5, 0])  # without the NaN rule: all four top-1 correct
    losses, _, correct = A.cuda_softmax_cross_entropy(logits, labels)
    assert list(correct) == [2, 2]
    assert list(np.isnan(losses)) == [True, False, True, False]
    _, _, numpy_correct = A.softmax_cross_entropy(logits.astype(np.float64), labels)
    assert list(numpy_correct) == [2, 2]
    assert list(A.topk_rank(logits, labels) == A.NAN_RANK) == [True, False, True, False]


# -----------------------------------------------------------------------------
# SGD

@pytest.mark.parametrize("n,weight_decay", [(2 * 2048 + 3, 0.0005), (1, 0.0005), (4096, 0.0)])
def test_sgd_update_matches_numpy(schedule, rng, n, weight_decay):
    w = (0.01 * rng.standard_normal(n)).astype(np.float32)
    v = (0.001 * rng.standard_normal(n)).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    lr, momentum = 0.01, 0.9
    w1, v1 = A.cuda_sgd_update(w, v, g, lr, momentum, weight_decay)
    w64, v64, g64 = (a.astype(np.float64) for a in (w, v, g))
    decay = float(np.float32(weight_decay) * np.float32(lr))  # the kernel's coefficient
    v_expected = momentum * v64 - decay * w64 - lr * g64
    # 3 products and 2 differences, each to 1 ulp of the terms' size (constants rounded to
    # float32 too: another ulp each); then w + v
    terms = np.abs(momentum * v64) + np.abs(decay * w64) + np.abs(lr * g64)
    assert_within(v1, v_expected, 2 * 6 * EPS * terms, "v")
    assert_within(w1, w64 + v_expected, 2 * (6 * EPS * terms + EPS * np.abs(w64 + v_expected)), "w")
    w2, v2 = A.sgd_update(w, v, g, lr, momentum, weight_decay)
    assert_within(w1, w2.astype(np.float64), 2 * 6 * EPS * (terms + np.abs(w64)), "w against the float32 twin")


# -----------------------------------------------------------------------------
# Data augmentation

def pca_lighting(rng):
    """Eigen-decomposition of a plausible RGB covariance, like the dataset's stats."""
    a = rng.standard_normal((3, 3))
    eigval, eigvec = np.linalg.eigh(a @ a.T * 1000 + 100 * np.eye(3))
    return eigval.astype(np.float32), eigvec.astype(np.float32)


def check_augment(rng, N, H, W, crop, offsets, flips, centre_mean=False, divisor=1.0):
    images = rng.integers(0, 256, size=(N, H, W, 3), dtype=np.uint8)
    mean = rng.uniform(0, 255, size=(H, W, 3)).astype(np.float32)
    alphas = rng.normal(0, 0.1, size=(N, 3)).astype(np.float32)
    eigval, eigvec = pca_lighting(rng)
    offsets, flips = np.array(offsets, np.int32), np.array(flips, np.uint8)
    out = A.cuda_augment_images(images, mean, offsets, flips, alphas, eigval, eigvec, crop, centre_mean, divisor)
    expected = A.augment_images(images, mean, offsets, flips, alphas, eigval, eigvec, crop, centre_mean, divisor)
    # pixel - mean is one rounding of a number below 256; the lighting is a 3-term sum of
    # 2-factor products (~6 ulp of its terms); plus the final addition and the division
    light_terms = np.abs(alphas * eigval) @ np.abs(eigvec).T
    bound = 2 * (EPS * 512 + 6 * EPS * light_terms[:, :, None, None] + 2 * EPS * np.abs(expected))
    assert_within(out, expected.astype(np.float64), bound, "augment")
    # without mean and lighting the output is the crop itself, exactly
    zero_mean, zero_alphas = np.zeros_like(mean), np.zeros_like(alphas)
    plain = A.cuda_augment_images(images, zero_mean, offsets, flips, zero_alphas, eigval, eigvec, crop)
    for n, ((oy, ox), flip) in enumerate(zip(offsets, flips)):
        patch = images[n, oy:oy + crop, ox:ox + crop].transpose(2, 0, 1)
        assert np.array_equal(plain[n], patch[:, :, ::-1] if flip else patch), n


@TWO_SCHEDULES
def test_augment_alexnet_shape(schedule, rng):
    check_augment(rng, 2, 256, 256, 224, offsets=[(0, 32), (17, 5)], flips=[1, 0])


def test_augment_2012_code_mean_and_divisor(schedule, rng):
    """The 2012 code subtracts the mean image's centre crop at the output pixel (it does not move
    or mirror with the crop) and divides the crop by 1.1 while colour noise is on. A mean image
    that varies with x and y makes the placement visible."""
    check_augment(rng, 3, 9, 11, 5, offsets=[(0, 0), (4, 6), (1, 3)], flips=[0, 1, 1], centre_mean=True, divisor=1.1)
    images = rng.integers(0, 256, size=(2, 9, 11, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:9, 0:11]
    mean = np.stack([yy * 20.0, xx * 7.0, yy + xx], axis=2).astype(np.float32)
    offsets, flips = np.array([(0, 6), (4, 1)], np.int32), np.array([1, 0], np.uint8)
    out = A.cuda_augment_images(images, mean, offsets, flips, np.zeros((2, 3)), np.zeros(3), np.eye(3), 5, True, 1.1)
    for n in range(2):
        oy, ox = offsets[n]
        for y in range(5):
            for x in range(5):
                sx = ox + (4 - x if flips[n] else x)
                want = (images[n, oy + y, sx].astype(np.float64) - mean[2 + y, 3 + x]) / 1.1
                np.testing.assert_allclose(out[n, :, y, x], want, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("N,H,W,crop,offsets,flips", [
    (1, 5, 7, 3, [(2, 4)], [1]), (3, 4, 6, 4, [(0, 0), (0, 2), (0, 1)], [0, 1, 1]), (1, 1, 1, 1, [(0, 0)], [1])])
def test_augment_awkward_shapes(schedule, rng, N, H, W, crop, offsets, flips):
    check_augment(rng, N, H, W, crop, offsets, flips)


# -----------------------------------------------------------------------------
# Bad arguments: an error code and a one-line message, never a crash

def raw(name, *args):
    """Call lib.alexnet_<name> directly (NULL pointers, negative sizes) and raise on error."""
    ffi, lib = A.library()
    A._check(getattr(lib, "alexnet_" + name)(*args))


def test_bad_arguments_are_reported():
    ffi, _ = A.library()
    buf = np.zeros(4096, np.float32)
    f = A._ptr(buf)
    ints = A._ptr(np.zeros(16, np.int32), "int")
    bytes_ = A._ptr(np.zeros(4096, np.uint8), "uint8_t")
    NULL = ffi.NULL
    x4 = np.zeros((1, 2, 5, 5), np.float32)
    cases = [
        (lambda: raw("philox4x32", NULL, A._ptr(np.zeros(4, np.uint32), "uint32_t"), A._ptr(np.zeros(2, np.uint32), "uint32_t")), "out is NULL"),
        (lambda: raw("relu_forward", NULL, f, 4), "out is NULL"),
        (lambda: raw("relu_forward", f, f, 0), "element count must be positive"),
        (lambda: raw("relu_backward", f, f, NULL, 4), "out is NULL"),
        (lambda: raw("relu_backward", f, f, f, -3), "element count must be positive"),
        (lambda: raw("lrn_forward", f, NULL, f, 1, 2, 5, 5, 5, 1e-4, 0.75, 2.0), "scale is NULL"),
        (lambda: raw("lrn_forward", f, f, f, 1, -2, 5, 5, 5, 1e-4, 0.75, 2.0), "sizes must be positive"),
        (lambda: raw("lrn_forward", f, f, f, 1, 2, 5, 5, 0, 1e-4, 0.75, 2.0), "window size"),
        (lambda: A.cuda_lrn_forward(x4, 5, 1e-4, 0.75, 0.0), "k > 0"),
        (lambda: A.cuda_lrn_forward(x4, 5, -1.0, 0.75, 2.0), "alpha >= 0"),
        (lambda: raw("lrn_backward", f, f, f, f, NULL, 1, 2, 5, 5, 5, 1e-4, 0.75, 2.0), "scale is NULL"),
        (lambda: raw("lrn_backward", f, f, f, f, f, 0, 2, 5, 5, 5, 1e-4, 0.75, 2.0), "sizes must be positive"),
        (lambda: raw("spatial_norm_forward", f, NULL, f, 1, 2, 5, 5, 5, 1e-3, 0.75, 1.0), "scale is NULL"),
        (lambda: raw("spatial_norm_forward", f, f, f, 1, 2, 5, 5, 0, 1e-3, 0.75, 1.0), "window size"),
        (lambda: raw("spatial_norm_forward", f, f, f, 1, 1, 200, 200, 5, 1e-3, 0.75, 1.0), "does not fit in shared"),
        (lambda: A.cuda_spatial_norm_forward(x4, 5, 1e-3, 0.75, 0.0), "k > 0"),
        (lambda: raw("spatial_norm_backward", f, f, f, f, NULL, 1, 2, 5, 5, 5, 1e-3, 0.75, 1.0), "scale is NULL"),
        (lambda: raw("spatial_norm_backward", f, f, f, f, f, 1, 0, 5, 5, 5, 1e-3, 0.75, 1.0), "sizes must be positive"),
        (lambda: raw("maxpool_forward", NULL, f, 1, 2, 5, 5, 3, 2, 2, 2), "out is NULL"),
        (lambda: A.cuda_maxpool_forward(x4, 6, 2), "size <= H"),
        (lambda: A.cuda_maxpool_forward(x4, 3, 0, 2, 2), "stride > 0"),
        (lambda: A.cuda_maxpool_forward(x4, 3, 2, 4, 2), "output 4x2 does not fit"),
        (lambda: raw("maxpool_backward", f, f, f, 1, 2, 5, 5, 3, 2, 2, 0), "output 2x0 does not fit"),
        (lambda: raw("maxpool_backward", f, NULL, f, 1, 2, 5, 5, 3, 2, 2, 2), "dout is NULL"),
        (lambda: A.cuda_dropout_forward(buf, 1.0, 1, 0, 0, True), r"drop probability must be in \[0, 1\)"),
        (lambda: A.cuda_dropout_forward(buf, -0.1, 1, 0, 0, False), "drop probability"),
        (lambda: A.cuda_dropout_backward(buf, float("nan"), 1, 0, 0), "drop probability"),
        (lambda: raw("dropout_backward", NULL, f, 4, 0.5, 1, 0, 0), "dinp is NULL"),
        (lambda: raw("dropout_forward", f, f, 0, 0.5, 1, 0, 0, 1), "element count"),
        (lambda: A.cuda_softmax_cross_entropy(np.zeros((2, 5)), [0, 5]), r"label 5 of row 1 is not in \[0, 5\)"),
        (lambda: A.cuda_softmax_cross_entropy(np.zeros((2, 5)), [-1, 0]), "label -1 of row 0"),
        (lambda: raw("softmax_cross_entropy", f, NULL, NULL, f, NULL, 2, 5), "labels is NULL"),
        (lambda: raw("softmax_cross_entropy", f, NULL, NULL, f, ints, 2, 0), "positive batch and class count"),
        (lambda: raw("softmax_forward", f, NULL, 2, 5), "logits is NULL"),
        (lambda: raw("softmax_forward", f, f, -1, 5), "positive batch"),
        (lambda: raw("sgd_update", f, f, NULL, 4, 0.01, 0.9, 0.0005), "g is NULL"),
        (lambda: raw("sgd_update", f, f, f, 0, 0.01, 0.9, 0.0005), "element count"),
        (lambda: A.cuda_sgd_update(buf, buf, buf, float("nan"), 0.9, 0.0005), "must be finite"),
        (lambda: raw("augment_images", f, bytes_, NULL, ints, bytes_, f, f, f, 1, 8, 8, 4, 0, 1.0), "mean is NULL"),
        (lambda: raw("augment_images", f, bytes_, f, ints, bytes_, f, f, f, 1, 8, 8, 9, 0, 1.0), "crop 9 is larger than the 8x8 image"),
        (lambda: raw("augment_images", f, bytes_, f, ints, bytes_, f, f, f, 0, 8, 8, 4, 0, 1.0), "sizes must be positive"),
        (lambda: raw("augment_images", f, bytes_, f, ints, bytes_, f, f, f, 1, 8, 8, 4, 1, 0.0), "divisor must be positive"),
    ]
    images = np.zeros((2, 8, 8, 3), np.uint8)
    mean, alphas, eigval, eigvec = np.zeros((8, 8, 3)), np.zeros((2, 3)), np.ones(3), np.eye(3)
    for offsets, flips, message in [([(0, 0), (5, 0)], [0, 0], r"image 1: a 4 crop at offset \(5, 0\) leaves"),
                                    ([(0, -1), (0, 0)], [0, 0], r"image 0: a 4 crop at offset \(0, -1\)"),
                                    ([(0, 0), (4, 4)], [0, 2], "image 1: flip must be 0 or 1")]:
        cases.append((lambda o=offsets, fl=flips: A.cuda_augment_images(images, mean, o, fl, alphas, eigval, eigvec, 4), message))
    # the bindings check what the C API cannot see: that the arrays agree in shape
    x = np.zeros((1, 2, 5, 5), np.float32)
    cases += [
        (lambda: A.cuda_relu_backward(np.zeros(4), np.zeros(5)), r"relu_backward: out has shape \(5,\), expected \(4,\)"),
        (lambda: A.cuda_lrn_forward(np.zeros((2, 5)), 5, 1e-4, 0.75, 2.0), "expected an N x C x H x W array"),
        (lambda: A.cuda_lrn_backward(x, x, x, x[:, :1], 5, 1e-4, 0.75, 2.0), "lrn_backward: scale has shape"),
        (lambda: A.cuda_maxpool_backward(np.zeros((1, 3, 2, 2)), x, 3, 2), r"dout has shape \(1, 3, 2, 2\), expected \(1, 2, 2, 2\)"),
        (lambda: A.cuda_softmax_cross_entropy(np.zeros((2, 5)), [0]), "labels has shape"),
        (lambda: A.cuda_softmax_forward(np.zeros(5)), "expected N x K logits"),
        (lambda: A.cuda_sgd_update(buf, buf, buf[:7], 0.01, 0.9, 0.0), "g has shape"),
        (lambda: A.cuda_augment_images(images, mean[:4], [(0, 0)] * 2, [0, 0], alphas, eigval, eigvec, 4), "mean has shape"),
        (lambda: A.cuda_augment_images(images, mean, [(0, 0)], [0, 0], alphas, eigval, eigvec, 4), "offsets has shape"),
        (lambda: A.cuda_philox4x32([1, 2, 3], [0, 0]), "counter has shape"),
    ]
    for call, message in cases:
        with pytest.raises(AlexNetError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    # the library still works after all those errors
    assert np.array_equal(A.cuda_relu_forward(np.array([-1.0, 2.0])), [0.0, 2.0])
