"""Faults during training: a run killed at any moment, stopped by a signal, out of disk, or
diverging loses nothing; resumed, it ends bit-identical to a run that was never disturbed.

Runs that are killed are real processes (tests/fault_runner.py), one thread each, so the
reference and the resumed runs sum in the same order. The runner signals itself at an exact
step (--signal-at), drawn from a seeded generator: no test waits for a moment to pass, so
none races the machine's speed.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from localitylab.errors import UserError
from localitylab.train import TrainConfig, read_checkpoint, train
from tests.cli_helpers import start_command

STEPS_PER_EPOCH = 1437 // 32  # the runner's recipe: digits' training split at batch 32
EPOCHS = 4


def start(out: Path, *flags: str) -> subprocess.Popen:
    return start_command(out, *flags, module="tests.fault_runner", env={"OMP_NUM_THREADS": "1"}, new_session=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> bool:
    """Wait until `condition()` holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return condition()
        time.sleep(0.01)
    raise TimeoutError("the training process made no progress")


def epochs_done(out: Path) -> int:
    try:
        return int(read_checkpoint(out / "ckpt.pt")["epoch"])
    except Exception:
        return 0


def lock_is_free(folder: Path) -> bool:
    """Whether no process holds the run folder's lock (localitylab.io.folder_lock)."""
    import fcntl

    from localitylab.io import LOCK_NAME

    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def kill_group(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    os.killpg(process.pid, sig)
    process.wait(timeout=60)


def assert_same_run(a: Path, b: Path) -> None:
    first, second = read_checkpoint(a / "ckpt.pt"), read_checkpoint(b / "ckpt.pt")
    assert first["epoch"] == second["epoch"] and first["step"] == second["step"]
    assert first["model_state"].keys() == second["model_state"].keys()
    for key, value in first["model_state"].items():
        assert torch.equal(value, second["model_state"][key]), key
    for row_a, row_b in zip(first["history"], second["history"], strict=True):
        for column in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            assert row_a[column] == row_b[column], (row_a["epoch"], column)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "reference"
    code, _, stderr = finish(start(out))
    assert code == 0, stderr
    return out


def test_sigkill_at_random_points_and_mid_write_then_resume_is_bit_identical(reference, tmp_path):
    out = tmp_path / "run"
    chooser = random.Random(20261121)
    survived = []

    # 1. Killed at a random step after the first checkpoint.
    epoch, batch = chooser.randint(2, EPOCHS), chooser.randint(1, STEPS_PER_EPOCH)
    code, _, _ = finish(start(out, "--signal-at", f"{epoch}:{batch}:KILL"))
    assert code == -signal.SIGKILL and epochs_done(out) == epoch - 1
    survived.append(f"epoch {epoch}, batch {batch}")

    # 2. Killed while writing a checkpoint: half the bytes are in the temporary file.
    done_before = epochs_done(out)
    process = start(out, "--resume", "--torn-write-at", "1")
    assert wait_for(lambda: out.with_suffix(".torn").exists(), process)
    kill_group(process)
    assert epochs_done(out) == done_before  # ckpt.pt is still the previous, whole checkpoint
    assert list(out.glob(".ckpt.pt.*.tmp")), "the torn temporary file should be left behind"
    survived.append(f"mid-write of epoch {done_before + 1}")

    # 3. Killed at a random step of a resumed run.
    epoch, batch = chooser.randint(done_before + 1, EPOCHS), chooser.randint(1, STEPS_PER_EPOCH)
    code, _, _ = finish(start(out, "--resume", "--signal-at", f"{epoch}:{batch}:KILL"))
    assert code == -signal.SIGKILL and epochs_done(out) == epoch - 1
    survived.append(f"epoch {epoch}, batch {batch} of a resumed run")

    code, _, stderr = finish(start(out, "--resume"))
    assert code == 0, stderr
    assert not list(out.glob(".*.tmp")), "stale temporaries are cleaned on resume"
    assert_same_run(reference, out)
    print("kill points survived:", "; ".join(survived))


def test_signals_finish_the_step_write_a_checkpoint_and_resume_is_bit_identical(reference, tmp_path):
    """SIGTERM (a scheduler's pre-emption) in epoch 2, then SIGINT (Ctrl-C) in epoch 3 of the
    resumed run: each stops after the step in progress, writes a mid-epoch checkpoint exactly
    there and exits with its status; resumed to the end, the run is the uninterrupted one."""
    out = tmp_path / "run"
    for flags, sig, status, (epoch, batch) in (((), signal.SIGTERM, 143, (2, 5)),
                                               (("--resume",), signal.SIGINT, 130, (3, 7))):
        code, _, stderr = finish(start(out, *flags, "--signal-at", f"{epoch}:{batch}:{sig.name[3:]}"))
        assert code == status, stderr
        assert "Traceback" not in stderr
        last = stderr.strip().splitlines()[-1]  # after the per-epoch progress lines
        # The command line says how to continue: its command with --resume, not the library's Python hint.
        assert f"stopped by {sig.name}" in last and last.endswith(" --resume") and "resume=True" not in last
        stopped = read_checkpoint(out / "ckpt.pt")
        assert stopped["epoch"] == epoch - 1 and stopped["epoch_progress"]["batch"] == batch  # mid-epoch
        assert stopped["step"] == (epoch - 1) * STEPS_PER_EPOCH + batch
    code, _, stderr = finish(start(out, "--resume"))
    assert code == 0, stderr
    assert_same_run(reference, out)


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import localitylab.train.checkpoint as checkpoint

    real_save, calls = checkpoint.torch.save, []

    def save_until_the_disk_fills(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as handle:
                handle.write(b"\0" * 100)  # some bytes made it before the disk filled
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_the_disk_fills)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint .* is intact"):
        train(TrainConfig("vit-n/2", "digits", out=out, epochs=3, batch_size=128, warmup_epochs=0))
    monkeypatch.undo()
    assert read_checkpoint(out / "ckpt.pt")["epoch"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "metrics.csv", "run.json"]


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch):
    import localitylab.train.loop as loop
    from localitylab.train.tasks import Classification

    poisoned_step = 15  # in epoch 2: 11 steps per epoch at batch 128
    calls = []

    class Poisoned(Classification):
        def loss(self, forward, inputs, labels, generator):
            calls.append(1)
            loss, correct = super().loss(forward, inputs, labels, generator)
            return (loss * float("nan") if len(calls) == poisoned_step else loss), correct

    monkeypatch.setattr(loop, "make_task", lambda config, info: Poisoned(config, info))
    out = tmp_path / "run"
    with pytest.raises(UserError, match=f"not finite at step {poisoned_step} \\(epoch 2\\).*last good checkpoint"):
        train(TrainConfig("vit-n/2", "digits", out=out, epochs=3, batch_size=128, warmup_epochs=0))
    kept = read_checkpoint(out / "ckpt.pt")
    assert kept["epoch"] == 1 and all(torch.isfinite(v).all() for v in kept["model_state"].values())


