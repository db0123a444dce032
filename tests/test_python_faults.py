"""Faults of the Python command line: stopping `alexnet.py train`, checkpoints that do not
fit the dataset, damaged checkpoints and statistics, missing modules, mistyped flags."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import alexnet
from model_fixtures import ROOT, random_dataset

SCRIPT = os.path.join(ROOT, "alexnet.py")


def run_script(*args, **kwargs):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, **kwargs)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# --- Ctrl-C on `alexnet.py train`: the trainer checkpoints, the command exits with its status

@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_to_the_train_command_reaches_the_trainer(tmp_path, stop):
    data, out = tmp_path / "data", tmp_path / "out"
    random_dataset(data, 64, val=16)
    start = time.time()
    process = subprocess.Popen([sys.executable, SCRIPT, "train", "--data", str(data), "--arch", "small",
                                "--batch", "8", "--steps", "100000", "--log-every", "1", "--save-every", "0",
                                "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:   # the trainer's lines, through the Python process
            if line.startswith("step 2/"):
                break
        process.send_signal(stop)   # to the Python process only
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "interrupted: stopped after step" in stdout, stderr
    latest = os.readlink(out / "latest.bin")
    header, params, _ = alexnet.load_checkpoint(str(out / "latest.bin"))
    assert 2 <= header["step"] < 100000
    assert os.path.basename(latest) == f"ckpt_{header['step']:08d}.bin"
    assert os.path.getmtime(out / latest) >= start
    assert all(np.isfinite(p).all() for p in params.values())


def test_a_second_ctrl_c_is_forwarded_too_and_ends_the_trainer_at_once(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    random_dataset(data, 64)
    process = subprocess.Popen([sys.executable, SCRIPT, "train", "--data", str(data), "--arch", "small",
                                "--batch", "64", "--steps", "100000", "--log-every", "1", "--save-every", "0",
                                "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.startswith("step 1/"):
                break
        process.send_signal(signal.SIGINT)
        assert "a second Ctrl-C or SIGTERM stops at once" in process.stderr.readline()   # the trainer got it
        process.send_signal(signal.SIGINT)   # well within the step of 64 images
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGINT, stderr   # the trainer's end, as a shell reports it
    assert "stopped after step" not in stdout and "Traceback" not in stderr
    assert not os.path.exists(out / "latest.bin")


# --- missing modules and the commands alexnet.py prints

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny synthetic dataset (32x32, 10 classes) and a small-preset checkpoint for it."""
    folder = tmp_path_factory.mktemp("prepared")
    assert alexnet.main(["prepare", "synthetic", "--out", str(folder / "data"), "--train-images", "20",
                         "--val-images", "10", "--workers", "1"]) == 0
    arch = alexnet.architecture("small", 10)
    alexnet.save_checkpoint(str(folder / "small.bin"), arch, alexnet.init_params(arch, np.random.default_rng(0)))
    return folder


