"""The paper's data path and schedule, checked against closed forms: the random crops,
mirrors and PCA lighting that the loader draws (statistically, over many draws of the very
function the loader calls), the ten test views, and the learning-rate drops on a plateau
(replayed from a run's own log).

The statistical bounds are 5 standard errors (or a chi-square p-value of 1e-6): with the
fixed seeds the draws are deterministic, so a pass is reproducible, while an off-by-one
range, a biased coin or a wrong scale misses by far more than that."""
import math
import re

import numpy as np
import pytest

import alexnet
from model_fixtures import random_dataset, run

STEPS, BATCH = 100, 128                   # 12,800 draws
H = W = 256
CROP = 224                                # offsets 0..32 on each axis, as in the paper


@pytest.fixture(scope="module")
def draws():
    offsets, flips, alphas = [], [], []
    for step in range(STEPS):
        o, f, a, _ = alexnet.cuda_augmentation_draws(seed=1, step=step, n=BATCH, H=H, W=W, crop=CROP)
        offsets.append(o), flips.append(f), alphas.append(a)
    return np.concatenate(offsets), np.concatenate(flips), np.concatenate(alphas)


def chi_square_p_value(counts):
    """Upper tail of Pearson's chi-square for uniform counts (Wilson-Hilferty normal
    approximation, accurate to well under the 1e-6 threshold used here)."""
    expected = counts.sum() / len(counts)
    x, k = ((counts - expected) ** 2 / expected).sum(), len(counts) - 1
    z = ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_crop_offsets_are_uniform_over_every_position(draws):
    offsets = draws[0]
    assert offsets.min() == 0 and offsets.max() == H - CROP
    for axis in range(2):
        counts = np.bincount(offsets[:, axis], minlength=H - CROP + 1)
        assert len(counts) == H - CROP + 1 and chi_square_p_value(counts) > 1e-6, counts
    # the two axes are drawn independently: their correlation is within 5 standard errors of 0
    assert abs(np.corrcoef(offsets[:, 0], offsets[:, 1])[0, 1]) < 5 / math.sqrt(len(offsets))


def test_mirrors_have_probability_one_half(draws):
    flips = draws[1]
    assert set(np.unique(flips)) == {0, 1}
    assert abs(flips.mean() - 0.5) < 5 * math.sqrt(0.25 / len(flips))


def test_lighting_weights_are_normal_with_std_0_1_on_unit_pixels(draws):
    """alpha ~ N(0, 0.1) for pixels in [0, 1]; the stored eigenvalues are of 0..255 pixels
    (255^2 times larger), so the weights drawn for them are alpha / 255."""
    alphas = draws[2] * 255.0
    n, sigma = len(alphas), 0.1
    for c in range(3):
        a = alphas[:, c]
        assert abs(a.mean()) < 5 * sigma / math.sqrt(n)
        assert abs(a.std() / sigma - 1) < 5 / math.sqrt(2 * n)
        # the shape, too: the fraction within one sigma is the normal's 68.27%
        inside = np.mean(np.abs(a) < sigma)
        assert abs(inside - 0.6827) < 5 * math.sqrt(0.6827 * 0.3173 / n)
    assert np.abs(np.corrcoef(alphas.T) - np.eye(3)).max() < 5 / math.sqrt(n)


def test_lighting_adds_the_papers_pca_term_to_every_pixel(draws):
    """The augmentation kernel adds [p1 p2 p3] [a1 l1, a2 l2, a3 l3]^T to every pixel of a
    crop (the paper's formula), so over many draws the added colour has the covariance
    P diag((0.1/255)^2 l^2) P^T."""
    rng = np.random.default_rng(0)
    eigvec, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    eigval = np.array([5000.0, 300.0, 40.0])
    n = 4000
    images = np.full((n, 8, 8, 3), 100, np.uint8)
    mean = np.full((8, 8, 3), 100.0, np.float32)
    alphas = draws[2][:n]
    out = alexnet.cuda_augment_images(images, mean, np.zeros((n, 2), int), np.zeros(n, np.uint8), alphas,
                                      eigval, eigvec, 8)
    added = out[:, :, 3, 5].astype(np.float64)           # every pixel gets the same colour
    assert np.array_equal(out, np.broadcast_to(out[:, :, :1, :1], out.shape))
    exact = (alphas.astype(np.float64) * eigval) @ eigvec.T
    assert np.abs(added - exact).max() < 1e-3 * np.abs(exact).max()
    covariance = eigvec @ np.diag((0.1 / 255 * eigval) ** 2) @ eigvec.T
    measured = np.cov(added.T, bias=True)
    assert np.abs(measured - covariance).max() < 5 * np.sqrt(2 / n) * np.abs(covariance).max()


