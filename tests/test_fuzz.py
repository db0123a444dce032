"""Fuzzing the file readers: seeded random mutations of a valid checkpoint, training shard
and stats.bin, each run through the executable (a training step, and --eval) and through
the Python readers. Every outcome must be one of:
  - a clean refusal: exit status 1, and exactly one line on stderr, "error: ...";
  - a run whose outputs are sound: finite training losses, a checkpoint that
    alexnet.load_checkpoint accepts (finite numbers, header fields within range), and
    evaluation scores that are fractions, whose loss is finite, or NaN with 100% error
    (finite but huge weights can overflow a logit: that is reported, not hidden).
Never a crash, a signal, a hang (every run has a timeout), a traceback or a second line.
`make test` runs FUZZ_CASES cases of each kind; `make test-slow` runs many more, and
`make test-asan` runs these against the AddressSanitizer/UBSan executable."""
import os
import re
import shutil

import numpy as np
import pytest

import alexnet
from model_fixtures import random_dataset, run

FUZZ_CASES = 12       # per file kind in `make test`
FUZZ_CASES_SLOW = 120  # per file kind in `make test-slow`
TIMEOUT = 300          # seconds for one run (the ASan build is several times slower)
SPECIAL_INTS = [0, 1, -1, 2, 3, 255, 256, 65536, 2**31 - 1, -2**31, 842443544]
SPECIAL_FLOATS = [np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-45, -0.0]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """A valid dataset (32 training and 8 validation images of 32x32, 10 classes) and a
    checkpoint of one step of the small preset on it."""
    root = tmp_path_factory.mktemp("fuzz")
    random_dataset(root / "data", 32, val=8, size=32, classes=10)
    result = run("--data", root / "data", "--arch", "small", "--batch", 8, "--steps", 1, "--out", root / "out")
    assert result.returncode == 0, result.stderr
    return root


