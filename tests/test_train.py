"""The training executable: learning, exact resume, device placement, checkpoints,
Ctrl-C, non-finite losses, the command line and every kind of bad input."""
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import alexnet
from model_fixtures import EXE, ROOT, learnable_dataset, random_dataset, run, small_2012_code


def checkpoint_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """64 random 32x32 training images and 16 validation images, 10 classes."""
    folder = tmp_path_factory.mktemp("small") / "data"
    random_dataset(folder, 64, val=16, size=32, classes=10)
    return folder


def short_run(data, out, *flags, env=None, steps=6):
    """A few augmented, dropout-on steps of the small preset with evaluations (so the
    learning-rate state is exercised) and checkpoints every 3 steps."""
    return run("--data", data, "--arch", "small", "--batch", 8, "--steps", steps, "--eval-every", 2,
               "--patience", 1, "--save-every", 3, "--lr", 0.02, "--out", out, *flags, env=env)


def _losses_and_final_validation(stdout):
    """Training losses of the log lines, and (val loss, top-1 error) of the last validation."""
    losses = [float(line.split("| loss ")[1].split()[0]) for line in stdout.splitlines() if line.startswith("step ")]
    final = [line for line in stdout.splitlines() if line.startswith("eval step")][-1]
    return losses, float(final.split("val loss ")[1].split()[0]), float(final.split("top-1 error ")[1].split()[0])


