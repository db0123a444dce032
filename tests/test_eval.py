"""Evaluation (centre crop and ten views), prediction, the pictures and the demo.

The model under test is a small-preset checkpoint with random weights drawn here with a
He-style scale, so that its softmax outputs are far from uniform and a wrong crop, mirror,
view order or averaging changes the numbers. The reference is the NumPy model of
alexnet.py (sections 1 and 2) in float64.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import alexnet as A
from model_fixtures import small_2012_code

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_EXECUTABLE = os.path.join(ROOT, "train_alexnet_cpu")

# Probabilities from the library against the float64 reference. Each fp32 dot product of
# L <= 1,600 terms (conv3: 64 x 3 x 3 x ... ; fc6: 256) has a relative error of about
# sqrt(L) * 2^-24 ~ 2.4e-6 (random-walk bound); over 8 layers the logits (|logit| < 30
# here) are off by < 8 * 2.4e-6 * 30 ~ 6e-4 in the worst case seen by a softmax whose
# derivative is at most 1/2 per logit difference: 2e-4 for a probability, with margin.
PROB_ATOL = 2e-4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("data") / "synthetic")
    assert A.main(["prepare", "synthetic", "--out", folder, "--train-images", "40", "--val-images", "20",
                   "--workers", "1"]) == 0
    return folder


def _random_checkpoint(folder, arch):
    rng = np.random.default_rng(2012)
    params = {}
    for name, shape in A.parameter_shapes(arch).items():
        if name.endswith("weight"):
            fan_in = int(np.prod(shape[1:]))
            params[name] = rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
        else:
            params[name] = rng.normal(0, 0.1, shape).astype(np.float32)
    params["fc8.weight"] *= 0.5  # logits of a few units: confident, but no probability underflows
    path = str(folder / "random.bin")
    A.save_checkpoint(path, dict(arch, dropout=0.5, step=7), params)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _random_checkpoint(tmp_path_factory.mktemp("ckpt"), A.architecture("small", 10))


@pytest.fixture(scope="module")
def checkpoint_2012(tmp_path_factory):
    """The 2012 code's layers on the small preset's sizes: conv1 LRN pool ReLU, conv2's
    within-map normalisation, and the mean image's centre crop subtracted from every view."""
    return _random_checkpoint(tmp_path_factory.mktemp("ckpt_2012"), small_2012_code(10))


@pytest.fixture(scope="module")
def val(dataset):
    shards, mean, names = A._dataset(dataset)
    assert len(shards) == 1
    return np.array(shards[0][0]), np.array(shards[0][1]), mean, names


def test_ten_views_are_the_corners_and_the_centre_then_mirrored():
    views = A.ten_views(32, 36, 28)
    corners = [(0, 0), (0, 8), (4, 0), (4, 8), (2, 4)]
    assert views == [(y, x, 0) for y, x in corners] + [(y, x, 1) for y, x in corners]
    assert views[A.CENTRE_VIEW] == (2, 4, 0)


