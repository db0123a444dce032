"""Benchmark: `prepare imagenet` against a naive one-process baseline, images/s.

    python dev/bench_prepare.py                    # ~500x375 JPEGs, quality 90
    python dev/bench_prepare.py --size 1600x1200   # large photos (draft mode helps)

Makes an ImageNet-layout folder of generated photo-like JPEGs in a temporary folder,
then times, on the same files in the same run:
  naive  open with Pillow, convert to RGB (full-size decode), resize the shorter side to
         256 (same bilinear filter), crop the centre, one process, nothing written
  ours   the whole `prepare imagenet` (decode, resize, shards, statistics), with 1 worker
         and with all cores
and, one process, three parts of ours that bound it:
  load_image   decode (draft mode) and resize only: no statistics, no shards
  decode only  Pillow's decode at full size and nothing else: the ceiling of any
               pipeline that must decode every pixel, as at 500x375, where draft mode
               cannot reduce without the shorter side falling below 256
  decode at 1/8  the decoder's smallest scale: what remains is mostly the entropy
               (Huffman) decoding, which no JPEG decoder can skip at any scale
After one warm-up pass (files in the page cache), all are timed in turn for --rounds
rounds; the best time of each counts. Besides wall-clock images/s (per core: divided by
the workers), it prints images per CPU-second (this process and its workers), which a
busy machine disturbs much less than wall-clock time, and the main process's own CPU
time per image: with workers, what limits how many of them it can keep busy.
"""
import argparse
import os
import sys
import tempfile
import time
from functools import partial

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import alexnet  # noqa: E402


def photo(width, height, rng):
    """Smooth colour regions, edges and fine texture: JPEG sizes like real photos
    (~100 KB at 500x375, quality 90)."""
    coarse = Image.fromarray(rng.integers(0, 256, (height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8))
    image = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    image = image + rng.normal(0, 14, (height, width, 1)) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def make_imagenet(root, count, width, height, classes=8, seed=0):
    rng = np.random.default_rng(seed)
    files = []
    for split, n in (("train", count), ("val", max(classes, count // 10))):
        for i in range(n):
            synset = f"n{i % classes:08d}"
            folder = os.path.join(root, split, synset)
            os.makedirs(folder, exist_ok=True)
            w, h = (width, height) if i % 4 else (height, width)   # every 4th a portrait
            path = os.path.join(folder, f"{split}_{i:06d}.JPEG")
            photo(w, h, rng).save(path, "JPEG", quality=90)
            files.append(path)
    return files


def cpu_seconds():
    """CPU time of (this process, this process and its finished children: the pool's workers)."""
    t = os.times()
    return t.user + t.system, t.user + t.system + t.children_user + t.children_system


def naive(path, size=256):
    im = Image.open(path).convert("RGB")
    w, h = im.size
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((w, h), Image.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def decode(path, scale=1):
    with Image.open(path) as im:
        if scale > 1:
            im.draft("RGB", (im.width // scale, im.height // scale))
        im.load()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=800, help="training images (val: a tenth more)")
    parser.add_argument("--size", default="500x375", help="WxH of the generated JPEGs")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the best time of each counts")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        files = make_imagenet(os.path.join(tmp, "in"), args.images, width, height)
        kb = np.mean([os.path.getsize(f) for f in files]) / 1024
        out = os.path.join(tmp, "out")

        def ours(workers):
            with open(os.devnull, "w") as quiet:
                stdout, sys.stdout = sys.stdout, quiet
                try:
                    alexnet.prepare("imagenet", os.path.join(tmp, "in"), out, workers=workers, force=True)
                finally:
                    sys.stdout = stdout
            for f in os.listdir(out):
                os.remove(os.path.join(out, f))

        for path in files:   # warm-up: files in the page cache
            naive(path)
        n = len(files)
        runs = [("naive, 1 process", 1, lambda: [naive(p) for p in files])]
        runs += [(f"ours, {w} worker{'s' * (w > 1)}", w, partial(ours, w)) for w in sorted({1, args.workers})]
        runs += [("load_image", 1, lambda: [alexnet.load_image(p) for p in files]),
                 ("decode only", 1, lambda: [decode(p) for p in files]),
                 ("decode at 1/8", 1, lambda: [decode(p, 8) for p in files])]
        wall, cpu, main_cpu = ({name: float("inf") for name, _, _ in runs} for _ in range(3))
        for _ in range(args.rounds):   # interleaved, so that a change of machine load hits all alike
            for name, _, function in runs:
                start, start_cpu = time.perf_counter(), cpu_seconds()
                function()
                wall[name] = min(wall[name], time.perf_counter() - start)
                end_cpu = cpu_seconds()
                cpu[name] = min(cpu[name], end_cpu[1] - start_cpu[1])
                main_cpu[name] = min(main_cpu[name], end_cpu[0] - start_cpu[0])
        rows = [(name, workers, n / wall[name], n / cpu[name], 1e3 * main_cpu[name] / n) for name, workers, _ in runs]
    base_wall, base_cpu = rows[0][2], rows[0][3]
    print(f"{n} JPEGs of {width}x{height} (and {height}x{width}), quality 90, mean {kb:.0f} KB; "
          f"{os.cpu_count()} cores; Pillow {Image.__version__}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'':18s} {'images/s':>9s} {'per core':>9s} {'vs naive':>9s}   "
          f"{'images per CPU-second':>22s} {'vs naive':>9s} {'main process ms/image':>22s}")
    for name, workers, speed, per_cpu, main_ms in rows:
        print(f"{name:18s} {speed:9.0f} {speed / workers:9.0f} {speed / workers / base_wall:8.2f}x   "
              f"{per_cpu:22.0f} {per_cpu / base_cpu:8.2f}x {main_ms:22.2f}")

if __name__ == "__main__":
    main()
