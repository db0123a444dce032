"""Helpers for the model/training tests: tiny dataset folders (alexnet.write_shard and
write_stats, the format `alexnet.py prepare` writes) and runs of the training executable."""
import os
import subprocess

import numpy as np

import alexnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ALEXNET_EXE names another build of the executable (make test-asan: the ASan one).
EXE = os.path.abspath(os.environ.get("ALEXNET_EXE") or os.path.join(ROOT, "train_alexnet_cpu"))
# Unit roundoff of the tensor cores' operand formats: half a unit in the last of their 10
# (TF32) or 7 (BF16) mantissa bits, relative.
UNIT_ROUNDOFF = {"tf32": 2.0 ** -11, "bf16": 2.0 ** -8}


def pca_stats(images):
    """Mean image and the eigen-decomposition of the RGB covariance (descending)."""
    pixels = images.reshape(-1, 3).astype(np.float64)
    values, vectors = np.linalg.eigh(np.cov(pixels.T, bias=True))
    order = values.argsort()[::-1]
    return images.astype(np.float64).mean(axis=0), values[order], vectors[:, order]


def random_dataset(folder, train, val=0, size=32, classes=10, seed=0):
    """A folder of random images (the tests that need no learnable signal). Returns
    (train images, train labels, stats) as written."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (train, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, train)
    alexnet.write_shard(os.path.join(folder, "train_000.bin"), labels, images, classes)
    if val:
        alexnet.write_shard(os.path.join(folder, "val_000.bin"), rng.integers(0, classes, val),
                            rng.integers(0, 256, (val, size, size, 3), dtype=np.uint8), classes)
    stats = pca_stats(images)
    alexnet.write_stats(os.path.join(folder, "stats.bin"), *stats)
    return images, labels, stats


def small_2012_code(classes):
    """The 2012 code's layers (conv1 LRN pool ReLU, conv2's within-map normalisation) on the
    small preset's sizes: a checkpoint's header carries the sizes, so the executable trains
    this as the alexnet-2012-code preset, with that preset's recipe."""
    code = alexnet.PRESETS["alexnet-2012-code"]
    layers = {k: v for k, v in code.items() if k.startswith(("conv1_", "spatial_"))}
    return dict(alexnet.architecture("small", classes), preset=code["preset"], **layers)


def run(*args, env=None, **kwargs):
    """Run the CPU training executable; returns the CompletedProcess (text output)."""
    full_env = dict(os.environ, **(env or {}))
    kwargs.setdefault("timeout", 600)  # a hang fails the test instead of the whole suite
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, env=full_env, **kwargs)


def learnable_dataset(folder, train, val=0, size=32, classes=10, seed=0):
    """An easy set for a quick learning test: class c is a square of colour c (evenly
    spaced hues) at a random place on a random grey background, plus noise."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    hues = np.arange(classes) / classes * 2 * np.pi
    colours = 128 + 110 * np.stack([np.cos(hues), np.cos(hues - 2.1), np.cos(hues + 2.1)], axis=1)

    def images(n):
        labels = rng.integers(0, classes, n)
        pixels = np.repeat(rng.integers(40, 200, (n, 1, 1, 1)), 3, axis=3) * np.ones((n, size, size, 3))
        for i, label in enumerate(labels):
            side = rng.integers(size // 4, size // 2)
            y, x = rng.integers(0, size - side, 2)
            pixels[i, y:y + side, x:x + side] = colours[label]
        pixels += rng.normal(0, 20, pixels.shape)
        return labels, np.clip(pixels, 0, 255).astype(np.uint8)

    labels, pixels = images(train)
    alexnet.write_shard(os.path.join(folder, "train_000.bin"), labels, pixels, classes)
    if val:
        alexnet.write_shard(os.path.join(folder, "val_000.bin"), *images(val), classes)
    alexnet.write_stats(os.path.join(folder, "stats.bin"), *pca_stats(pixels))