@pytest.mark.parametrize("preset", ["small", "2012 code"])
def test_library_probabilities_match_the_numpy_reference(checkpoint, checkpoint_2012, val, preset):
    checkpoint = checkpoint if preset == "small" else checkpoint_2012
    images, labels, mean, _ = val
    chunk = images[:6]
    views = A.ten_views(32, 32, 28)
    with A.LibraryModel(checkpoint, mean, 8) as model:
        assert (model.crop, model.classes) == (28, 10)
        lib_views, lib_average = A.view_probabilities(model, chunk, views)
    reference = A.NumpyModel(checkpoint, mean)
    ref_views, ref_average = A.view_probabilities(reference, chunk, views)
    for v in range(10):
        np.testing.assert_allclose(lib_views[v], ref_views[v], rtol=0, atol=PROB_ATOL)
    np.testing.assert_allclose(lib_average, ref_average, rtol=0, atol=PROB_ATOL)
    # the average is the mean of the ten views, which do differ from each other
    np.testing.assert_allclose(lib_average, np.mean(np.float64(lib_views), axis=0), rtol=1e-12)
    assert np.abs(lib_views[0] - lib_views[5]).max() > 100 * PROB_ATOL  # a mirror changes the output
    assert np.abs(lib_views[0] - lib_views[3]).max() > 100 * PROB_ATOL  # so does the corner
    assert ref_average.max() > 0.5  # a confident model: the comparison is not between near-uniform outputs


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_library_probabilities_on_tensor_cores_match_the_rounded_numpy_reference(checkpoint, val, precision):
    """A float32 checkpoint evaluated with --precision tf32 / bf16: every matrix operand
    rounded as the tensor cores read it, in the library and in NumPy alike. The two paths
    see each value a few float32 units apart, so a value close to a rounding boundary of
    the format can round one unit differently (about one in 500 for tf32's 2^-11 steps,
    rarely for bf16's 2^-8), and each such operand moves its products by 2^-11 of
    themselves: the tolerance grows to 5 PROB_ATOL (tf32 measured 4.7e-4 on this
    checkpoint, bf16 1.2e-7). Rounding at every operand moves the outputs 2^-11 or 2^-8 of
    each product, so the outputs must lie, on average, 4 times nearer the rounded
    reference than the unrounded one (measured: 7 times for tf32, 10^5 for bf16)."""
    images, _, mean, _ = val
    chunk, centre = images[:6], [A.ten_views(32, 32, 28)[A.CENTRE_VIEW]]
    with A.LibraryModel(checkpoint, mean, 8, precision) as model:
        (got,), _ = A.view_probabilities(model, chunk, centre)
    (rounded,), _ = A.view_probabilities(A.NumpyModel(checkpoint, mean, precision), chunk, centre)
    (exact,), _ = A.view_probabilities(A.NumpyModel(checkpoint, mean), chunk, centre)
    np.testing.assert_allclose(got, rounded, rtol=0, atol=5 * PROB_ATOL)
    assert 4 * np.abs(got - rounded).mean() < np.abs(got - exact).mean()


def test_evaluation_scores_match_the_numpy_reference(checkpoint, val):
    images, labels, mean, _ = val
    with A.LibraryModel(checkpoint, mean, 8) as model:
        got = A.evaluate(model, [(images[:7], labels[:7]), (images[7:], labels[7:])], views=10, batch=8)
    reference = A.NumpyModel(checkpoint, mean)
    per_view, average = A.view_probabilities(reference, images, A.ten_views(32, 32, 28))
    for name, probs in (("centre crop", per_view[A.CENTRE_VIEW]), ("10 views", average)):
        rows = np.arange(len(labels))
        target = probs[rows, labels][:, None]
        rank = (probs > target).sum(axis=1)
        # the top-k counts must agree exactly unless moving probabilities by the tolerance
        # could move a label across rank 1 or 5: check that this checkpoint has no such case
        for k in (1, 5):
            assert np.array_equal((probs > target + 2 * PROB_ATOL).sum(axis=1) < k,
                                  (probs > target - 2 * PROB_ATOL).sum(axis=1) - 1 < k)
        assert got[name]["images"] == len(labels)
        assert got[name]["top1_error"] == pytest.approx(1 - np.mean(rank < 1), abs=1e-12)
        assert got[name]["top5_error"] == pytest.approx(1 - np.mean(rank < 5), abs=1e-12)
        # d(-log p) = dp / p: the smallest label probability bounds the loss difference
        loss = -np.log(probs[rows, labels]).mean()
        assert got[name]["loss"] == pytest.approx(loss, abs=PROB_ATOL / probs[rows, labels].min())
    assert 0 < got["10 views"]["top5_error"] < 1 or 0 < got["centre crop"]["top5_error"] < 1


def _run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "alexnet.py"), *args], capture_output=True,
                          text=True, cwd=ROOT)


def _scores(text):
    """{(label, loss, top1, top5)} from eval lines of the executable or of alexnet.py."""
    found = re.findall(r"(centre crop|10 views) \| val loss ([0-9.]+) \| top-1 error ([0-9.]+) \| "
                       r"top-5 error ([0-9.]+) \| (\d+) images", text)
    return {name: tuple(float(v) for v in values) for name, *values in found}