@pytest.mark.no_asan  # 80 steps take over 10 minutes under ASan; the shorter runs below cover its code
def test_small_preset_learns(tmp_path):
    """Coloured squares, 512 images, batch 32, 80 steps (5 epochs) on centre crops without
    dropout: the training and validation losses fall well below chance (ln 10 = 2.30) and
    the validation error well below 90%."""
    learnable_dataset(tmp_path / "data", 512, val=100)
    result = run("--data", tmp_path / "data", "--arch", "small", "--batch", 32, "--steps", 80, "--lr", 0.004,
                 "--no-augment", "--dropout", 0, "--log-every", 5, "--eval-every", 80, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    losses, val_loss, val_error = _losses_and_final_validation(result.stdout)
    assert losses[0] > 2.0 and np.mean(losses[-3:]) < 1.5, losses
    assert val_loss < 1.5 and val_error < 0.6, (val_loss, val_error)


def test_bench_trains_on_one_device_resident_batch(tmp_path, small_data):
    """--bench N repeats the full step on the loader's first batch: the first step of a
    normal run sees the same batch, and 3 + 30 steps on it must drive its loss far below
    that first loss (memorisation), with a positive rate and nothing written to --out."""
    flags = ("--data", small_data, "--arch", "small", "--batch", 8, "--no-augment", "--dropout", 0, "--lr", 0.02)
    first = run(*flags, "--steps", 1, "--eval-every", 100, "--out", tmp_path / "run")
    assert first.returncode == 0, first.stderr
    first_loss = _losses_and_final_validation(first.stdout)[0][0]
    result = run(*flags, "--bench", 30, "--out", tmp_path / "bench")
    assert result.returncode == 0, result.stderr
    line = [l for l in result.stdout.splitlines() if l.startswith("bench |")][-1]
    rate = float(line.split(" images/s")[0].split("| ")[-1])
    last_loss = float(line.split("last loss ")[1])
    assert rate > 0 and np.isfinite(last_loss) and last_loss < 0.5 * first_loss, (first_loss, line)
    assert not os.path.exists(tmp_path / "bench")


@pytest.mark.slow
def test_small_preset_learns_with_the_papers_recipe(tmp_path):
    """The same with random crops, flips, PCA lighting and dropout 0.5, for longer."""
    learnable_dataset(tmp_path / "data", 2048, val=200)
    result = run("--data", tmp_path / "data", "--arch", "small", "--batch", 32, "--steps", 300, "--lr", 0.004,
                 "--log-every", 20, "--eval-every", 300, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    losses, val_loss, val_error = _losses_and_final_validation(result.stdout)
    assert np.mean(losses[-3:]) < 1.5, losses
    assert val_loss < 1.5 and val_error < 0.6, (val_loss, val_error)


def test_resume_is_bitwise_exact(tmp_path, small_data):
    whole = short_run(small_data, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    first = short_run(small_data, tmp_path / "part", steps=3)
    assert first.returncode == 0, first.stderr
    resumed = short_run(small_data, tmp_path / "resumed", "--resume", tmp_path / "part" / "ckpt_00000003.bin")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 3" in resumed.stdout
    assert checkpoint_bytes(tmp_path / "whole" / "ckpt_00000006.bin") == \
        checkpoint_bytes(tmp_path / "resumed" / "ckpt_00000006.bin")
    def after_step_3(out):  # the log lines both runs write for steps 4..6 (not the timings)
        return [line.split(" | lr")[0] for line in out.splitlines() if line.startswith(("step 6", "eval step 4", "eval step 6"))]
    assert len(after_step_3(whole.stdout)) == 3 and after_step_3(whole.stdout) == after_step_3(resumed.stdout)


def test_precision_is_stored_logged_and_can_change_on_resume(tmp_path, small_data):
    """--precision bf16 runs the matrix products on (emulated) tensor cores: the header
    stores it, the log says it, a resume keeps it and continues bit for bit; --precision
    given on resume wins (the checkpoint is float32 either way), and changes the result."""
    whole = short_run(small_data, tmp_path / "whole", "--precision", "bf16")
    first = short_run(small_data, tmp_path / "part", "--precision", "bf16", steps=3)
    for result in (whole, first):
        assert result.returncode == 0, result.stderr
        assert "| bf16 matrix products |" in result.stdout
    assert alexnet.read_checkpoint_header(str(tmp_path / "part" / "ckpt_00000003.bin"))["precision"] == 2
    kept = short_run(small_data, tmp_path / "kept", "--resume", tmp_path / "part" / "ckpt_00000003.bin")
    changed = short_run(small_data, tmp_path / "changed", "--resume", tmp_path / "part" / "ckpt_00000003.bin",
                        "--precision", "fp32")
    assert kept.returncode == 0 and changed.returncode == 0, kept.stderr + changed.stderr
    assert "| bf16 matrix products | resuming at step 3" in kept.stdout
    assert "| fp32 matrix products | resuming at step 3" in changed.stdout
    assert checkpoint_bytes(tmp_path / "kept" / "ckpt_00000006.bin") == \
        checkpoint_bytes(tmp_path / "whole" / "ckpt_00000006.bin")
    header, params, _ = alexnet.load_checkpoint(str(tmp_path / "changed" / "ckpt_00000006.bin"))
    bf16_params = alexnet.load_checkpoint(str(tmp_path / "whole" / "ckpt_00000006.bin"))[1]
    assert header["precision"] == 0 and header["step"] == 6
    assert any(not np.array_equal(params[name], bf16_params[name]) for name in params)


def test_one_device_and_two_devices_give_the_same_bits(tmp_path, small_data):
    """Both towers on device 0 (where tower 1 reads the batch that tower 0 uploaded and
    augmented) vs one tower per emulated device, under different thread and block orders
    of the CPU runtime, and with stream work deferred to the synchronisation points."""
    two = short_run(small_data, tmp_path / "two", "--devices", "0,1", env={"CUDA_CPU_SCHEDULE": "forward"})
    one = short_run(small_data, tmp_path / "one", "--devices", "0",
                    env={"CUDA_CPU_SCHEDULE": "random", "CUDA_CPU_SEED": "99"})
    swapped = short_run(small_data, tmp_path / "swapped", "--devices", "1,0", env={"CUDA_CPU_SCHEDULE": "reverse"})
    deferred = short_run(small_data, tmp_path / "deferred", "--devices", "0", env={"CUDA_CPU_DEFERRED": "1"})
    for result in (two, one, swapped, deferred):
        assert result.returncode == 0, result.stderr
    reference = checkpoint_bytes(tmp_path / "two" / "ckpt_00000006.bin")
    for run_name in ("one", "swapped", "deferred"):
        assert checkpoint_bytes(tmp_path / run_name / "ckpt_00000006.bin") == reference, run_name


def test_checkpoints_latest_and_keep(tmp_path, small_data):
    out = tmp_path / "out"
    result = run("--data", small_data, "--arch", "small", "--batch", 8, "--steps", 5, "--save-every", 1,
                 "--keep", 2, "--out", out)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["ckpt_00000004.bin", "ckpt_00000005.bin", "latest.bin", "lock", "log.txt"]
    assert os.path.realpath(out / "latest.bin") == os.path.realpath(out / "ckpt_00000005.bin")
    header, _, _ = alexnet.load_checkpoint(str(out / "latest.bin"))
    assert (header["image_height"], header["image_width"]) == (32, 32)  # what eval and predict compare
    log = (out / "log.txt").read_text()
    assert "step 5/5" in log and "img/s" in log and "eta" in log


def test_2012_code_recipe_trains_resumes_bitwise_and_evaluates(tmp_path, small_data):
    """The alexnet-2012-code recipe on the small sizes (the header carries them), from a
    checkpoint at step 520 of 8 steps per epoch, across epoch 66 (no more colour noise, conv1 at
    a tenth of the rate, step 528) and epoch 71 (conv1 frozen, step 568): the run resumed at
    step 548 ends bit for bit where the whole run ends, conv1 does not move after step 568,
    and --eval scores the result."""
    arch = small_2012_code(10)
    params = alexnet.init_params(arch, np.random.default_rng(0))
    alexnet.save_checkpoint(str(tmp_path / "init.bin"), dict(arch, step=520, batch=8, lr=0.02), params)
    flags = ("--data", small_data, "--steps", 576, "--save-every", 4, "--eval-every", 16)
    whole = run(*flags, "--resume", tmp_path / "init.bin", "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    assert "alexnet-2012-code preset" in whole.stdout and "resuming at step 520" in whole.stdout
    part = run(*flags, "--resume", tmp_path / "init.bin", "--steps", 548, "--out", tmp_path / "part")
    assert part.returncode == 0, part.stderr
    resumed = run(*flags, "--resume", tmp_path / "part" / "ckpt_00000548.bin", "--out", tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint_bytes(tmp_path / "whole" / "ckpt_00000576.bin") == \
        checkpoint_bytes(tmp_path / "resumed" / "ckpt_00000576.bin")
    _, at_568, _ = alexnet.load_checkpoint(str(tmp_path / "whole" / "ckpt_00000568.bin"))
    _, at_572, _ = alexnet.load_checkpoint(str(tmp_path / "whole" / "ckpt_00000572.bin"))
    _, at_576, _ = alexnet.load_checkpoint(str(tmp_path / "whole" / "ckpt_00000576.bin"))
    for name in at_576:
        frozen = np.array_equal(at_568[name], at_576[name])
        assert frozen == name.startswith("conv1."), name
    assert not np.array_equal(at_572["conv2.weight"], at_576["conv2.weight"])
    evaluation = run("--data", small_data, "--eval", "--resume", tmp_path / "whole" / "latest.bin", "--batch", 8)
    assert evaluation.returncode == 0, evaluation.stderr
    assert "10 views" in evaluation.stdout and "16 images" in evaluation.stdout


def test_flags_given_win_over_the_presets_schedule(tmp_path):
    """alexnet-2012-code sets --lr-steps 24,50,78 --patience 0 (the header test in
    test_model.py), but only where the command line does not."""
    random_dataset(tmp_path / "data", 2, size=256, classes=1000)
    result = run("--data", tmp_path / "data", "--arch", "alexnet-2012-code", "--batch", 2, "--steps", 1,
                 "--patience", 2, "--lr-steps", 5, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    header = alexnet.read_checkpoint_header(str(tmp_path / "out" / "latest.bin"))
    assert header["patience"] == 2 and header["lr_steps"] == (5,)


def test_eval_mode(tmp_path, small_data):
    out = tmp_path / "out"
    assert run("--data", small_data, "--arch", "small", "--batch", 8, "--steps", 2, "--out", out).returncode == 0
    before = sorted(os.listdir(out))
    result = run("--data", small_data, "--eval", "--resume", out / "latest.bin", "--batch", 5)
    assert result.returncode == 0, result.stderr
    assert "16 images" in result.stdout and "top-5 error" in result.stdout  # 5 + 5 + 5 + 1: a partial batch
    assert sorted(os.listdir(out)) == before


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_finishes_the_step_and_checkpoints(tmp_path, small_data, stop):
    out = tmp_path / "out"
    process = _start_run(small_data, out)
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "interrupted: stopped after step" in stdout
    header, _, _ = alexnet.load_checkpoint(str(out / "latest.bin"))
    assert 2 <= header["step"] < 100000
    assert os.path.exists(out / f"ckpt_{header['step']:08d}.bin")


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, small_data):
    out = tmp_path / "out"
    assert run("--data", small_data, "--arch", "small", "--batch", 8, "--steps", 2, "--out", out).returncode == 0
    good = checkpoint_bytes(out / "ckpt_00000002.bin")
    header, params, momentum = alexnet.load_checkpoint(str(out / "latest.bin"))
    # Finite, but the logits of half the classes are -3e38 below the others': their
    # log-probability overflows to -inf, and the loss to inf, at the first step.
    params["fc8.bias"][:] = np.where(np.arange(10) % 2, 3e38, -3e38)
    alexnet.save_checkpoint(str(tmp_path / "bad.bin"), header, params, momentum)
    result = run("--data", small_data, "--resume", tmp_path / "bad.bin", "--steps", 4, "--out", out)
    assert result.returncode != 0
    assert "non-finite loss" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(out)) == ["ckpt_00000002.bin", "latest.bin", "lock", "log.txt"]
    assert checkpoint_bytes(out / "latest.bin") == good
    assert (out / "log.txt").read_text().splitlines()[-1] == result.stderr.strip()  # the error, in the log too


def test_parameters_that_become_non_finite_are_not_saved(tmp_path):
    """A loss can stay finite while parameters overflow: with every image equal to the
    mean image (and no augmentation) conv1 sees zeros, so a conv1 weight of 3e38 does not
    touch the loss, but momentum 3e38 pushes it to inf in one step. The checkpoint of that
    step is refused, the run stops with one line (also in log.txt), and the last good
    checkpoint is still the newest one."""
    data, out = tmp_path / "data", tmp_path / "out"
    os.makedirs(data)
    images = np.full((16, 32, 32, 3), 77, np.uint8)
    alexnet.write_shard(str(data / "train_000.bin"), np.arange(16) % 10, images, 10)
    alexnet.write_stats(str(data / "stats.bin"), images[0].astype(np.float64), np.ones(3), np.eye(3))
    flags = ("--data", data, "--arch", "small", "--batch", 8, "--no-augment", "--out", out)
    assert run(*flags, "--steps", 1).returncode == 0
    header, params, momentum = alexnet.load_checkpoint(str(out / "ckpt_00000001.bin"))
    params["conv1.weight"][0, 0, 0, 0] = momentum["conv1.weight"][0, 0, 0, 0] = 3e38
    alexnet.save_checkpoint(str(tmp_path / "edge.bin"), header, params, momentum)
    result = run(*flags, "--steps", 2, "--resume", tmp_path / "edge.bin")
    assert result.returncode == 1
    assert result.stderr == (f"error: step 2: conv1.weight[0] is inf: not saved; the last good checkpoint "
                             f"({tmp_path / 'edge.bin'}) is unchanged\n")
    assert "loss" in result.stdout and "nan" not in result.stdout and "inf" not in result.stdout
    assert sorted(os.listdir(out)) == ["ckpt_00000001.bin", "latest.bin", "lock", "log.txt"]
    assert (out / "log.txt").read_text().splitlines()[-1] == result.stderr.strip()


def test_a_failed_checkpoint_write_is_logged_and_leaves_nothing(tmp_path, small_data):
    """A write error (here EFBIG from a 100 KB file-size limit, which a 586 KB checkpoint
    exceeds; ENOSPC takes the same path) ends the run with one line on stderr and in
    log.txt, and leaves no partial file."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    out = tmp_path / "out"
    result = run("--data", small_data, "--arch", "small", "--batch", 8, "--steps", 1, "--out", out,
                 preexec_fn=limit_file_size)
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot write ") and "File too large" in result.stderr
    assert result.stderr.strip().endswith("the last good checkpoint (none) is unchanged")
    assert sorted(os.listdir(out)) == ["lock", "log.txt"]
    assert (out / "log.txt").read_text().splitlines()[-1] == result.stderr.strip()


def _start_run(data, out):
    """A long run that logs every step; returns the process once step 2 is logged. Batch 64
    (about 0.4 s a step on 2 cores): a test's second signal must arrive before the step in
    progress ends and checkpoints, which at batch 8 (tens of ms) a loaded machine missed."""
    process = subprocess.Popen([EXE, "--data", str(data), "--arch", "small", "--batch", "64", "--steps", "100000",
                                "--log-every", "1", "--save-every", "0", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("step 2/"):
            break
    return process


def test_a_second_run_on_the_same_out_is_refused(tmp_path, small_data):
    """While a run holds --out, another run on it stops at once, naming the first by its
    process id, and writes nothing; the first run is undisturbed."""
    out = tmp_path / "out"
    first = _start_run(small_data, out)
    log_before = (out / "log.txt").read_text()
    second = run("--data", small_data, "--arch", "small", "--batch", 8, "--steps", 1, "--out", out)
    first.send_signal(signal.SIGINT)
    stdout, stderr = first.communicate(timeout=120)
    assert second.returncode == 1
    assert second.stderr == (f"error: {out} is in use by another run (process {first.pid}); wait for it, "
                             f"or give another --out\n")
    assert first.returncode == 0, stderr
    assert (out / "log.txt").read_text().startswith(log_before) and "ckpt_00000001.bin" not in os.listdir(out)
    again = run("--data", small_data, "--arch", "small", "--batch", 8, "--steps", 1, "--out", tmp_path / "again")
    assert again.returncode == 0  # the lock goes with its process


def test_stale_temporaries_are_removed_at_start(tmp_path, small_data):
    """Files a kill left between a checkpoint's write and its rename are removed (and
    said so); anything else in the folder stays."""
    out = tmp_path / "out"
    os.makedirs(out)
    for name in ("ckpt_00000007.bin.tmp", "latest.bin.tmp", "notes.tmp", "ckpt_7.bin.tmp"):
        (out / name).write_bytes(b"partial")
    result = run("--data", small_data, "--arch", "small", "--batch", 8, "--steps", 1, "--out", out)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["ckpt_00000001.bin", "ckpt_7.bin.tmp", "latest.bin", "lock", "log.txt",
                                       "notes.tmp"]
    assert f"removed {out}/ckpt_00000007.bin.tmp, left by an interrupted checkpoint" in result.stdout


def test_a_second_signal_ends_the_run_at_once(tmp_path, small_data):
    """Two Ctrl-Cs: the second ends the process by the signal, before a checkpoint."""
    out = tmp_path / "out"
    process = _start_run(small_data, out)
    process.send_signal(signal.SIGINT)
    assert process.stderr.readline().startswith("stopping after this step")  # the first one was seen
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert process.returncode == -signal.SIGINT
    assert not any(name.startswith("ckpt_") for name in os.listdir(out))


def test_eval_reports_progress(tmp_path, small_data, trained):
    """--eval off a terminal: progress lines on stderr (at most every 10 s, and at the end)."""
    result = run("--data", small_data, "--eval", "--resume", trained / "latest.bin", "--batch", 4)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1].startswith("10-view evaluation: 16/16 images | elapsed ")


def test_options_at_their_bounds_survive_a_resume(tmp_path, small_data):
    """The checkpoint stores options as float32 (--lr 1e-12 becomes 9.99999996e-13); the
    resume reads them back through the same flag checks, which must still accept them."""
    out = tmp_path / "out"
    flags = ("--data", small_data, "--arch", "small", "--batch", 8, "--lr", "1e-12", "--weight-decay", 1,
             "--momentum", "0.99999994", "--out", out)
    assert run(*flags, "--steps", 1).returncode == 0
    resumed = run("--data", small_data, "--resume", out / "latest.bin", "--steps", 2, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    header, _, _ = alexnet.load_checkpoint(str(out / "latest.bin"))
    assert header["step"] == 2 and header["lr"] == np.float32(1e-12) and header["momentum"] == np.float32(0.99999994)


def test_help_lists_every_flag_with_its_default():
    result = run("--help")
    assert result.returncode == 0
    for flag in ("--data", "--arch", "--resume", "--out", "--batch", "--lr", "--momentum", "--weight-decay",
                 "--dropout", "--epochs", "--steps", "--seed", "--no-augment", "--eval-every", "--save-every",
                 "--devices", "--eval", "--keep", "--patience", "--lr-steps"):
        lines = [l for l in result.stdout.splitlines() if l.strip().startswith(flag + " ") or l.strip() == flag]
        assert lines and ("(default: " in lines[0] or flag == "--data" and "(required)" in lines[0]), flag


def test_train_command_runs_the_cpu_executable(tmp_path, small_data):
    """`python alexnet.py train FLAGS` passes FLAGS through (no GPU here: the CPU build)."""
    script = os.path.join(ROOT, "alexnet.py")
    result = subprocess.run([sys.executable, script, "train", "--data", str(small_data), "--arch", "small",
                             "--batch", "8", "--steps", "1", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.path.exists(tmp_path / "out" / "ckpt_00000001.bin")
    result = subprocess.run([sys.executable, script, "train", "--bogus"], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip() == "error: unknown argument '--bogus' (see --help)"


# --- bad input: one line on stderr, a non-zero exit, and nothing written

def _damage(folder, name, transform):
    path = folder / name
    data = path.read_bytes()
    path.write_bytes(transform(data))


def _with_label(value):
    def transform(data):
        labels = np.frombuffer(data, "<i4", count=4, offset=1024).copy()
        labels[2] = value
        return data[:1024] + labels.tobytes() + data[1024 + 16:]
    return transform


def _wrapping_sizes(folder):
    """Shards and statistics whose header sizes (N=4, H=842443544, W=1824726041) make
    the byte counts wrap around 2^64 to the files' real sizes, 1072 and 1104 bytes."""
    header = np.zeros(256, "<i4")
    header[:7] = [alexnet.SHARD_MAGIC, 1, 4, 842443544, 1824726041, 3, 10]
    for name in ("train_000.bin", "val_000.bin"):
        (folder / name).write_bytes(header.tobytes() + np.arange(4, dtype="<i4").tobytes() + bytes(32))
    header[:5] = [alexnet.STATS_MAGIC, 1, 842443544, 1824726041, 3]
    header[5:7] = 0
    (folder / "stats.bin").write_bytes(header.tobytes() + bytes(80))


def _with_stat(index, value):
    """stats.bin with float number `index` of its body (mean, eigval, eigvec) replaced."""
    def transform(data):
        body = np.frombuffer(data, "<f4", offset=1024).copy()
        body[index] = value
        return data[:1024] + body.tobytes()
    return transform


def _fifo_shard(folder):
    os.remove(folder / "train_000.bin")
    os.mkfifo(folder / "train_000.bin")


BAD_DATA = {
    "missing folder": (None, "no such folder"),
    "a FIFO for a shard": (_fifo_shard, "train_000.bin is a FIFO, not a regular file"),
    "a folder for the statistics": (lambda d: (os.remove(d / "stats.bin"), os.mkdir(d / "stats.bin")),
                                    "stats.bin is a folder, not a regular file"),
    "header sizes that wrap around": (_wrapping_sizes, "bad header"),
    "no shards": (lambda d: os.remove(d / "train_000.bin"), "no training shards"),
    "foreign shard": (lambda d: _damage(d, "train_000.bin", lambda b: b"GIF89a" + b[6:]), "not a dataset shard"),
    "truncated shard": (lambda d: _damage(d, "train_000.bin", lambda b: b[:-100]), "truncated"),
    "label out of range": (lambda d: _damage(d, "train_000.bin", _with_label(10)), "out of range"),
    "negative label": (lambda d: _damage(d, "train_000.bin", _with_label(-1)), "out of range"),
    "missing stats": (lambda d: os.remove(d / "stats.bin"), "stats.bin"),
    "truncated stats": (lambda d: _damage(d, "stats.bin", lambda b: b[:-4]), "stats.bin"),
    "a gap in the shards": (lambda d: os.rename(d / "train_000.bin", d / "train_001.bin"),
                            "train_000.bin is missing, but"),
    "a gap after the first shard": (lambda d: shutil.copy(d / "train_000.bin", d / "train_002.bin"),
                                    "train_001.bin is missing, but"),
    "a dangling symlink among the shards": (lambda d: os.symlink("gone.bin", d / "train_001.bin"),
                                            "cannot open " + "{data}/train_001.bin: a symlink to a missing file"),
    "a symlink loop among the shards": (lambda d: os.symlink("train_001.bin", d / "train_001.bin"),
                                        "Too many levels of symbolic links"),
    "a broken validation shard": (lambda d: (os.remove(d / "val_000.bin"), os.symlink("gone.bin", d / "val_000.bin")),
                                  "val_000.bin: a symlink to a missing file"),
    "NaN in the mean image": (lambda d: _damage(d, "stats.bin", _with_stat(100, np.nan)), "mean[100] is nan"),
    "a mean outside the pixel range": (lambda d: _damage(d, "stats.bin", _with_stat(5, 300.0)),
                                       "mean[5] is 300, outside [0, 255]"),
    "an infinite eigenvalue": (lambda d: _damage(d, "stats.bin", _with_stat(32 * 32 * 3 + 1, np.inf)),
                               "eigval[1] is inf"),
    "an eigenvector entry of 2": (lambda d: _damage(d, "stats.bin", _with_stat(32 * 32 * 3 + 3 + 4, 2.0)),
                                  "eigvec[4] is 2"),
    "val shard of another size": (lambda d: alexnet.write_shard(str(d / "val_000.bin"), np.zeros(2, int),
                                                                np.zeros((2, 16, 16, 3), np.uint8), 10),
                                  "do not match"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data(tmp_path, case):
    damage, message = BAD_DATA[case]
    data = tmp_path / "data"
    random_dataset(data, 16, val=4, size=32, classes=10)
    if damage is None:
        data = tmp_path / "nothing"
    else:
        damage(data)
    result = run("--data", data, "--arch", "small", "--batch", 8, "--steps", 1, "--out", tmp_path / "out")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert message.format(data=data) in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "out")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data):
    """A checkpoint of 2 steps of the small preset and its output folder."""
    out = tmp_path_factory.mktemp("trained") / "out"
    assert run("--data", small_data, "--arch", "small", "--batch", 8, "--steps", 2, "--out", out).returncode == 0
    return out


def _truncated(tmp_path, trained):
    path = tmp_path / "cut.bin"
    path.write_bytes(checkpoint_bytes(trained / "ckpt_00000002.bin")[:-8])
    return path


def _foreign(tmp_path, trained):
    path = tmp_path / "foreign.bin"
    path.write_bytes(checkpoint_bytes(trained / "log.txt") * 300)
    return path


def _with_header(tmp_path, trained, **fields):
    """The trained checkpoint with header fields replaced (values the command line refuses)."""
    header, params, momentum = alexnet.load_checkpoint(str(trained / "ckpt_00000002.bin"))
    path = tmp_path / "edited.bin"
    alexnet.save_checkpoint(str(path), dict(header, **fields), params, momentum)
    return path


def _with_tensor(tmp_path, trained, name, index, value, momentum=False):
    """The trained checkpoint with one value of a parameter (or of its momentum) replaced."""
    header, params, moments = alexnet.load_checkpoint(str(trained / "ckpt_00000002.bin"))
    (moments if momentum else params)[name].flat[index] = value
    path = tmp_path / "edited.bin"
    alexnet.save_checkpoint(str(path), header, params, moments)
    return path


BAD_RUNS = {
    "unknown preset": (lambda t, c: ["--arch", "vgg16"], "unknown preset 'vgg16'"),
    "images smaller than the crop": (lambda t, c: ["--arch", "alexnet", "--batch", 8],
                                     "larger than the 32x32 images; try --arch small"),
    "batch larger than the dataset": (lambda t, c: ["--arch", "small", "--batch", 65], "larger than the training set"),
    "unknown flag": (lambda t, c: ["--learning-rate", "0.1"], "unknown argument '--learning-rate' (see --help)"),
    "a mistyped flag": (lambda t, c: ["--weight-dacay", "0.1"],
                        "unknown argument '--weight-dacay' (did you mean --weight-decay? see --help)"),
    "bad integer": (lambda t, c: ["--batch", "eight"], "--batch: expected an integer"),
    "bad number": (lambda t, c: ["--lr", "-1"], "--lr: expected a number"),
    "missing value": (lambda t, c: ["--lr"], "--lr needs a value"),
    "bad device": (lambda t, c: ["--arch", "small", "--devices", "0,7"], "device 7 does not exist"),
    "missing checkpoint": (lambda t, c: ["--resume", t / "none.bin"], "cannot open"),
    "a FIFO for the checkpoint": (lambda t, c: (os.mkfifo(t / "pipe.bin"), ["--resume", t / "pipe.bin"])[1],
                                  "pipe.bin is a FIFO, not a regular file"),
    "a folder for the checkpoint": (lambda t, c: ["--resume", t], "is a folder, not a regular file"),
    "truncated checkpoint": (lambda t, c: ["--resume", _truncated(t, c)], "truncated"),
    "foreign checkpoint": (lambda t, c: ["--resume", _foreign(t, c)], "not an AlexNet checkpoint"),
    "preset differs from checkpoint": (lambda t, c: ["--resume", c / "latest.bin", "--arch", "alexnet"],
                                       "holds the small preset"),
    "eval without checkpoint": (lambda t, c: ["--eval"], "--eval needs a checkpoint"),
    "negative step in the header": (lambda t, c: ["--resume", _with_header(t, c, step=-5)], "bad header: step -5"),
    "momentum 5 in the header": (lambda t, c: ["--resume", _with_header(t, c, momentum=5.0)],
                                 "bad header: --momentum: expected a number in [0, 1), got '5'"),
    "negative weight decay in the header": (lambda t, c: ["--resume", _with_header(t, c, weight_decay=-100.0)],
                                            "bad header: --weight-decay"),
    "lr 1e30 in the header": (lambda t, c: ["--resume", _with_header(t, c, lr=1e30)], "bad header: --lr"),
    "NaN lr in the header": (lambda t, c: ["--resume", _with_header(t, c, lr=float("nan"))], "bad header: --lr"),
    "patience -1 in the header": (lambda t, c: ["--resume", _with_header(t, c, patience=-1)], "bad header: --patience"),
    "-inf in a parameter": (lambda t, c: ["--resume", _with_tensor(t, c, "fc7.weight", 5, -np.inf)],
                            "edited.bin: fc7.weight[5] is -inf: a checkpoint holds finite numbers only"),
    "NaN in the momentum": (lambda t, c: ["--resume", _with_tensor(t, c, "conv2.bias", 3, np.nan, momentum=True)],
                            "edited.bin: the momentum of conv2.bias[3] is nan"),
    "trained on other images": (lambda t, c: ["--resume", _with_header(t, c, image_height=40, image_width=40)],
                                "was trained on 40x40 images, the dataset has 32x32"),
    "an image size below the crop": (lambda t, c: ["--resume", _with_header(t, c, image_height=20, image_width=20)],
                                     "bad header: image size 20x20 (crop 28)"),
    "best error 100 in the header": (lambda t, c: ["--resume", _with_header(t, c, best_error=100.0)],
                                     "best validation error 100"),
    "unknown precision": (lambda t, c: ["--precision", "fp16"], "--precision: expected fp32, tf32 or bf16, got 'fp16'"),
    "precision 3 in the header": (lambda t, c: ["--resume", _with_header(t, c, precision=3)],
                                  "bad header: precision 3"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_arguments(tmp_path, small_data, trained, case):
    flags, message = BAD_RUNS[case]
    before = {name: checkpoint_bytes(trained / name) for name in os.listdir(trained)}
    result = run("--data", small_data, "--steps", 3, "--out", trained, *flags(tmp_path, trained))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr, result.stderr
    assert {name: checkpoint_bytes(trained / name) for name in os.listdir(trained)} == before
