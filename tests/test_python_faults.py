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
])
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
