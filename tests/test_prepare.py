"""Data preparation: the dataset format, the three sources, statistics, resume, bad input.
Every fixture is made here, small, in tmp_path."""
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

import alexnet


def run(capsys, *argv):
    """main([...]) -> (exit code, stdout + stderr)."""
    code = alexnet.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def prepare_ok(capsys, *argv):
    code, text = run(capsys, "prepare", *argv)
    assert code == 0, text
    return text


def folder_files(folder):
    return sorted(f for f in os.listdir(folder))


def file_bytes(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in folder_files(folder) if f != "prepare.json"}


# --- the format, written by hand from the spec (independent of read_shard/read_stats) ---

def parse_shard(path):
    raw = open(path, "rb").read()
    header = struct.unpack("<256i", raw[:1024])
    n, h, w, c = header[2:6]
    labels = np.frombuffer(raw, "<i4", n, 1024)
    pixels = np.frombuffer(raw, np.uint8, n * h * w * c, 1024 + 4 * n).reshape(n, h, w, c)
    assert len(raw) == 1024 + 4 * n + n * h * w * c
    return header, labels, pixels


def parse_stats(path):
    raw = open(path, "rb").read()
    header = struct.unpack("<256i", raw[:1024])
    h, w, c = header[2:5]
    values = np.frombuffer(raw, "<f4", offset=1024)
    assert len(values) == h * w * c + 12
    return header, values[:-12].reshape(h, w, c), values[-12:-9], values[-9:].reshape(3, 3)


def test_synthetic_format_stats_and_worker_independence(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--train-images", "230", "--val-images", "40", "--shard-images", "100", "--seed", "3"]
    prepare_ok(capsys, "synthetic", "--out", str(a), "--workers", "1", *common)
    prepare_ok(capsys, "synthetic", "--out", str(b), "--workers", "2", *common)
    assert folder_files(a) == ["classes.txt", "prepare.json", "stats.bin", "train_000.bin", "train_001.bin",
                               "train_002.bin", "val_000.bin"]
    assert file_bytes(a) == file_bytes(b)   # bitwise the same whatever the number of workers

    shards = [parse_shard(a / f"train_{k:03d}.bin") for k in range(3)]
    for k, ((header, labels, pixels), n) in enumerate(zip(shards, (100, 100, 30))):
        assert header[:7] == (20121001, 1, n, 32, 32, 3, 10) and not any(header[7:])
        reader = alexnet.read_shard(str(a / f"train_{k:03d}.bin"))
        assert np.array_equal(reader.labels, labels) and np.array_equal(reader.pixels, pixels)
    labels = np.concatenate([s[1] for s in shards])
    pixels = np.concatenate([s[2] for s in shards])
    assert np.array_equal(np.bincount(labels, minlength=10), [23] * 10)   # balanced classes
    assert open(a / "classes.txt").read().splitlines() == list(alexnet.SYNTHETIC_CLASSES)
    assert np.array_equal(alexnet.read_split(str(a), "train")[1], pixels)

    header, mean, eigval, eigvec = parse_stats(a / "stats.bin")
    assert header[:5] == (20121002, 1, 32, 32, 3) and not any(header[5:])
    # reference in memory, float64; the file holds float32, so the bound is float32 rounding
    assert np.allclose(mean, pixels.mean(axis=0, dtype=np.float64), rtol=2**-23, atol=0)
    rgb = pixels.reshape(-1, 3).astype(np.float64)
    cov = np.cov(rgb, rowvar=False, bias=True)
    want_val, want_vec = np.linalg.eigh(cov)
    assert np.allclose(eigval, want_val[::-1], rtol=2**-22)
    assert eigval[0] >= eigval[1] >= eigval[2]
    for i in range(3):   # column i is the eigenvector of eigval[i] (sign: largest component positive)
        v = eigvec[:, i].astype(np.float64)
        assert np.allclose(cov @ v, eigval[i] * v, rtol=0, atol=1e-4 * eigval[0])
        assert abs(np.dot(v, want_vec[:, 2 - i])) == pytest.approx(1, abs=1e-5)
        assert v[np.argmax(np.abs(v))] > 0
    stats = alexnet.read_stats(str(a / "stats.bin"))
    assert np.array_equal(stats.mean, mean) and np.array_equal(stats.eigvec, eigvec)


def linear_pixel_fit(train, ridge=100.0):
    """Ridge regression on raw pixels with one-vs-all targets: weights [3072 + 1][10].
    The Gram matrix in float32 (entries are sums of <= 2500 products in 0..1, so float32
    rounding, ~1e-7 relative, is far below the ridge), solved in float64."""
    x = features(train[1])
    gram = (x.T @ x).astype(np.float64)
    return np.linalg.solve(gram + ridge * np.eye(len(gram)), x.T.astype(np.float64) @ np.eye(10)[train[0]])


def features(pixels):
    x = pixels.reshape(len(pixels), -1).astype(np.float32) / 255
    return np.hstack([x, np.ones((len(x), 1), np.float32)])


def accuracy(weights, split):
    return np.mean(np.argmax(features(split[1]) @ weights, axis=1) == split[0])


def test_synthetic_is_not_linearly_separable(tmp_path, capsys):
    """A linear classifier on raw pixels must stay far below what a convnet reaches (the
    small preset: 95% after the demo's 1.4 epochs). With 2500 training images,
    ridge 10, 100 and 1000 measured 19-22% (chance 10%); the bound 30% leaves room for
    sampling noise on 1000 validation images (std ~1.2%) and fails if the classes become
    linearly easy."""
    out = str(tmp_path / "s")
    prepare_ok(capsys, "synthetic", "--out", out, "--train-images", "2500", "--val-images", "1000")
    train, val = alexnet.read_split(out, "train"), alexnet.read_split(out, "val")
    weights = linear_pixel_fit(train)
    assert accuracy(weights, val) < 0.30
    # the fit itself works: on its own training images the same classifier does far better
    assert accuracy(weights, train) > 0.45


# --- CIFAR-10 ---

def make_cifar(folder, records=3, rng=np.random.default_rng(0)):
    folder.mkdir()
    made = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, records).astype(np.uint8)
        planes = rng.integers(0, 256, (records, 3, 32, 32)).astype(np.uint8)
        (folder / name).write_bytes(np.hstack([labels[:, None], planes.reshape(records, -1)]).tobytes())
        made[name] = labels, planes
    (folder / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n\n")
    return made


def test_cifar10(tmp_path, capsys):
    made = make_cifar(tmp_path / "cifar")
    out = tmp_path / "out"
    prepare_ok(capsys, "cifar10", str(tmp_path / "cifar"), "--out", str(out), "--workers", "1")
    for split, names in (("train", [f"data_batch_{i}.bin" for i in range(1, 6)]), ("val", ["test_batch.bin"])):
        header, labels, pixels = parse_shard(out / f"{split}_000.bin")
        assert header[:7] == (20121001, 1, 3 * len(names), 32, 32, 3, 10)
        assert np.array_equal(labels, np.concatenate([made[n][0] for n in names]))
        # planes R, G, B of 32x32 -> HWC
        assert np.array_equal(pixels, np.concatenate([made[n][1] for n in names]).transpose(0, 2, 3, 1))
    assert alexnet.read_classes(str(out)) == [f"class{i}" for i in range(10)]


# --- ImageNet ---

SYNSETS = ["n00000003", "n00000001", "n00000002"]   # deliberately not created in sorted order


def photo(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3)).astype(np.uint8))