@pytest.mark.parametrize("module,command", [
    ("numpy", ["show", "curves", "out"]),        # imported first of all
    ("cffi", ["eval", "{ckpt}", "--data", "{data}"]),
    ("tqdm", ["eval", "{ckpt}", "--data", "{data}", "--views", "1"]),
    ("PIL", ["show", "filters", "{ckpt}", "--out", "{tmp}/f.png"]),
], ids=["numpy", "cffi", "tqdm", "PIL"])
def test_a_missing_module_is_named_with_the_way_to_get_it(prepared, tmp_path, module, command):
    """As under a Python without the project's dependencies (the module made unimportable)."""
    argv = [a.format(ckpt=prepared / "small.bin", data=prepared / "data", tmp=tmp_path) for a in command]
    code = (f"import runpy, sys; sys.modules[{module!r}] = None; sys.argv = ['alexnet.py'] + {argv!r}; "
            f"runpy.run_path({SCRIPT!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert_one_line_error(result, f"the Python module {module} is missing", ".venv/bin/python", "make venv")
    assert result.returncode == 1


def test_printed_commands_run_this_python_from_the_current_folder(monkeypatch, tmp_path):
    venv_python = os.path.join(ROOT, ".venv", "bin", "python")
    monkeypatch.setattr(sys, "executable", venv_python)
    monkeypatch.chdir(ROOT)
    assert alexnet.python_command("eval", "a b.bin") == ".venv/bin/python alexnet.py eval 'a b.bin'"
    monkeypatch.chdir(tmp_path)
    up = os.path.relpath(ROOT, tmp_path)
    assert alexnet.python_command("eval") == f"{up}/.venv/bin/python {up}/alexnet.py eval"
    outside = tmp_path / "bin" / "python3.99"   # a Python outside the repository, not on the PATH
    outside.parent.mkdir()
    outside.symlink_to(os.path.realpath(sys.base_prefix + "/bin/python3"))
    monkeypatch.setattr(sys, "executable", str(outside))
    assert alexnet.python_command("demo") == f"{outside} {up}/alexnet.py demo"
    monkeypatch.setenv("PATH", str(outside.parent) + os.pathsep + os.environ["PATH"])
    assert alexnet.python_command("demo") == f"python3.99 {up}/alexnet.py demo"


# --- damaged checkpoints and statistics: an AlexNetError, never another exception

def header_within_range(header, params, momentum, size):
    """The checks a loaded checkpoint must pass, written from the format table of doc/formats.md."""
    shapes = {name: value.shape for name, value in params.items()}
    count = sum(int(np.prod(shape)) for shape in shapes.values())
    assert size == 1024 + 8 * count and header["parameters"] == count
    assert {name: value.shape for name, value in momentum.items()} == shapes
    assert header["arch"] in alexnet.PRESET_NAMES and 1 <= header["crop"] <= alexnet.MAX_IMAGE_SIDE
    assert 2 <= header["classes"] == shapes["fc8.bias"][0]
    assert all(k > 0 and k % 2 == 0 for k in header["conv_out"] + header["fc_out"])
    assert 1 <= header["batch"] <= 65536 and 0 <= header["momentum"] < 1 and 0 <= header["dropout"] < 1
    assert 1e-13 < header["lr"] <= 100 and 0 <= header["weight_decay"] <= 1 and header["step"] >= 0
    assert header["best_error"] == np.inf or 0 <= header["best_error"] <= 1
    assert all(np.isfinite(v).all() for v in (*params.values(), *momentum.values()))


def mutations(raw, rng, count):
    """Seeded damage to a checkpoint: bit flips (mostly in the header), truncations, header
    fields overwritten with edge values, parameters overwritten with non-finite floats."""
    edge = [0, 1, 2, 3, -1, -2, 7, 255, 1024, 8193, 2**31 - 1, -2**31, 0x7FC00000, 0x7F800000, 0x3F800000]
    for i in range(count):
        data = bytearray(raw)
        kind = i % 4
        if kind == 0:
            for _ in range(rng.integers(1, 6)):
                at = rng.integers(0, 1024) if rng.random() < 0.8 else rng.integers(0, len(data))
                data[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            data = data[:rng.integers(0, len(data))]
        elif kind == 2:
            at = 4 * int(rng.integers(0, 70))
            data[at:at + 4] = np.int32(edge[rng.integers(len(edge))]).tobytes()
        else:
            at = 1024 + 4 * int(rng.integers(0, (len(data) - 1024) // 4))
            data[at:at + 4] = np.float32(rng.choice([np.nan, np.inf, -np.inf])).tobytes()
        yield kind, bytes(data)


def test_damaged_checkpoints_are_refused_or_load_within_range(tmp_path):
    arch = alexnet.architecture("small", 10)
    rng = np.random.default_rng(14)
    params = alexnet.init_params(arch, rng)
    momentum = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in params.items()}
    good = tmp_path / "good.bin"
    alexnet.save_checkpoint(str(good), dict(arch, step=30, lr_steps=(2,)), params, momentum)
    path, outcomes = tmp_path / "damaged.bin", {}
    for kind, data in mutations(good.read_bytes(), rng, 800):
        path.write_bytes(data)
        try:
            header, p, m = alexnet.load_checkpoint(str(path))
        except alexnet.AlexNetError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            outcomes[kind, "refused"] = outcomes.get((kind, "refused"), 0) + 1
        else:
            header_within_range(header, p, m, len(data))
            outcomes[kind, "loaded"] = outcomes.get((kind, "loaded"), 0) + 1
    assert outcomes[3, "refused"] == 200   # every non-finite parameter or momentum is caught
    assert outcomes[0, "refused"] > 50 and outcomes[2, "refused"] > 50 and outcomes[1, "refused"] > 150


@pytest.mark.parametrize("tensor,which,at,value,message", [
    ("fc7.weight", "params", 12, np.nan, r"fc7.weight\[12\] is nan: a checkpoint holds finite numbers only"),
    ("conv1.bias", "momentum", 3, -np.inf, r"the momentum of conv1.bias\[3\] is -inf"),
], ids=["NaN weight", "infinite momentum"])
def test_non_finite_parameters_or_momentum_are_refused_by_name(tmp_path, tensor, which, at, value, message):
    arch = alexnet.architecture("small", 10)
    state = {"params": alexnet.init_params(arch, np.random.default_rng(0))}
    state["momentum"] = {k: np.zeros_like(v) for k, v in state["params"].items()}
    state[which][tensor].reshape(-1)[at] = value
    alexnet.save_checkpoint(str(tmp_path / "c.bin"), arch, state["params"], state["momentum"])
    with pytest.raises(alexnet.AlexNetError, match=message):
        alexnet.load_checkpoint(str(tmp_path / "c.bin"))


@pytest.mark.parametrize("field,value,message", [
    ("mean", (1, 2, 0, np.nan), "mean nan is outside"),
    ("mean", (0, 0, 1, 300.0), "mean 300 is outside"),
    ("eigval", (2, -5.0), "eigenvalue -5 is outside"),
    ("eigval", (0, np.inf), "eigenvalue inf is outside"),
    ("eigvec", (1, 1, np.nan), "eigenvector component nan is outside"),
], ids=["NaN mean", "mean 300", "negative eigenvalue", "infinite eigenvalue", "NaN eigenvector"])
def test_statistics_out_of_range_are_refused(tmp_path, field, value, message):
    images = np.random.default_rng(1).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    stats = dict(zip(("mean", "eigval", "eigvec"), alexnet.PixelSums(4, 4).add(images).statistics()))
    alexnet.write_stats(str(tmp_path / "stats.bin"), **stats)
    alexnet.read_stats(str(tmp_path / "stats.bin"))   # the good one loads
    stats[field][value[:-1]] = value[-1]
    alexnet.write_stats(str(tmp_path / "stats.bin"), **stats)
    with pytest.raises(alexnet.AlexNetError, match=message):
        alexnet.read_stats(str(tmp_path / "stats.bin"))


def test_statistics_of_grey_images_have_no_negative_eigenvalue(tmp_path):
    """R = G = B: a rank-1 covariance, whose zero eigenvalues eigh returns as +-1e-12; a
    covariance has no negative eigenvalue, so stats.bin holds 0."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        grey = np.repeat(rng.integers(0, 256, (50, 6, 6, 1), dtype=np.uint8), 3, axis=3)
        mean, eigval, eigvec = alexnet.PixelSums(6, 6).add(grey).statistics()
        variance = grey[..., 0].astype(np.float64).var()
        assert (eigval >= 0).all(), eigval
        np.testing.assert_allclose(eigval, [3 * variance, 0, 0], rtol=1e-9, atol=1e-9 * variance)
        alexnet.write_stats(str(tmp_path / "stats.bin"), mean, eigval, eigvec)
        np.testing.assert_array_equal(alexnet.read_stats(str(tmp_path / "stats.bin")).eigval,
                                      eigval.astype(np.float32))


# --- what the help and the README say

def test_the_readme_names_the_synthetic_classes_of_classes_txt(prepared):
    import re
    readme = open(os.path.join(ROOT, "doc", "data.md"), encoding="utf-8").read()
    listed = re.search(r"\*\*The synthetic set\*\* is ten classes of shapes and textures \(`classes.txt`: ([a-z,\s]+);",
                       readme)
    assert listed, "doc/data.md's synthetic-set paragraph no longer lists classes.txt"
    names = [name.strip() for name in listed.group(1).split(",")]
    assert names == (prepared / "data" / "classes.txt").read_text().splitlines()


def test_demo_help_names_every_picture_it_draws():
    result = run_script("demo", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())   # argparse wraps lines
    for picture in ("filters.png", "curves.png", "predictions.png"):
        assert picture in text, picture


@pytest.mark.parametrize("picture", ["filters", "curves", "predictions"])
def test_show_usage_tells_positionals_from_option_values(picture):
    """`show curves --help` said `[--out OUT] OUT`: the folder read and the PNG written had one name."""
    import re
    result = run_script("show", picture, "--help")
    assert result.returncode == 0
    usage = " ".join(result.stdout.split("\n\n")[0].split())
    option_values = set(re.findall(r"\[--[\w-]+ ([A-Z]+)\]", usage))
    positionals = set(re.sub(r"\[[^\]]*\]", "", usage).split()[4:]) - {"--data", "DATA"}
    assert positionals and not positionals & option_values, usage


@pytest.mark.parametrize("args,error", [
    (["eval", "c.bin", "--data", "d", "--veiws", "1"],
     "alexnet.py eval: error: unrecognized arguments: --veiws 1 (--veiws: did you mean --views?)"),
    (["eval", "c.bin", "--dta", "d"],
     "alexnet.py eval: error: the following arguments are required: --data (--dta: did you mean --data?)"),
    (["show", "curves", "out", "--ot", "c.png"],
     "alexnet.py show curves: error: unrecognized arguments: --ot c.png (--ot: did you mean --out?)"),
    (["prepare", "synthetic", "--workrs=2"],
     "alexnet.py prepare: error: unrecognized arguments: --workrs=2 (--workrs: did you mean --workers?)"),
    (["predict", "c.bin", "i.png", "--data", "d", "--zzzzzz"],   # nothing close: no guess
     "alexnet.py predict: error: unrecognized arguments: --zzzzzz"),
], ids=["unknown", "unknown and a required one missing", "show subcommand", "with =", "nothing close"])
def test_a_mistyped_option_gets_a_suggestion(args, error):
    result = run_script(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == error, result.stderr
    assert result.stderr.splitlines()[0].startswith("usage: " + error.split(":")[0])   # the subcommand's usage


def test_text_files_that_are_not_utf8_are_a_one_line_error(prepared, tmp_path):
    """A classes.txt or log.txt in another encoding raised UnicodeDecodeError with a traceback."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(prepared / "data", data)
    (data / "classes.txt").write_bytes("".join(f"caf\xe9 {i}\n" for i in range(10)).encode("latin-1"))
    result = run_script("eval", prepared / "small.bin", "--data", data, "--views", "1")
    assert_one_line_error(result, "classes.txt is not UTF-8 text (byte 3")
    (tmp_path / "log.txt").write_bytes(b"step 1/2 | epoch 0.5 | loss 2.3 \xff\n")
    assert_one_line_error(run_script("show", "curves", tmp_path), "log.txt is not UTF-8 text (byte 32")