def mutate(data, rng):
    """One random mutation of a file's bytes: header fields set to special or random
    values, random bytes flipped (header or body), a body float set to a special value,
    a truncation, or appended garbage. Returns (bytes, description)."""
    data = bytearray(data)
    kind = rng.choice(["header int", "header bytes", "body bytes", "body float", "truncate", "append"],
                      p=[0.3, 0.15, 0.2, 0.2, 0.075, 0.075])
    if kind == "header int":
        changes = []
        for _ in range(rng.integers(1, 4)):
            field = int(rng.integers(0, 64))
            value = int(rng.choice(SPECIAL_INTS)) if rng.random() < 0.7 else int(rng.integers(-2**31, 2**31))
            data[4 * field:4 * field + 4] = np.int32(value).tobytes()
            changes.append(f"field {field} = {value}")
        return bytes(data), "header " + ", ".join(changes)
    if kind in ("header bytes", "body bytes"):
        lo, hi = (0, 1024) if kind == "header bytes" else (1024, len(data))
        where = rng.integers(lo, hi, rng.integers(1, 9))
        for i in where:
            data[i] ^= 1 << int(rng.integers(0, 8))
        return bytes(data), f"{kind} flipped at {sorted(int(i) for i in where)}"
    if kind == "body float":
        index = int(rng.integers(0, (len(data) - 1024) // 4))
        value = rng.choice(SPECIAL_FLOATS)
        data[1024 + 4 * index:1024 + 4 * index + 4] = np.float32(value).tobytes()
        return bytes(data), f"body float {index} = {value}"
    if kind == "truncate":
        size = int(rng.integers(0, len(data)))
        return bytes(data[:size]), f"truncated to {size} bytes"
    extra = int(rng.integers(1, 4096))
    return bytes(data) + rng.integers(0, 256, extra, dtype=np.uint8).tobytes(), f"{extra} bytes appended"


def assert_clean_refusal(result, case):
    assert result.returncode == 1, f"{case}: status {result.returncode}\n{result.stderr[-3000:]}"
    lines = [l for l in result.stderr.splitlines() if not l.startswith("10-view evaluation:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}: {result.stderr[-3000:]}"


def assert_sound_training(result, out, case):
    """A finished training run: finite losses in its log, every checkpoint sound."""
    losses = re.findall(r"\| (?:val )?loss (\S+)", result.stdout)
    assert losses and all(np.isfinite(float(v)) for v in losses), f"{case}: {result.stdout}"
    checkpoints = [name for name in os.listdir(out) if name.startswith("ckpt_")]
    assert checkpoints, case
    for name in checkpoints:
        alexnet.load_checkpoint(str(out / name))  # finite numbers, header within range, or it raises


def assert_sound_evaluation(result, case):
    scores = re.findall(r"\| val loss (\S+) \| top-1 error (\S+) \| top-5 error (\S+) \|", result.stdout)
    assert len(scores) == 2, f"{case}: {result.stdout}"
    for loss, top1, top5 in scores:
        loss, top1, top5 = float(loss), float(top1), float(top5)
        assert 0 <= top1 <= 1 and 0 <= top5 <= top1, f"{case}: {result.stdout}"
        assert np.isfinite(loss) or (np.isnan(loss) and top1 == 1 and top5 == 1), f"{case}: {result.stdout}"


def judge(result, case, out=None):
    if result.returncode != 0:
        assert_clean_refusal(result, case)
        if out is not None and out.exists():  # a refused run writes no checkpoint
            assert not [n for n in os.listdir(out) if n.startswith("ckpt_")], f"{case}: {os.listdir(out)}"
    elif out is not None:
        assert_sound_training(result, out, case)
    else:
        assert_sound_evaluation(result, case)


def python_reader_outcome(read, path, case):
    """The Python reader either raises AlexNetError or returns sound values."""
    try:
        value = read(str(path))
    except alexnet.AlexNetError:
        return
    arrays = value if isinstance(value, tuple) else (value,)
    for array in arrays:
        for item in (array.values() if isinstance(array, dict) else [array]):
            if isinstance(item, np.ndarray) and item.dtype.kind == "f":
                assert np.isfinite(item).all(), case


def header_step(data):
    """The step field of a (mutated) checkpoint header, clipped to a usable --steps bound."""
    if len(data) < 1024:
        return 0
    step = int(np.frombuffer(data, "<i8", count=1, offset=160)[0])
    return min(max(step, 0), 2**31 - 2)


def fuzz(kind, cases, originals, tmp_path):
    rng = np.random.default_rng({"checkpoint": 1, "shard": 2, "stats": 3}[kind])
    source = {"checkpoint": originals / "out" / "ckpt_00000001.bin",
              "shard": originals / "data" / "train_000.bin",
              "stats": originals / "data" / "stats.bin"}[kind]
    good_checkpoint = originals / "out" / "ckpt_00000001.bin"
    for i in range(cases):
        work = tmp_path / f"case{i}"
        shutil.copytree(originals / "data", work / "data")
        data, description = mutate(source.read_bytes(), rng)
        case = f"{kind} case {i}: {description}"
        if kind == "checkpoint":
            target = work / "ckpt.bin"
            target.write_bytes(data)
            python_reader_outcome(alexnet.load_checkpoint, target, case)
            trained = run("--data", work / "data", "--resume", target, "--steps", header_step(data) + 1,
                          "--log-every", 1, "--out", work / "out", timeout=TIMEOUT)
            evaluated = run("--data", work / "data", "--resume", target, "--eval", timeout=TIMEOUT)
        else:
            target = work / "data" / source.name
            target.write_bytes(data)
            read = alexnet.read_shard if kind == "shard" else alexnet.read_stats
            python_reader_outcome(read, target, case)
            python_reader_outcome(lambda folder: alexnet.read_split(folder, "train"), work / "data", case)
            trained = run("--data", work / "data", "--arch", "small", "--batch", 8, "--steps", 1,
                          "--out", work / "out", timeout=TIMEOUT)
            evaluated = run("--data", work / "data", "--resume", good_checkpoint, "--eval", timeout=TIMEOUT)
        judge(trained, case, work / "out")
        judge(evaluated, case)
        shutil.rmtree(work)


@pytest.mark.parametrize("kind", ["checkpoint", "shard", "stats"])
def test_fuzz(kind, originals, tmp_path):
    fuzz(kind, FUZZ_CASES, originals, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["checkpoint", "shard", "stats"])
def test_fuzz_many(kind, originals, tmp_path):
    fuzz(kind, FUZZ_CASES_SLOW, originals, tmp_path)