def make_imagenet(root, flat_val=True):
    """train/ with 3 synsets (a CMYK JPEG, a greyscale JPEG and a PNG named .JPEG among
    them), val/ flat with a labels file or sorted into folders."""
    files = {}
    for k, synset in enumerate(SYNSETS):
        folder = root / "train" / synset
        folder.mkdir(parents=True)
        for j in range(3):
            path = folder / f"{synset}_{j}.JPEG"
            im = photo(40 + 7 * j, 30 + 5 * k, seed=10 * k + j)
            if (k, j) == (0, 1):
                im.convert("CMYK").save(path, "JPEG", quality=95)
            elif (k, j) == (1, 2):
                im.convert("L").save(path, "JPEG", quality=95)
            elif (k, j) == (2, 0):
                im.save(path, "PNG")
            else:
                im.save(path, "JPEG", quality=95)
            files[str(path)] = synset
    (root / "val").mkdir()
    val = {}
    for j, synset in enumerate(["n00000002", "n00000001", "n00000003", "n00000002"]):
        name = f"ILSVRC2012_val_{j + 1:08d}.JPEG"
        folder = root / "val" if flat_val else root / "val" / synset
        folder.mkdir(exist_ok=True)
        photo(33, 45, seed=100 + j).save(folder / name, "JPEG", quality=95)
        val[str(folder / name)] = synset
    return files, val


def write_labels(path, val, form="synset"):
    order = sorted(SYNSETS)
    lines = [f"{os.path.basename(p)} {s if form == 'synset' else order.index(s)}" for p, s in sorted(val.items())]
    path.write_text("\n".join(lines) + "\n")


