"""How hard is the built-in synthetic set? A linear classifier vs a small convnet.

    python dev/synthetic_baselines.py [--epochs 6] [--seconds S] [--data DIR]

Prepares the default synthetic set (10,000 training / 2,000 validation images, 32x32,
seed 0) unless --data names one, then prints the validation accuracy of
  linear   ridge regression on raw pixels (NumPy, one-vs-all targets), the best of
           several ridge strengths chosen on the validation set itself (so, if anything,
           an optimistic number for the linear model)
  convnet  a small convnet (3 conv + 2 fc layers, Adam) trained with PyTorch on the CPU
           for --epochs (or until --seconds), on random 28x28 crops with flips, tested
           on the centre crop (the small preset's input handling) after every epoch.
           Needs `pip install torch` (dev only). An epoch takes ~3 s on 2 idle cores.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import alexnet  # noqa: E402


def linear_accuracy(train, val):
    def features(pixels):
        x = pixels.reshape(len(pixels), -1).astype(np.float32) / 255
        return np.hstack([x, np.ones((len(x), 1), np.float32)])
    x, xv = features(train[1]), features(val[1])
    gram, target = (x.T @ x).astype(np.float64), x.T.astype(np.float64) @ np.eye(10)[train[0]]
    return max(np.mean(np.argmax(xv @ np.linalg.solve(gram + r * np.eye(len(gram)), target), axis=1) == val[0])
               for r in (1, 10, 100, 1000))


def convnet_accuracy(train, val, epochs, seconds, seed=0):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(seed)

    def tensor(pixels):
        return torch.tensor(pixels).permute(0, 3, 1, 2).float()
    x, y = tensor(train[1]), torch.tensor(train[0]).long()
    xv, yv = tensor(val[1]), torch.tensor(val[0]).long()
    mean = x.mean(0, keepdim=True)
    x, xv = (x - mean) / 64, (xv - mean) / 64
    crop, margin = 28, x.shape[2] - 28
    net = nn.Sequential(
        nn.Conv2d(3, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(48, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Flatten(), nn.LazyLinear(128), nn.ReLU(), nn.Linear(128, 10))
    centre = slice(margin // 2, margin // 2 + crop)
    net(xv[:1, :, centre, centre])
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    start, epoch, accuracy = time.time(), 0, 0.0
    while epoch < epochs and time.time() - start < seconds:
        net.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            batch = order[i:i + 64]
            dy, dx = rng.integers(0, margin + 1, 2)
            images = x[batch][:, :, dy:dy + crop, dx:dx + crop]
            if rng.random() < 0.5:
                images = images.flip(3)
            loss = F.cross_entropy(net(images), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if time.time() - start > seconds:
                break
        epoch += 1
        net.eval()
        with torch.no_grad():
            accuracy = (net(xv[:, :, centre, centre]).argmax(1) == yv).float().mean().item()
        print(f"  convnet epoch {epoch}: {time.time() - start:5.1f} s, validation accuracy {accuracy:.1%}", flush=True)
    return accuracy, epoch


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=float("inf"), help="stop training after this long")
    parser.add_argument("--data", help="a prepared synthetic folder (default: prepare the default set)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or alexnet.prepare("synthetic", out=os.path.join(tmp, "synthetic"))
        train, val = alexnet.read_split(data, "train"), alexnet.read_split(data, "val")
    print(f"{len(train[0])} training, {len(val[0])} validation images of {train[1].shape[1]}x{train[1].shape[2]}, "
          "10 classes (chance 10%)")
    print(f"linear classifier on raw pixels: {linear_accuracy(train, val):.1%}", flush=True)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("convnet: skipped, PyTorch is not installed (pip install torch)")
        return
    start = time.time()
    accuracy, epochs = convnet_accuracy(train, val, args.epochs, args.seconds)
    print(f"small convnet, {epochs} epochs ({time.time() - start:.0f} s of CPU training): {accuracy:.1%}")


if __name__ == "__main__":
    main()