@pytest.mark.parametrize("preset", ["small", "2012 code"])
def test_executable_eval_and_python_eval_agree(checkpoint, checkpoint_2012, dataset, preset):
    checkpoint = checkpoint if preset == "small" else checkpoint_2012
    run = subprocess.run([CPU_EXECUTABLE, "--data", dataset, "--resume", checkpoint, "--eval", "--batch", "8"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    executable = _scores(run.stdout)
    python = _run("eval", checkpoint, "--data", dataset, "--batch", "8")
    assert python.returncode == 0, python.stderr
    ours = _scores(python.stdout)
    assert set(executable) == set(ours) == {"centre crop", "10 views"}
    for name in ours:  # the same probabilities added in the same order: equal to the last digit printed
        assert executable[name] == pytest.approx(ours[name], abs=1.5e-4)
        assert executable[name][1:] == ours[name][1:]
    assert ours["10 views"] != ours["centre crop"]


def test_nan_outputs_score_as_wrong(checkpoint, dataset, tmp_path):
    """A model whose outputs are NaN has a NaN loss and 100% error, not 0%, in the
    executable's --eval and in alexnet.py eval (both the centre crop and the ten views)."""
    arch, params, _ = A.load_checkpoint(checkpoint)
    # Checkpoints hold finite numbers only, but finite weights can still make NaN outputs:
    # logit 3 overflows to inf (fc7's outputs are positive: ReLUs with biases 1), and the
    # softmax takes inf - inf.
    params["fc8.weight"][3] = params["fc8.bias"][3] = 3e38
    nan_checkpoint = str(tmp_path / "nan.bin")
    A.save_checkpoint(nan_checkpoint, arch, params)
    pattern = r"(centre crop|10 views) \| val loss (\S+) \| top-1 error ([0-9.]+) \| top-5 error ([0-9.]+)"
    run = subprocess.run([CPU_EXECUTABLE, "--data", dataset, "--resume", nan_checkpoint, "--eval", "--batch", "8"],
                         capture_output=True, text=True)
    python = _run("eval", nan_checkpoint, "--data", dataset, "--batch", "8")
    for result in (run, python):
        assert result.returncode == 0, result.stderr
        found = re.findall(pattern, result.stdout)
        assert {name for name, *_ in found} == {"centre crop", "10 views"}, result.stdout
        for _, loss, top1, top5 in found:
            assert loss == "nan" and float(top1) == 1.0 and float(top5) == 1.0, result.stdout


def _predictions(text):
    """{path: [(probability, class name)]} from the output of `alexnet.py predict`."""
    result, path = {}, None
    for line in text.splitlines():
        if m := re.match(r"^ +([0-9.]+)%  (.+)$", line):
            result[path].append((float(m.group(1)) / 100, m.group(2)))
        elif line:
            path = line
            result[path] = []
    return result


def test_predict_preprocesses_as_validation_images(checkpoint, dataset, val, tmp_path):
    from PIL import Image
    images, labels, mean, names = val
    paths = [str(tmp_path / f"val{i}.png") for i in range(3)]
    for path, image in zip(paths, images):
        Image.fromarray(image).save(path)
        np.testing.assert_array_equal(A._read_image(path, mean.shape), image)
    big = str(tmp_path / "big.jpg")  # 96x128: shorter side to 32, the central square
    Image.fromarray(np.kron(images[3], np.ones((3, 4, 1), np.uint8))).save(big, quality=95)
    square = A.load_image(big, 32)
    with A.LibraryModel(checkpoint, mean, 4) as model:
        expected = A.predict(model, np.concatenate([images[:3], square[None]]))
        centre = A.view_probabilities(model, images[:3], [A.ten_views(32, 32, 28)[A.CENTRE_VIEW]])[0][0]
    np.testing.assert_array_equal(expected[:3], centre)

    result = _run("predict", checkpoint, *paths, big, "--data", dataset)
    assert result.returncode == 0, result.stderr
    shown = _predictions(result.stdout)
    assert list(shown) == paths + [big]
    for path, probs in zip(shown, expected):
        top = np.argsort(-probs, kind="stable")[:5]
        assert [name for _, name in shown[path]] == [names[k] for k in top]
        np.testing.assert_allclose([p for p, _ in shown[path]], probs[top], atol=5e-5)  # printed to 0.01%


def test_filter_grid_pixels_are_the_normalised_conv1_kernels(checkpoint, tmp_path):
    """filters.png of the small preset: at least 800 pixels wide, every kernel's pixels the
    min-max normalised weights enlarged 20 times, under a title and a label per tower."""
    from PIL import Image
    _, params, _ = A.load_checkpoint(checkpoint)
    weight = params["conv1.weight"]  # [16][3][5][5]: 8 kernels per tower
    K = len(weight)
    path = A.draw_filters(checkpoint, str(tmp_path / "filters.png"))
    picture = np.asarray(Image.open(path).convert("RGB"))
    # 8 columns of 5x5 kernels: 20 times is 3 + 8 * (100 + 3) = 827 pixels wide, 19 times 787
    assert A.filter_grid_geometry(K, 5)[:3] == (20, 8, 1)
    assert picture.shape[1] >= 800
    corners = [A.filter_cell(k, K, 5) for k in range(K)]
    for k, (x, y) in enumerate(corners):
        w = weight[k].astype(np.float64).transpose(1, 2, 0)  # [5][5][RGB]
        expected = np.round(255 * (w - w.min()) / (w.max() - w.min()))
        assert x + 100 <= picture.shape[1] and y + 100 <= picture.shape[0]
        np.testing.assert_array_equal(picture[y:y + 100, x:x + 100], np.kron(expected, np.ones((20, 20, 1))))
    tops = [min(y for _, y in corners[:K // 2]), min(y for _, y in corners[K // 2:])]
    assert tops[1] >= max(y for _, y in corners[:K // 2]) + 100 + A.FILTER_LABEL   # tower 1 below tower 0
    ink = lambda rows: (picture[rows] < 128).any(axis=-1).sum()   # dark (text) pixels in a band of rows
    title, labels = slice(0, tops[0] - A.FILTER_LABEL), [slice(top - A.FILTER_LABEL, top) for top in tops]
    assert ink(title) > 100 and ink(labels[0]) > 50 and ink(labels[1]) > 50
    assert not np.array_equal(picture[labels[0]], picture[labels[1]])   # "tower 0 (GPU 1)", "tower 1 (GPU 2)"


def test_filter_grid_of_the_paper_preset_has_the_figure_3_layout():
    weight = np.random.default_rng(0).normal(size=(96, 3, 11, 11)).astype(np.float32)
    picture = A.filters_image(weight)
    scale, columns, rows, cell = A.filter_grid_geometry(96, 11)
    assert (scale, columns, rows) == (5, 16, 3)  # 48 kernels per tower in 3 rows of 16, 55 pixels each
    assert picture.size[0] == A.FILTER_PAD + 16 * cell >= 800
    assert A.filter_cell(47, 96, 11)[1] + cell + A.FILTER_LABEL <= A.filter_cell(48, 96, 11)[1]


LOG = """\
small preset: 286922 parameters, crop 28, 10 classes | 400 training images (4 steps of 100 per epoch), 20 validation | towers on devices 0 and 1 | starting at step 0 of 12
step 1/12 | epoch 0.25 | loss 9.0000 | lr 1.00e-02 | 5.0 img/s | elapsed 0m01s | eta 0m11s
step 2/12 | epoch 0.50 | loss 2.3000 | top-1 error 0.9000 | top-5 error 0.5000 | lr 1.00e-02 | 5.0 img/s | elapsed 0m01s | eta 0m11s
small preset: 286922 parameters, crop 28, 10 classes | 400 training images (4 steps of 100 per epoch), 20 validation | towers on devices 0 and 1 | starting at step 0 of 12
step 2/12 | epoch 0.50 | loss 2.2000 | top-1 error 0.8000 | top-5 error 0.4000 | lr 1.00e-02 | 5.0 img/s | elapsed 0m01s | eta 0m11s
step 4/12 | epoch 1.00 | loss 2.0000 | top-1 error 0.7000 | top-5 error 0.3000 | lr 1.00e-02 | 5.0 img/s | elapsed 0m01s | eta 0m11s
eval step 4 | val loss 2.1000 | top-1 error 0.7500 | top-5 error 0.3500 | 20 images
checkpoint out/ckpt_00000004.bin
step 6/12 | epoch 1.50 | loss 1.5000 | top-1 error 0.5000 | top-5 error 0.2000 | lr 1.00e-02 | 5.0 img/s | elapsed 0m01s | eta 0m11s
small preset: 286922 parameters, crop 28, 10 classes | 400 training images (4 steps of 100 per epoch), 20 validation | towers on devices 0 and 1 | resuming at step 4 of 12
step 6/12 | epoch 1.50 | loss 1.4000 | top-1 error 0.4000 | top-5 error 0.1000 | lr 1.00e-03 | 5.0 img/s | elapsed 0m01s | eta 0m11s
step 8/12 | epoch 2.00 | loss 1.0000 | top-1 error 0.3000 | top-5 error 0.0500 | lr 1.00e-03 | 5.0 img/s | elapsed 0m01s | eta 0m11s
eval step 8 | val loss 1.2000 | top-1 error 0.3500 | top-5 error 0.1000 | 20 images
"""


def test_curves_are_read_from_the_log_and_drawn(tmp_path):
    (tmp_path / "log.txt").write_text(LOG)
    curves = A.read_training_log(str(tmp_path / "log.txt"))
    # the run restarted from step 0 (the first two lines are dropped); the resumed step 6 replaces the old one
    assert curves["train"] == [(0.5, 2.2, 0.8, 0.4), (1.0, 2.0, 0.7, 0.3), (1.5, 1.4, 0.4, 0.1), (2.0, 1.0, 0.3, 0.05)]
    assert curves["val"] == [(1.0, 2.1, 0.75, 0.35), (2.0, 1.2, 0.35, 0.1)]
    assert [rate for _, rate in curves["lr"]] == [1e-2, 1e-2, 1e-3, 1e-3]
    path = A.draw_curves(str(tmp_path))
    assert path == str(tmp_path / "curves.png")
    from PIL import Image
    picture = Image.open(path)
    assert picture.size == A.CURVES_SIZE
    pixels = np.asarray(picture.convert("RGB")).reshape(-1, 3)
    for colour in [(31, 119, 180), (214, 39, 40), (255, 127, 14)]:  # train, validation, top-5 lines
        assert (pixels == colour).all(axis=1).sum() > 50


def test_curves_of_a_log_without_steps_is_a_clear_error(tmp_path):
    (tmp_path / "log.txt").write_text("nothing here\n")
    with pytest.raises(A.AlexNetError, match="no training steps"):
        A.read_training_log(str(tmp_path / "log.txt"))
    result = _run("show", "curves", str(tmp_path / "missing"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "cannot read" in result.stderr


def test_predictions_picture(checkpoint, dataset, tmp_path):
    from PIL import Image
    result = _run("show", "predictions", checkpoint, "--data", dataset, "--count", "5", "--views", "1",
                  "--out", str(tmp_path / "p.png"))
    assert result.returncode == 0, result.stderr
    picture = Image.open(tmp_path / "p.png")
    assert picture.size == (4 * A.PREDICTION_CELL[0], 2 * A.PREDICTION_CELL[1])  # 5 images: 2 rows of 4


def test_bad_checkpoint_is_a_one_line_error(dataset, tmp_path):
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(b"\0" * 100)
    for args in (["eval", str(tmp_path / "missing.bin"), "--data", dataset],
                 ["eval", str(truncated), "--data", dataset],
                 ["show", "filters", str(truncated)],
                 ["predict", str(truncated), str(tmp_path / "none.png"), "--data", dataset]):
        result = _run(*args)
        assert result.returncode == 1, args
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr


def test_library_model_rejects_bad_views(checkpoint, val):
    images, _, mean, _ = val
    with A.LibraryModel(checkpoint, mean, 2) as model:
        with pytest.raises(A.AlexNetError, match="does not fit"):
            model.probabilities(images[:1], np.int32([[5, 0]]), np.uint8([0]))  # 5 + 28 > 32
        with pytest.raises(A.AlexNetError, match="opened with batch 2"):
            model.probabilities(images[:3], np.zeros((3, 2), np.int32), np.zeros(3, np.uint8))
        with pytest.raises(A.AlexNetError, match="expected images"):
            model.probabilities(images[:2, :20, :20], np.zeros((2, 2), np.int32), np.zeros(2, np.uint8))
    with pytest.raises(A.AlexNetError, match="crops 28x28, larger than the 20x20 images"):
        A.LibraryModel(checkpoint, np.zeros((20, 20, 3), np.float32), 2)


def test_demo_runs_end_to_end_on_a_tiny_setting(tmp_path, capsys):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    flags = ["demo", "--data", data, "--out", out, "--steps", "2", "--batch", "8", "--eval-every", "2",
             "--prepare-flags", "--train-images 24 --val-images 8 --workers 1"]
    assert A.main(flags) == 0
    first = capsys.readouterr().out
    assert "preparing the synthetic dataset" in first
    for name in ("latest.bin", "log.txt", "filters.png", "curves.png", "predictions.png"):
        assert os.path.exists(os.path.join(out, name)), name
    assert re.search(r"validation accuracy: [0-9.]+% \(centre crop\)\n", first)
    assert "(10 views)" not in first
    hint = re.search(r"\(the paper's 10 views: (.+)\)\n", first).group(1)   # runs as printed
    shown = subprocess.run(hint, shell=True, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0 and "10 views | val loss" in shown.stdout, (hint, shown.stderr)
    assert A.main(flags + ["--ten-views"]) == 0  # again: the dataset is reused, the run starts afresh
    second = capsys.readouterr().out
    assert "reusing the synthetic dataset" in second
    assert re.search(r"validation accuracy: [0-9.]+% \(centre crop\), [0-9.]+% \(10 views\)", second)
    assert A.read_training_log(os.path.join(out, "log.txt"))["train"][-1][0] == pytest.approx(2 / 3, abs=0.01)


@pytest.fixture(scope="module")
def other_sizes(tmp_path_factory):
    """Synthetic sets of 64x64 and 24x24 images (10 classes) for checkpoints that do not fit."""
    folder = tmp_path_factory.mktemp("sizes")
    for size in (64, 24):
        assert A.main(["prepare", "synthetic", "--out", str(folder / str(size)), "--size", str(size),
                       "--train-images", "10", "--val-images", "10", "--workers", "1"]) == 0
    return folder


def _checkpoint_of(folder, name, **arch):
    """A small-preset checkpoint with `arch` fields changed (class count, crop, image size)."""
    arch = dict(A.architecture("small", 10), **arch)
    path = str(folder / f"{name}.bin")
    A.save_checkpoint(path, arch, A.init_params(arch, np.random.default_rng(0)))
    return path


@pytest.mark.parametrize("case", ["5 classes", "100 classes", "28 crop on 64x64", "32 crop on 64x64",
                                  "28 crop on 24x24", "trained on 30x30"])
@pytest.mark.parametrize("command", ["eval", "predict", "show predictions"])
def test_a_checkpoint_that_does_not_fit_the_dataset_is_a_one_line_error(checkpoint, dataset, other_sizes, val,
                                                                       tmp_path, case, command):
    """Scored against the wrong labels or shown the middle of larger images, such a model
    would give an IndexError or silently wrong numbers: each command refuses it instead."""
    from PIL import Image
    ckpt, data, message = {
        "5 classes": (_checkpoint_of(tmp_path, "c5", classes=5), dataset, "has 5 classes, the dataset 10"),
        "100 classes": (_checkpoint_of(tmp_path, "c100", classes=100), dataset, "has 100 classes, the dataset 10"),
        "28 crop on 64x64": (checkpoint, str(other_sizes / "64"), "takes 28x28 crops of images 28 to 32 pixels "
                             "wide (the small preset), not the 64x64 images"),
        "32 crop on 64x64": (_checkpoint_of(tmp_path, "crop32", crop=32), str(other_sizes / "64"),
                             "takes 32x32 crops of images 32 to 36 pixels wide"),
        "28 crop on 24x24": (checkpoint, str(other_sizes / "24"), "not the 24x24 images"),
        # the executable records the image size: then it must be the dataset's exactly
        "trained on 30x30": (_checkpoint_of(tmp_path, "s30", image_height=30, image_width=30), dataset,
                             "was trained on 30x30 images, the dataset has 32x32"),
    }[case]
    image = str(tmp_path / "image.png")
    Image.fromarray(val[0][0]).save(image)
    args = {"eval": ["eval", ckpt, "--data", data], "predict": ["predict", ckpt, image, "--data", data],
            "show predictions": ["show", "predictions", ckpt, "--data", data, "--out", str(tmp_path / "p.png")]}
    result = _run(*args[command])
    assert result.returncode == 1 and result.stdout == "", result.stdout
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "p.png")


def test_the_checkpoint_that_fits_is_accepted_at_the_edges_of_the_size_range(dataset, tmp_path):
    """A crop as large as the images (no margin) fits as well as the presets' 7/8."""
    ckpt = _checkpoint_of(tmp_path, "crop32", crop=32)
    result = _run("eval", ckpt, "--data", dataset, "--views", "1")
    assert result.returncode == 0 and "centre crop | val loss" in result.stdout, result.stderr