def expected_pairs(files, size):
    order = sorted(SYNSETS)
    return sorted((order.index(s), alexnet.load_image(p, size).tobytes()) for p, s in files.items())


@pytest.mark.parametrize("form", ["synset", "index", "sorted"])
def test_imagenet_contents_labels_and_classes(tmp_path, capsys, form):
    files, val = make_imagenet(tmp_path / "in", flat_val=form != "sorted")
    words = tmp_path / "words.txt"
    words.write_text("n00000001 first, one\nn00000002 second\nn00000003 third\nn09999999 unused\n")
    args = ["imagenet", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--size", "16",
            "--synset-words", str(words), "--shard-images", "4", "--workers", "2"]
    if form != "sorted":
        write_labels(tmp_path / "labels.txt", val, form)
        args += ["--val-labels", str(tmp_path / "labels.txt")]
    prepare_ok(capsys, *args)
    out = str(tmp_path / "out")
    assert alexnet.read_classes(out) == ["n00000001 first, one", "n00000002 second", "n00000003 third"]
    shards = [parse_shard(p) for p in alexnet.shard_paths(out, "train")]
    assert [h[2] for h, _, _ in shards] == [4, 4, 1] and all(h[3:7] == (16, 16, 3, 3) for h, _, _ in shards)
    got = sorted((int(l), p.tobytes()) for _, labels, pixels in shards for l, p in zip(labels, pixels))
    assert got == expected_pairs(files, 16)   # every image once, with its folder's label
    labels, pixels = alexnet.read_split(out, "val")   # val keeps its sorted file order
    if form == "sorted":   # sorted layout: by class folder, then by name
        order = sorted(val, key=lambda p: (val[p], os.path.basename(p)))
    else:
        order = sorted(val)
    assert labels.tolist() == [sorted(SYNSETS).index(val[p]) for p in order]
    assert np.array_equal(pixels, np.stack([alexnet.load_image(p, 16) for p in order]))


def test_imagenet_subset_of_classes(tmp_path, capsys):
    files, val = make_imagenet(tmp_path / "in")
    write_labels(tmp_path / "labels.txt", val)
    text = prepare_ok(capsys, "imagenet", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--size", "8",
                      "--classes", "2", "--val-labels", str(tmp_path / "labels.txt"), "--workers", "1")
    assert "left out 1 validation images" in text
    assert alexnet.read_classes(str(tmp_path / "out")) == ["n00000001", "n00000002"]
    labels, _ = alexnet.read_split(str(tmp_path / "out"), "train")
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert alexnet.read_split(str(tmp_path / "out"), "val")[0].tolist() == [1, 0, 1]


def ramp_image(width, height):
    """R = x, G = y, both scaled to 0..255 across the image; B = 0."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.rint(np.stack([x, y, 0 * x], -1)).astype(np.uint8)), x, y


@pytest.mark.parametrize("width,height,kind", [(400, 300, "PNG"), (300, 420, "PNG"), (1100, 800, "JPEG")])
def test_resize_and_central_crop_geometry(tmp_path, width, height, kind):
    """Shorter side to 64, central 64x64. Output pixel j samples source x = left + (j + 0.5)
    * side / 64 - 0.5; a linear ramp stays linear under the bilinear filter, so away from
    the crop edges (where the filter reaches outside the ramp) the output equals the ramp
    at that point up to uint8 rounding (+-1) and, for the 1100x800 JPEG (decoded at 1/2
    scale by draft mode), JPEG error on a smooth ramp (+-3)."""
    im, _, _ = ramp_image(width, height)
    path = tmp_path / "ramp.JPEG"
    im.save(path, kind, **({"quality": 98, "subsampling": 0} if kind == "JPEG" else {}))
    out = alexnet.load_image(str(path), 64).astype(np.float64)
    side = min(width, height)
    source = (np.arange(64) + 0.5) * side / 64 - 0.5
    want_r = 255 * ((width - side) / 2 + source) / (width - 1)
    want_g = 255 * ((height - side) / 2 + source) / (height - 1)
    inner = slice(4, 60)
    tolerance = 3 if kind == "JPEG" else 1
    assert np.abs(out[inner, inner, 0] - want_r[None, inner]).max() <= tolerance
    assert np.abs(out[inner, inner, 1] - want_g[inner, None]).max() <= tolerance
    assert np.abs(out[..., 2]).max() <= tolerance


def test_exif_orientation_is_ignored(tmp_path):
    im = photo(48, 32, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6   # "rotate 90 degrees": the standard pipelines do not apply it
    im.save(tmp_path / "plain.JPEG", quality=95)
    im.save(tmp_path / "rotated.JPEG", quality=95, exif=exif)
    assert np.array_equal(alexnet.load_image(str(tmp_path / "plain.JPEG"), 16),
                          alexnet.load_image(str(tmp_path / "rotated.JPEG"), 16))


def test_image_modes_become_rgb(tmp_path):
    """CMYK and greyscale JPEGs, a PNG named .JPEG and an RGBA PNG all give RGB images
    close to the lossless RGB reference. Smooth content, so the only differences are
    JPEG error (a few levels) and, for CMYK, Pillow's plain CMYK<->RGB conversion."""
    smooth = np.asarray(photo(6, 5, seed=3).resize((60, 50), Image.BICUBIC))
    im = Image.fromarray(smooth)
    im.save(tmp_path / "rgb.png")
    im.save(tmp_path / "png_named.JPEG", "PNG")
    im.convert("RGBA").save(tmp_path / "rgba.png")
    im.save(tmp_path / "rgb.JPEG", quality=95)
    im.convert("CMYK").save(tmp_path / "cmyk.JPEG", quality=95)
    im.convert("L").save(tmp_path / "grey.JPEG", quality=95)
    load = {name: alexnet.load_image(str(tmp_path / name), 16).astype(np.int32) for name in os.listdir(tmp_path)}
    reference = load["rgb.png"]
    assert all(a.shape == (16, 16, 3) for a in load.values())
    assert np.array_equal(load["png_named.JPEG"], reference) and np.array_equal(load["rgba.png"], reference)
    assert np.abs(load["rgb.JPEG"] - reference).mean() < 3
    assert np.abs(load["cmyk.JPEG"] - reference).mean() < 3
    grey = load["grey.JPEG"]
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], grey[..., 2])
    luma = reference @ np.array([0.299, 0.587, 0.114])
    assert np.abs(grey[..., 0] - luma).mean() < 3


