"""Shared fixtures: the three nano models trained once on digits, for every test that needs
a trained checkpoint (accuracy, round trips, evaluation)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# The suite never reaches for the Hugging Face Hub nor writes into the user's HF cache: set
# before any test module imports `datasets`, which reads these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="localitylab-tests-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)

from localitylab.train import TrainConfig, read_checkpoint, train
from localitylab.train.loop import TrainResult

# The suite trains with digits' own recipe defaults (batch 32, one warm-up epoch: the
# data set's `DataDefaults`), as `localitylab train MODEL digits --epochs 15` does.
DIGITS_RECIPE = dict(epochs=15, device="cpu")
NANO_MODELS = ("pit-n", "vit-n/2", "resnet-n")


def trained_once(tmp_path_factory, name: str, runs: dict[str, TrainConfig]) -> Path:
    """The folder holding `runs` ({subfolder: config}), each trained once. Under pytest-xdist
    (`make test` runs two workers) the workers share the folder: each run has its own lock,
    a worker first trains the runs nobody has taken, then waits for the others' (so two
    workers that want the shared runs at once split them rather than one idling)."""
    def train_into(folder: Path, sub: str) -> None:
        train(runs[sub].model_copy(update={"out": folder / sub}))

    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        folder = tmp_path_factory.mktemp(name)
        for sub in runs:
            train_into(folder, sub)
        return folder
    from filelock import FileLock, Timeout

    folder = tmp_path_factory.getbasetemp().parent / name  # the workers' common temporary folder
    folder.mkdir(exist_ok=True)
    waiting = []
    for sub in runs:
        lock = FileLock(folder / f"{sub}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            waiting.append(lock)  # another worker is training it
            continue
        with lock:
            _train_unless_done(folder, sub, train_into)
    for lock in waiting:
        with lock:
            _train_unless_done(folder, Path(lock.lock_file).stem, train_into)
    return folder


def _train_unless_done(folder: Path, sub: str, train_into) -> None:
    done = folder / f"{sub}.done"
    if not done.is_file():
        shutil.rmtree(folder / sub, ignore_errors=True)  # a worker that died half-way
        train_into(folder, sub)
        done.touch()


def finished_run(run_dir: Path) -> TrainResult:
    """The TrainResult `train` returned for a finished run, read back from its checkpoint."""
    checkpoint = run_dir / "ckpt.pt"
    return TrainResult(run_dir, checkpoint, read_checkpoint(checkpoint)["history"])


def _folder(name: str) -> str:
    return name.replace("/", "-p")


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory):
    """{model name: TrainResult} for pit-n, vit-n/2 and resnet-n on digits."""

    runs = {_folder(name): TrainConfig(name, "digits", **DIGITS_RECIPE) for name in NANO_MODELS}
    root = trained_once(tmp_path_factory, "runs", runs)
    return {name: finished_run(root / _folder(name)) for name in NANO_MODELS}


# A nano DiT trained as a denoiser through the same loop, the suite's one diffusion run: dit-n/4
# (four 4x4 patches of an 8x8 digit) is the cheapest DiT whose samples a classifier reads as
# their labels after a short run.
DIT_RECIPE = dict(task="diffusion", epochs=20, batch_size=32, lr=4e-3, warmup_epochs=1, device="cpu")


@pytest.fixture(scope="session")
def trained_dit(tmp_path_factory):
    """TrainResult of dit-n/4 trained with --task diffusion on digits."""
    root = trained_once(tmp_path_factory, "dit", {"dit-n-p4": TrainConfig("dit-n/4", "digits", **DIT_RECIPE)})
    return finished_run(root / "dit-n-p4")


@pytest.fixture(scope="session", autouse=True)
def _private_image_cache(tmp_path_factory):
    """The decoded-image cache of this test session, never the user's (subprocesses inherit it)."""
    saved = os.environ.get("LOCALITYLAB_CACHE_DIR")
    os.environ["LOCALITYLAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("image-cache"))
    yield
    if saved is None:
        os.environ.pop("LOCALITYLAB_CACHE_DIR", None)
    else:
        os.environ["LOCALITYLAB_CACHE_DIR"] = saved


# Results must not depend on how many threads a test happens to get: a fixed count. 2, the
# CI machine's cores, for a single pytest process; 1 under pytest-xdist, whose two workers
# share those cores, and wherever LOCALITYLAB_TEST_THREADS=1 (several suites on the cores),
# since spinning OpenMP threads would slow every process many times over.
TEST_THREADS = int(os.environ.get("LOCALITYLAB_TEST_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(TEST_THREADS)
    yield
