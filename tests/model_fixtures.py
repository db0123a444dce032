"""Helpers for the model/training tests: tiny dataset folders in the issue-4 format, written
here independently of `alexnet.py prepare`, and runs of the training executable."""
import os
import subprocess

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXE = os.path.join(ROOT, "train_alexnet_cpu")


def write_shard(path, images, labels, classes, magic=20121001):
    """One shard: int32 header[256], int32 labels[N], uint8 pixels[N][H][W][3]."""
    N, H, W, C = images.shape
    header = np.zeros(256, "<i4")
    header[:7] = [magic, 1, N, H, W, C, classes]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(labels, "<i4").tobytes())
        f.write(np.asarray(images, np.uint8).tobytes())


def write_stats(path, mean, eigval, eigvec):
    """stats.bin: int32 header[256], float32 mean[H][W][3], eigval[3], eigvec[3][3]."""
    H, W, C = mean.shape
    header = np.zeros(256, "<i4")
    header[:5] = [20121002, 1, H, W, C]
    with open(path, "wb") as f:
        for a in (header, np.asarray(mean, "<f4"), np.asarray(eigval, "<f4"), np.asarray(eigvec, "<f4")):
            f.write(a.tobytes())


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
    write_shard(os.path.join(folder, "train_000.bin"), images, labels, classes)
    if val:
        write_shard(os.path.join(folder, "val_000.bin"), rng.integers(0, 256, (val, size, size, 3), dtype=np.uint8),
                    rng.integers(0, classes, val), classes)
    stats = pca_stats(images)
    write_stats(os.path.join(folder, "stats.bin"), *stats)
    return images, labels, stats


def run(*args, env=None, **kwargs):
    """Run the CPU training executable; returns the CompletedProcess (text output)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, env=full_env, **kwargs)