# --- resume ---

def test_resume_skips_verified_shards_and_redoes_the_rest(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["synthetic", "--out", str(out), "--train-images", "200", "--val-images", "30",
            "--shard-images", "50", "--workers", "1"]
    prepare_ok(capsys, *args)
    fresh = file_bytes(out)
    assert "already prepared" in prepare_ok(capsys, *args)

    # an interrupted run: one shard missing, one damaged, a leftover temp file, no stats yet
    os.remove(out / "train_003.bin")
    damaged = bytearray(fresh["train_001.bin"])
    damaged[5000] ^= 1
    (out / "train_001.bin").write_bytes(bytes(damaged))
    (out / "train_002.bin.tmp").write_bytes(b"half a shard")
    os.remove(out / "stats.bin")
    kept = {f: os.stat(out / f).st_mtime_ns for f in ("train_000.bin", "train_002.bin", "val_000.bin")}

    text = prepare_ok(capsys, *args)
    assert "resuming: 3 finished shards verified, 2 to go" in text
    assert {f: os.stat(out / f).st_mtime_ns for f in kept} == kept   # not rewritten
    assert file_bytes(out) == fresh   # the same bytes as a run without interruption, stats included


# --- the streaming shard writer ---

def test_crc32_combine_matches_crc32_of_the_concatenation():
    import zlib
    rng = np.random.default_rng(3)
    for a_len, b_len in [(0, 0), (0, 5), (7, 0), (1, 1), (1000, 3), (5, 70000)]:
        a, b = rng.bytes(a_len), rng.bytes(b_len)
        assert alexnet.crc32_combine(zlib.crc32(a), zlib.crc32(b), b_len) == zlib.crc32(a + b)


def test_shard_writer_fills_slots_out_of_order_and_closes_the_gaps(tmp_path):
    """Chunks written into their slots in any order, some shorter than planned (skipped
    images): the shard holds them in slot order with no gap, and the checksum is the one
    that resume verifies."""
    import zlib
    rng = np.random.default_rng(4)
    planned = [(0, 3, 3), (3, 3, 1), (6, 3, 0), (9, 2, 2)]   # (first slot, planned, written)
    chunks = [(slot, rng.integers(0, 10, written).astype(np.int32),
               rng.integers(0, 256, (written, 4, 5, 3), dtype=np.uint8)) for slot, _, written in planned]
    writer = alexnet.ShardWriter(str(tmp_path / "train_000.bin"), 11, 4, 5, 10)
    for slot, _, pixels in reversed(chunks):   # the workers may finish in any order
        alexnet._write_at(writer.tmp, writer.offset(slot), pixels)
    for slot, labels, pixels in chunks:        # the main process records them in order
        writer.add(slot, labels, zlib.crc32(pixels))
    images, crc = writer.finish()
    writer.publish()
    header, labels, pixels = parse_shard(tmp_path / "train_000.bin")
    assert images == 6 and header[:7] == (20121001, 1, 6, 4, 5, 3, 10)
    assert np.array_equal(labels, np.concatenate([c[1] for c in chunks]))
    assert np.array_equal(pixels, np.concatenate([c[2] for c in chunks]))
    assert crc == alexnet.shard_checksum(alexnet.read_shard(str(tmp_path / "train_000.bin")))
    assert os.listdir(tmp_path) == ["train_000.bin"]


# --- bad input: one clear line, exit code 1, nothing under a final name ---

def assert_error(capsys, out, *argv, message, workers=1):
    code, text = run(capsys, "prepare", *argv, "--out", str(out), "--workers", str(workers))
    assert code == 1
    assert text.startswith("error: ") and text.count("\n") == 1, text
    assert message in text, text
    if os.path.isdir(out):
        assert not [f for f in os.listdir(out) if f in ("stats.bin", "classes.txt") or f.endswith(".tmp")]
    return text


def test_bad_imagenet_folders(tmp_path, capsys):
    out = tmp_path / "out"
    assert_error(capsys, out, "imagenet", str(tmp_path / "nothing"), message="nothing/train: no such folder")
    (tmp_path / "in" / "train").mkdir(parents=True)
    (tmp_path / "in" / "val").mkdir()
    assert_error(capsys, out, "imagenet", str(tmp_path / "in"), message="no class folders")
    (tmp_path / "in" / "train" / "n00000001").mkdir()
    assert_error(capsys, out, "imagenet", str(tmp_path / "in"), message="n00000001: no images")
    photo(20, 20, 0).save(tmp_path / "in" / "train" / "n00000001" / "a.JPEG")
    assert_error(capsys, out, "imagenet", str(tmp_path / "in"), message="val: no images")
    photo(20, 20, 1).save(tmp_path / "in" / "val" / "v.JPEG")
    assert_error(capsys, out, "imagenet", str(tmp_path / "in"), message="give its labels with --val-labels")
    assert not out.exists()


@pytest.mark.parametrize("edit,message", [
    (lambda lines: lines[:1], "no label for 3 images"),
    (lambda lines: lines + ["x.JPEG n00000001"], "1 listed images are not there"),
    (lambda lines: ["ILSVRC2012_val_00000001.JPEG 7"] + lines[1:], "label 7 out of range 0..2"),
    (lambda lines: ["ILSVRC2012_val_00000001.JPEG dog"] + lines[1:], "neither a synset"),
    (lambda lines: ["490"] + lines[1:], "expected 'IMAGE LABEL'"),
    (lambda lines: lines + lines[:1], "listed twice"),
])
def test_bad_val_labels(tmp_path, capsys, edit, message):
    _, val = make_imagenet(tmp_path / "in")
    write_labels(tmp_path / "labels.txt", val)
    lines = edit((tmp_path / "labels.txt").read_text().splitlines())
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    assert_error(capsys, tmp_path / "out", "imagenet", str(tmp_path / "in"), "--size", "8",
                 "--val-labels", str(tmp_path / "labels.txt"), message=message)


def add_truncated(root):
    path = root / "train" / "n00000002" / "broken.JPEG"
    photo(64, 48, seed=9).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:400])
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_unreadable_image_stop_and_skip(tmp_path, capsys, workers):
    files, val = make_imagenet(tmp_path / "in", flat_val=False)
    broken = add_truncated(tmp_path / "in")
    out = tmp_path / "out"
    args = ["imagenet", str(tmp_path / "in"), "--size", "8", "--shard-images", "3"]
    text = assert_error(capsys, out, *args, message=f"{broken}: unreadable image", workers=workers)
    assert "pass --on-error skip" in text
    left = [f for f in os.listdir(out) if f.endswith(".bin")]
    for f in left:   # whatever finished before the stop is a complete, valid shard
        assert alexnet.read_shard(str(out / f)).labels.shape == (3,)

    text = prepare_ok(capsys, *args, "--out", str(out), "--on-error", "skip", "--workers", str(workers))
    assert "skipped 1 unreadable images" in text
    log = (out / "skipped.txt").read_text().splitlines()
    assert len(log) == 1 and log[0].startswith(f"{broken}\t")
    labels, pixels = alexnet.read_split(str(out), "train")
    assert sorted((int(l), p.tobytes()) for l, p in zip(labels, pixels)) == expected_pairs(files, 8)
    assert sum(alexnet.read_shard(p).labels.shape[0] for p in alexnet.shard_paths(str(out), "train")) == 9