def test_two_gloo_processes_equal_one_and_resume_under_ddp(reference, tmp_path):
    """DDP on 2 CPU processes, killed after its first checkpoint and resumed on 2 processes,
    follows the single-process run with the same global batch."""
    out = tmp_path / "ddp"
    process = start(out, "--nproc", "2")
    wait_for(lambda: epochs_done(out) >= 1, process, timeout=240)
    kill_group(process)
    # torchrun's ranks lead sessions of their own: the launcher's death reaches them as
    # SIGTERM (cli/worker.py), and they stop, checkpoint and let the folder go.
    deadline = time.monotonic() + 60
    while not lock_is_free(out):
        assert time.monotonic() < deadline, "the killed launcher's ranks kept the run folder"
        time.sleep(0.05)
    code, _, stderr = finish(start(out, "--resume", "--nproc", "2"))
    assert code == 0, stderr
    single, ddp = read_checkpoint(reference / "ckpt.pt"), read_checkpoint(out / "ckpt.pt")
    assert ddp["model_state"].keys() == single["model_state"].keys()  # no DDP "module." prefix
    worst = max(float((ddp["model_state"][k].float() - v.float()).abs().max()) for k, v in single["model_state"].items())
    losses = [(a["train_loss"], b["train_loss"]) for a, b in zip(single["history"], ddp["history"], strict=True)]
    print(f"DDP (2 gloo processes) vs one process: max weight difference {worst:.2e}, "
          f"max train-loss difference {max(abs(a - b) for a, b in losses):.2e}")
    # Summation order differs (two shards, then an all-reduce), so equal to float tolerance,
    # not bit for bit; the small differences grow a little over 176 steps.
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in losses)
    assert worst < 1e-2
    assert abs(single["history"][-1]["test_acc"] - ddp["history"][-1]["test_acc"]) <= 1 / 360 + 1e-9
