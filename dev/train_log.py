"""Judge a training log: losses finite and falling, and the images/s.

    python dev/train_log.py OUT/log.txt
prints one line: "PASS (losses finite, mean of first k A -> last k B; S images/s)" or
"FAIL (...)". Reads the executable's step lines ("step 12/50 | ... | loss 2.3047 | ...
| 3.8 img/s | ..."); k is a fifth of the steps (at least 1); "falling" means the mean
loss of the last k steps is below that of the first k; the speed is the median over
the second half of the steps (the first ones include start-up).
"""
import math
import re
import sys

LOSS = re.compile(r"\bloss (-?nan|-?inf|[-+0-9.eE]+)")
SPEED = re.compile(r"([0-9.]+) ?(?:images|img)/s")


def verdict(lines):
    steps = [line for line in lines if line.startswith("step ")]
    losses = [float(m.group(1)) for m in map(LOSS.search, steps) if m]
    speeds = [float(m.group(1)) for m in map(SPEED.search, steps) if m]
    if len(losses) < 2:
        return "FAIL (fewer than two step lines with a loss in the log)"
    finite = all(math.isfinite(x) for x in losses)
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    later = sorted(speeds[len(speeds) // 2:])
    speed = later[len(later) // 2] if later else 0.0
    falling = last < first
    return (f"{'PASS' if finite and falling else 'FAIL'} (losses {'finite' if finite else 'NOT FINITE'}, "
            f"mean of first {k} {first:.4f} -> last {k} {last:.4f}{'' if falling else ' NOT FALLING'}; "
            f"{speed:.1f} images/s)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python dev/train_log.py LOG")
    try:
        with open(sys.argv[1]) as f:
            print(verdict(f.readlines()))
    except OSError as e:
        sys.exit(f"error: {e.strerror}: {sys.argv[1]}")