def load_or_die(items, labels):
    """A Split.load whose worker process dies (as if killed) on the item "die"."""
    if "die" in items:
        os._exit(1)
    pixels = np.stack([np.full((8, 8, 3), int(item), np.uint8) for item in items])
    return pixels, np.ones(len(items), bool), []


def test_a_worker_that_dies_stops_the_run_cleanly(tmp_path):
    import signal
    items = ["1", "2", "3", "4", "die", "6"]
    splits = [alexnet.Split("train", items, np.zeros(6, np.int32), load_or_die, 2, 8),
              alexnet.Split("val", ["7"], np.zeros(1, np.int32), load_or_die, 2, 8)]
    source = alexnet.Source(splits, ["only"], 8, {})

    def hung(*_):
        raise TimeoutError("prepare hung after a worker died")
    signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        with pytest.raises(alexnet.AlexNetError, match="a worker process died"):
            alexnet._prepare("test", source, str(tmp_path), 2, 2, "stop", False)
    finally:
        signal.alarm(0)
    # shards finished before the death (which ones depends on timing) are complete and
    # correct; nothing else is left behind
    files = sorted(os.listdir(tmp_path))
    assert set(files) <= {"prepare.json", "train_000.bin", "train_001.bin"}, files
    for k, f in enumerate(f for f in files if f.endswith(".bin")):
        assert alexnet.read_shard(str(tmp_path / f)).pixels[:, 0, 0, 0].tolist() == [2 * k + 1, 2 * k + 2]


