"""Shared fixtures: the three nano models trained once on digits, for every test that needs
a trained checkpoint (accuracy, round trips, evaluation)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

# The suite never reaches for the Hugging Face Hub nor writes into the user's HF cache: set
# before any test module imports `datasets`, which reads these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="localitylab-tests-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)

from localitylab.train import TrainConfig, train

# The suite trains with digits' own recipe defaults (batch 32, one warm-up epoch: the
# data set's `DataDefaults`), as `localitylab train MODEL digits --epochs 15` does.
DIGITS_RECIPE = dict(epochs=15, device="cpu")
NANO_MODELS = ("pit-n", "vit-n/2", "resnet-n")
# As in studies/demo.toml, the transformers' position embeddings start at std 1.0, not the
# default 0.02: in 15 epochs on digits pit-n stays near 30% from 0.02 (docs/defaults.md).
NANO_MODEL_KW = {"pit-n": {"pos_embed_std": 1.0}, "vit-n/2": {"pos_embed_std": 1.0}}


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory):
    """{model name: TrainResult} for pit-n, vit-n/2 and resnet-n on digits."""
    root = tmp_path_factory.mktemp("runs")
    results = {}
    for name in NANO_MODELS:
        out = root / name.replace("/", "-p")
        results[name] = train(TrainConfig(name, "digits", out=out, model_kw=NANO_MODEL_KW.get(name, {}), **DIGITS_RECIPE))
    return results


# A nano DiT trained as a denoiser through the same loop, the suite's one diffusion run: dit-n/4
# (four 4x4 patches of an 8x8 digit) is the cheapest DiT whose samples a classifier reads as
# their labels after a short run.
DIT_RECIPE = dict(task="diffusion", epochs=20, batch_size=32, lr=4e-3, warmup_epochs=1, device="cpu")


@pytest.fixture(scope="session")
def trained_dit(tmp_path_factory):
    """TrainResult of dit-n/4 trained with --task diffusion on digits."""
    return train(TrainConfig("dit-n/4", "digits", out=tmp_path_factory.mktemp("runs") / "dit-n-p4", **DIT_RECIPE))


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


# Results must not depend on how many threads a test happens to get: a fixed count (2, the
# CI machine's cores; LOCALITYLAB_TEST_THREADS=1 when several suites share the cores, where
# spinning OpenMP threads would slow every one of them many times over).
TEST_THREADS = int(os.environ.get("LOCALITYLAB_TEST_THREADS", "2"))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(TEST_THREADS)
    yield