def test_ten_views_are_the_corners_and_centre_each_mirrored():
    for h, w, crop in [(256, 256, 224), (32, 32, 28), (40, 33, 28)]:
        views = alexnet.cuda_view_geometry(h, w, crop)
        expected = {(y, x, f) for f in (0, 1) for y in (0, h - crop) for x in (0, w - crop)}
        expected |= {((h - crop) // 2, (w - crop) // 2, f) for f in (0, 1)}
        assert len(views) == 10 and set(views) == expected
        assert views == alexnet.ten_views(h, w, crop)      # the order alexnet.py averages in


def test_the_learning_rate_drops_on_a_plateau_as_documented(tmp_path):
    """The rule replayed from the run's own log: after each scheduled validation, a better
    top-1 error resets the count; otherwise, after --patience validations without one, the
    rate is divided by 10 (at most --max-drops times in all, counting --lr-steps drops)."""
    data = tmp_path / "data"
    random_dataset(data, 32, val=16, size=32, classes=10)
    patience, max_drops, lr = 1, 2, 0.01
    result = run("--data", data, "--arch", "small", "--batch", 8, "--steps", 16, "--eval-every", 1,
                 "--patience", patience, "--max-drops", max_drops, "--lr", lr, "--log-every", 1,
                 "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    step_lr = {int(s): float(v) for s, v in re.findall(r"^step (\d+)/\d+ .*\| lr (\S+) \|", result.stdout, re.M)}
    errors = {int(s): float(e) for s, e in re.findall(r"^eval step (\d+) \| .*top-1 error (\S+)", result.stdout, re.M)}
    assert sorted(step_lr) == list(range(1, 17)) and sorted(errors) == list(range(1, 17))
    best, bad, drops = math.inf, 0, 0
    for step in range(1, 17):
        assert step_lr[step] == pytest.approx(lr * 0.1 ** drops, rel=1e-2), (step, step_lr, errors)
        if errors[step] < best:
            best, bad = errors[step], 0
        elif (bad := bad + 1) >= patience and drops < max_drops:
            drops, bad = drops + 1, 0
    assert drops >= 1, errors  # the run did meet a plateau (else this test proves nothing)
    header, _, _ = alexnet.load_checkpoint(str(tmp_path / "out" / "latest.bin"))
    assert header["plateau_drops"] == drops and header["best_error"] == pytest.approx(best, abs=1e-6)


# -----------------------------------------------------------------------------
# The authors' 2012 run (alexnet-2012-code): crops and mirrors per chunk of 32 images,
# colour noise on the square roots of the eigenvalues with the crop divided by 1.1, and no
# colour noise from epoch 66 (the run's epoch 67).

CODE_2012 = "alexnet-2012-code"


@pytest.fixture(scope="module")
def draws_2012():
    return [alexnet.cuda_augmentation_draws(seed=1, step=step, n=BATCH, H=H, W=W, crop=CROP, preset=CODE_2012)
            for step in range(STEPS)]


def test_2012_code_shares_crops_and_mirrors_by_chunks_of_32(draws_2012):
    chunks = []
    for offsets, flips, _, _ in draws_2012:
        for start in range(0, BATCH, 32):
            assert (offsets[start:start + 32] == offsets[start]).all() and (flips[start:start + 32] == flips[start]).all()
            chunks.append((*offsets[start], flips[start]))
    chunks = np.array(chunks)                           # 400 chunks: each draws as one paper image
    for axis in range(2):
        counts = np.bincount(chunks[:, axis], minlength=H - CROP + 1)
        assert len(counts) == H - CROP + 1 and chi_square_p_value(counts) > 1e-6, counts
    assert abs(chunks[:, 2].mean() - 0.5) < 5 * math.sqrt(0.25 / len(chunks))
    assert len({tuple(c) for c in chunks}) > len(chunks) // 2  # chunks draw afresh, not one per batch


def test_2012_code_colour_noise_is_0_1_z_and_divides_by_1_1(draws_2012):
    """The weights multiply sqrt(eigval) (the standard deviation along each axis), so they are
    0.1 z, z ~ N(0, 1), with no /255; every crop is then divided by 1 + 0.1."""
    alphas = np.concatenate([a for _, _, a, _ in draws_2012])
    assert {d for _, _, _, d in draws_2012} == {np.float32(1.1)}
    n = len(alphas)
    for c in range(3):
        assert abs(alphas[:, c].mean()) < 5 * 0.1 / math.sqrt(n)
        assert abs(alphas[:, c].std() / 0.1 - 1) < 5 / math.sqrt(2 * n)
    assert np.abs(np.corrcoef(alphas.T) - np.eye(3)).max() < 5 / math.sqrt(n)


def test_2012_code_colour_noise_stops_at_epoch_66():
    for epoch, noise in ((0, True), (65, True), (66, False), (89, False)):
        offsets, flips, alphas, divisor = alexnet.cuda_augmentation_draws(seed=3, step=7, n=64, H=H, W=W, crop=CROP,
                                                                          preset=CODE_2012, epoch=epoch)
        assert (np.abs(alphas).max() > 0) == noise and divisor == pytest.approx(1.1 if noise else 1.0)
        # the crops and mirrors do not depend on the epoch: only the noise stops
        same = alexnet.cuda_augmentation_draws(seed=3, step=7, n=64, H=H, W=W, crop=CROP, preset=CODE_2012)
        assert np.array_equal(offsets, same[0]) and np.array_equal(flips, same[1])


def test_paper_presets_draw_per_image_without_a_divisor():
    offsets, flips, alphas, divisor = alexnet.cuda_augmentation_draws(seed=1, step=0, n=BATCH, H=H, W=W, crop=CROP,
                                                                      epoch=80)
    assert divisor == 1.0 and len({tuple(o) for o in offsets}) > BATCH // 2 and np.abs(alphas).max() > 0