SLOW_PREPARE = """
import os, sys, time
import numpy as np
import alexnet

def load_slowly(items, labels):
    open(os.path.join(sys.argv[2], "started"), "w").close()
    time.sleep(0.2)
    return np.zeros((len(items), 8, 8, 3), np.uint8), np.ones(len(items), bool), []

if __name__ == "__main__":
    splits = [alexnet.Split(name, [str(i) for i in range(200)], np.zeros(200, np.int32), load_slowly, 2, 8)
              for name in ("train", "val")]
    try:
        alexnet._prepare("test", alexnet.Source(splits, ["only"], 8, {}), sys.argv[1], 2, 10, "stop", False)
    except KeyboardInterrupt:
        sys.exit(130)
"""


def test_ctrl_c_stops_the_workers_quietly_and_leaves_no_temporary_file(tmp_path):
    """Ctrl-C reaches the whole process group: the workers ignore it, the main process
    stops them, removes the unfinished shard files and exits; no worker traceback."""
    import signal
    import subprocess
    import sys
    import time
    script, out = tmp_path / "slow_prepare.py", tmp_path / "out"
    script.write_text(SLOW_PREPARE)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(alexnet.__file__)))
    process = subprocess.Popen([sys.executable, str(script), str(out), str(tmp_path)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)   # a few chunks in: some shards finished, one being written
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr.decode()
    assert b"Traceback" not in stderr and b"Process" not in stderr, stderr.decode()
    left = sorted(os.listdir(out))
    assert not [f for f in left if f.endswith(".tmp")] and "stats.bin" not in left, left
    for f in left:
        if f.endswith(".bin"):
            assert alexnet.read_shard(str(out / f)).labels.shape == (10,)


def test_bad_cifar_and_options(tmp_path, capsys):
    out = tmp_path / "out"
    make_cifar(tmp_path / "c")
    os.remove(tmp_path / "c" / "data_batch_3.bin")
    assert_error(capsys, out, "cifar10", str(tmp_path / "c"), message="missing data_batch_3.bin")
    (tmp_path / "c" / "data_batch_3.bin").write_bytes(b"\0" * 3070)
    assert_error(capsys, out, "cifar10", str(tmp_path / "c"), message="not a whole number of 3073-byte records")
    (tmp_path / "c" / "data_batch_3.bin").write_bytes(b"\x0c" + b"\0" * 3072)
    assert_error(capsys, out, "cifar10", str(tmp_path / "c"), message="record 0 has label 12")
    assert_error(capsys, out, "cifar10", message="cifar10 needs PATH")
    assert_error(capsys, out, "cifar10", str(tmp_path / "c"), "--classes", "3", message="cifar10 takes no --classes")
    assert_error(capsys, out, "synthetic", str(tmp_path), message="takes no PATH")
    assert_error(capsys, out, "synthetic", "--train-images", "0", message="--train-images")
    (tmp_path / "a_file").write_text("")
    assert_error(capsys, tmp_path / "a_file", "synthetic", message="a_file: File exists")
    assert not out.exists()


def test_foreign_output_folder_needs_force(tmp_path, capsys):
    out = tmp_path / "out"
    small = ["--train-images", "20", "--val-images", "10", "--workers", "1"]
    prepare_ok(capsys, "synthetic", "--out", str(out), *small)
    before = file_bytes(out)
    code, text = run(capsys, "prepare", "synthetic", "--out", str(out), "--seed", "1", *small)
    assert code == 1 and text.startswith("error: ") and "pass --force" in text
    assert file_bytes(out) == before   # nothing overwritten
    prepare_ok(capsys, "synthetic", "--out", str(out), "--seed", "1", "--force", *small)
    assert file_bytes(out) != before


@pytest.mark.parametrize("damage,message", [
    (lambda raw: raw[:2000], "header says"),
    (lambda raw: raw[:100], "truncated dataset shard"),
    (lambda raw: struct.pack("<i", 7) + raw[4:], "not a dataset shard"),
    (lambda raw: raw[:4] + struct.pack("<i", 2) + raw[8:], "version 2"),
])
def test_read_shard_rejects_damaged_files(tmp_path, capsys, damage, message):
    prepare_ok(capsys, "synthetic", "--out", str(tmp_path), "--train-images", "5", "--val-images", "5",
               "--workers", "1")
    path = tmp_path / "bad.bin"
    path.write_bytes(damage((tmp_path / "train_000.bin").read_bytes()))
    with pytest.raises(alexnet.AlexNetError, match=message):
        alexnet.read_shard(str(path))
    with pytest.raises(alexnet.AlexNetError, match="not a statistics file"):
        alexnet.read_stats(str(tmp_path / "train_000.bin"))


def test_readers_refuse_special_files_without_blocking(tmp_path):
    """A FIFO would block open() forever, a folder gives an obscure error: both are named."""
    os.mkfifo(tmp_path / "pipe.bin")
    for read in (alexnet.read_shard, alexnet.read_stats, alexnet.load_checkpoint):
        with pytest.raises(alexnet.AlexNetError, match="pipe.bin is a FIFO, not a regular file"):
            read(str(tmp_path / "pipe.bin"))
        with pytest.raises(alexnet.AlexNetError, match="is a folder, not a regular file"):
            read(str(tmp_path))


@pytest.mark.parametrize("label", [-1, 10])
def test_read_shard_rejects_labels_out_of_range(tmp_path, label):
    """A label outside [0, classes) would index past the class list (or, -1, score as the
    last class): the shard is refused, as the executable refuses it."""
    path = tmp_path / "train_000.bin"
    alexnet.write_shard(str(path), np.array([0, 9, 3]), np.zeros((3, 4, 4, 3), np.uint8), 10)
    raw = bytearray(path.read_bytes())
    raw[1024 + 4:1024 + 8] = struct.pack("<i", label)
    path.write_bytes(bytes(raw))
    for read in (lambda: alexnet.read_shard(str(path)), lambda: alexnet.read_split(str(tmp_path), "train")):
        with pytest.raises(alexnet.AlexNetError, match=f"label {label} of image 1 is out of range"):
            read()


@pytest.mark.parametrize("height,width,classes", [(8193, 1, 10), (1, 8193, 10), (2, 2, 1000001)])
def test_read_shard_rejects_implausible_sizes(tmp_path, height, width, classes):
    """Header fields beyond the plausible ranges are refused even where the file's size agrees."""
    header = np.zeros(256, "<i4")
    header[:7] = [alexnet.SHARD_MAGIC, 1, 1, height, width, 3, classes]
    path = tmp_path / "big.bin"
    path.write_bytes(header.tobytes() + bytes(4 + height * width * 3))
    with pytest.raises(alexnet.AlexNetError, match="impossible shard header"):
        alexnet.read_shard(str(path))
    header[:5] = [alexnet.STATS_MAGIC, 1, height, width, 3]
    header[5:7] = 0
    path.write_bytes(header.tobytes() + bytes(4 * (height * width * 3 + 12)))
    if classes <= alexnet.MAX_CLASSES:
        with pytest.raises(alexnet.AlexNetError, match="impossible statistics header"):
            alexnet.read_stats(str(path))


def test_command_line_end_to_end(tmp_path):
    """The real entry point, in its own process, with worker processes."""
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "alexnet.py")
    out = tmp_path / "out"
    ok = subprocess.run([sys.executable, script, "prepare", "synthetic", "--out", str(out), "--train-images", "60",
                         "--val-images", "20", "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert alexnet.read_split(str(out), "train")[0].shape == (60,)
    bad = subprocess.run([sys.executable, script, "prepare", "imagenet", str(tmp_path / "missing"), "--out",
                          str(tmp_path / "o2")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


# --- the shard list: numbered from 000 without gaps, every one a readable regular file ---

def _gap(folder):
    os.remove(folder / "train_001.bin")


def _dangling_link(folder):
    os.remove(folder / "train_001.bin")
    os.symlink(folder / "nowhere.bin", folder / "train_001.bin")


def _link_loop(folder):
    os.remove(folder / "train_001.bin")
    os.symlink(folder / "loop_b", folder / "train_001.bin")
    os.symlink(folder / "train_001.bin", folder / "loop_b")


def _broken_val(folder):
    os.remove(folder / "val_000.bin")
    os.symlink(folder / "nowhere.bin", folder / "val_000.bin")


@pytest.mark.parametrize("damage,split,message", [
    (_gap, "train", "train_001.bin is missing, but .*/train_002.bin exists: shards must be numbered without gaps"),
    (_dangling_link, "train", "train_001.bin: a broken symbolic link: No such file or directory"),
    (_link_loop, "train", "train_001.bin: a broken symbolic link: Too many levels of symbolic links"),
    (_broken_val, "val", "val_000.bin: a broken symbolic link"),
], ids=["gap", "dangling link", "link loop", "broken validation shard"])
def test_a_gap_or_a_broken_link_among_the_shards_is_an_error(tmp_path, capsys, damage, split, message):
    """A split is never silently shorter: a missing shard number or a shard that cannot be
    opened is named, in the listing, in read_split and in the commands that read a split."""
    data = tmp_path / "data"
    prepare_ok(capsys, "synthetic", "--out", str(data), "--train-images", "30", "--val-images", "10",
               "--shard-images", "10", "--workers", "1")
    assert [os.path.basename(p) for p in alexnet.shard_paths(str(data), "train")] == \
        ["train_000.bin", "train_001.bin", "train_002.bin"]
    damage(data)
    for read in (alexnet.shard_paths, alexnet.read_split):
        with pytest.raises(alexnet.AlexNetError, match=message):
            read(str(data), split)
    if split == "val":   # eval reads the validation split
        arch = alexnet.architecture("small", 10)
        alexnet.save_checkpoint(str(tmp_path / "c.bin"), arch, alexnet.init_params(arch, np.random.default_rng(0)))
        code, text = run(capsys, "eval", str(tmp_path / "c.bin"), "--data", str(data))
        assert code == 1 and text.count("\n") == 1 and message in text, text


def test_shard_names_the_executable_does_not_open_are_not_shards(tmp_path):
    """train_0001.bin or train_01.bin are not train_001.bin: ignored, as the executable ignores them."""
    alexnet.write_shard(str(tmp_path / "train_000.bin"), [1], np.zeros((1, 4, 4, 3), np.uint8), 10)
    for name in ("train_0001.bin", "train_01.bin", "train_001.bin.tmp", "val_000.bin.tmp"):
        (tmp_path / name).write_bytes(b"")
    assert alexnet.shard_paths(str(tmp_path), "train") == [str(tmp_path / "train_000.bin")]
    with pytest.raises(alexnet.AlexNetError, match="no val_000.bin"):
        alexnet.shard_paths(str(tmp_path), "val")


def test_a_stop_right_after_a_shard_is_renamed_keeps_it_recorded(tmp_path, capsys, monkeypatch):
    """Ctrl-C landing just after a finished shard got its final name: prepare.json records
    it, and the rerun verifies and keeps it instead of writing it again."""
    args = ["synthetic", "--train-images", "40", "--val-images", "10", "--shard-images", "10", "--workers", "1"]
    prepare_ok(capsys, *args, "--out", str(tmp_path / "fresh"))
    out = tmp_path / "out"
    rename = os.replace

    def interrupted_after(src, dst):
        rename(src, dst)
        if os.path.basename(dst) == "train_001.bin":
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted_after)
    code, text = run(capsys, "prepare", *args, "--out", str(out))
    monkeypatch.setattr(os, "replace", rename)
    assert code == 130 and "interrupted" in text
    recorded = json.loads((out / "prepare.json").read_text())["shards"]
    assert sorted(recorded) == ["train_000.bin", "train_001.bin"]
    assert sorted(f for f in os.listdir(out) if f.endswith(".bin")) == ["train_000.bin", "train_001.bin"]
    kept = os.stat(out / "train_001.bin")

    assert "resuming: 2 finished shards verified, 3 to go" in prepare_ok(capsys, *args, "--out", str(out))
    assert (os.stat(out / "train_001.bin").st_ino, os.stat(out / "train_001.bin").st_mtime_ns) == \
        (kept.st_ino, kept.st_mtime_ns)   # not written again
    assert file_bytes(out) == file_bytes(tmp_path / "fresh")
