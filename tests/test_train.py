"""Training: accuracy on digits, bit-identical resume, checkpoints, pixel permutation."""

from __future__ import annotations

import csv
import json
import os
import pickle

import pytest
import torch

import localitylab
from localitylab.data import load_dataset
from localitylab.data.permutation import random_permutation
from localitylab.errors import UserError
from localitylab.train import TrainConfig, train
from localitylab.io import safe_torch_load
from localitylab.train.checkpoint import read_checkpoint
from localitylab.train.evaluation import evaluate_checkpoint
from localitylab.train.progress import Reporter
from tests.conftest import NANO_MODELS


@pytest.mark.parametrize("name", NANO_MODELS)
def test_nano_models_learn_digits(trained_runs, name):
    result = trained_runs[name]
    assert result.final["test_acc"] >= 0.90, result.history
    # with digits' own recipe: only the epochs were given (`train MODEL digits --epochs 15`)
    recipe = json.loads((result.run_dir / "run.json").read_text())["recipe"]
    assert {key for key, entry in recipe.items() if entry["from"] == "user"} == {"epochs"}
    assert recipe["batch_size"] == {"value": 32, "from": "data set"}
    # digits' learned position tables start at std 1.0 (from timm's 0.02 pit-n ends near 30%)
    if name == "resnet-n":
        assert "pos_embed_std" not in recipe
    else:
        assert recipe["pos_embed_std"] == {"value": 1.0, "from": "data set"}
        assert json.loads((result.run_dir / "run.json").read_text())["model_spec"]["model_kw"] == {"pos_embed_std": 1.0}
    rows = list(csv.DictReader(open(result.run_dir / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(result.history) + 1))
    assert float(rows[-1]["test_acc"]) == pytest.approx(result.final["test_acc"])


@pytest.mark.parametrize("name", NANO_MODELS)
def test_checkpoint_round_trip_gives_identical_logits(trained_runs, name):
    result = trained_runs[name]
    model = localitylab.load(result.checkpoint)
    assert not model.training
    assert model.run.spec.name == name and model.run.data.name == "digits"
    data = load_dataset("digits")
    x = model.run.data.prepare(data.test_images[:32])
    state = read_checkpoint(result.checkpoint)["model_state"]
    again = localitylab.load(result.checkpoint)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # Evaluating the checkpoint reproduces the accuracy the run recorded.
    assert evaluate_checkpoint(result.checkpoint, device="cpu")["accuracy"] == pytest.approx(result.final["test_acc"])


class StopAfter(Reporter):
    """Simulates a run killed right after the checkpoint of epoch `epoch` was written."""

    def __init__(self, epoch):
        self.epoch = epoch

    def epoch_end(self, row):
        if row["epoch"] == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.parametrize("name", ["pit-n", "resnet-n"])
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, name):
    recipe = dict(epochs=3, batch_size=64, warmup_epochs=1, device="cpu", seed=3)
    whole = train(TrainConfig(name, "digits", out=tmp_path / "whole", **recipe))
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(name, "digits", out=tmp_path / "cut", **recipe), StopAfter(1))
    assert read_checkpoint(tmp_path / "cut" / "ckpt.pt")["epoch"] == 1
    resumed = train(TrainConfig(name, "digits", out=tmp_path / "cut", resume=True, **recipe))
    a, b = read_checkpoint(whole.checkpoint), read_checkpoint(resumed.checkpoint)
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    # A finished run resumed again does nothing.
    again = train(TrainConfig(name, "digits", out=tmp_path / "cut", resume=True, **recipe))
    assert len(again.history) == 3


def test_resume_refuses_another_recipe_and_overwrite_needs_resume(tmp_path):
    recipe = dict(epochs=1, batch_size=64, warmup_epochs=0, device="cpu")
    train(TrainConfig("resnet-n", "digits", out=tmp_path, **recipe))
    with pytest.raises(UserError, match="pass resume to continue that run"):
        train(TrainConfig("resnet-n", "digits", out=tmp_path, **recipe))
    with pytest.raises(UserError, match="lr was"):
        train(TrainConfig("resnet-n", "digits", out=tmp_path, resume=True, **(recipe | {"lr": 0.5})))


def test_permute_pixels_is_recorded_and_applied_at_eval_time(tmp_path):
    result = train(TrainConfig("vit-n/2", "digits", out=tmp_path, epochs=6, batch_size=32, warmup_epochs=1,
                               device="cpu", permute_pixels=11))
    model = localitylab.load(result.checkpoint)
    assert torch.equal(model.run.data.permutation, random_permutation(64, 11))
    assert model.run.data.permute_seed == 11
    # The checkpoint's evaluation (permutation applied) reproduces the training run's own
    # test accuracy; the same model on unshuffled pixels does much worse.
    evaluated = evaluate_checkpoint(result.checkpoint, device="cpu")["accuracy"]
    assert evaluated == pytest.approx(result.final["test_acc"])
    assert evaluated > 0.6
    model.run.data.permutation = None
    data = load_dataset("digits")
    with torch.no_grad():
        plain = (model(model.run.data.prepare(data.test_images)).argmax(-1) == data.test_labels).float().mean()
    assert plain < evaluated - 0.2


FEW_SHUFFLES = {"draws": 1, "window_sizes": [2], "tile_grids": [2], "swap_fractions": [0.5], "swap_distances": [2]}


def test_swap_trained_run_is_probed_in_the_space_it_was_trained_in(tmp_path):
    """The PiT paper's swap experiment as a training option: the run's one permutation (64
    swaps within 2 px, seed 5) is recorded, rebuilt exactly from its setting and seed, and
    applied by `localitylab.load` and the probes to every test image as in training."""
    from localitylab.data.permutation import permutation_for_setting, permute_pixels, swap_permutation
    from localitylab.probes.runner import ProbeRequest, run_probes

    config = TrainConfig("resnet-n", "digits", epochs=2, batch_size=64, warmup_epochs=0, device="cpu",
                         permute_pixels=5, swaps=64, swap_distance=2)
    assert config.run_dir().name == "resnet-n-digits-perm5-swaps64-d2"
    result = train(config.model_copy(update={"out": tmp_path / "run"}))
    expected = swap_permutation(8, 8, 64, 2.0, 5)
    assert not torch.equal(expected, torch.arange(64))
    run = json.loads((result.run_dir / "run.json").read_text())
    assert (run["permute_setting"], run["permute_seed"]) == ("swaps-64-2", 5)
    assert torch.equal(permutation_for_setting(run["permute_setting"], 8, 8, run["permute_seed"]), expected)
    model = localitylab.load(result.checkpoint)
    assert torch.equal(model.run.data.permutation, expected)

    # Independently: the model on test images permuted by hand scores the run's own test accuracy...
    data = load_dataset("digits")
    with torch.no_grad():
        swapped = model(model.run.data.normalise(permute_pixels(data.test_images, expected))).argmax(-1)
        natural = model(model.run.data.normalise(data.test_images)).argmax(-1)
    by_hand = float((swapped == data.test_labels).double().mean())
    assert by_hand == pytest.approx(result.final["test_acc"])
    assert not torch.equal(swapped, natural)  # ...and the permutation is not a no-op for this model
    # ...and so does the permutation probe's clean row, over the whole test split, which says what it is.
    table = run_probes(["permutation"], ProbeRequest(source=str(result.checkpoint), device="cpu",
                                                     out=tmp_path / "probes", options=FEW_SHUFFLES))[0].table
    clean = table[(table["metric"] == "accuracy") & (table["setting"] == "clean")].iloc[0]
    assert clean["n_images"] == len(data.test_labels)
    assert clean["value"] == pytest.approx(by_hand)
    assert "trained and tested on pixels permuted by 64 swaps within distance 2" in clean["note"]
    assert "on top of the training permutation" in table[table["setting"] == "global"].iloc[0]["note"]


def test_checkpoint_holds_everything_the_issue_lists(trained_runs):
    data = read_checkpoint(trained_runs["pit-n"].checkpoint)
    for key in ("model_state", "model_spec", "data", "config", "metrics", "versions", "optimizer_state", "epoch"):
        assert key in data
    assert data["model_spec"]["pos_embed"] == "learn"
    assert set(data["data"]) >= {"name", "mean", "std", "class_names", "permutation", "img_size", "in_chans"}
    assert set(data["versions"]) == {"localitylab", "torch", "timm"}


def test_foreign_truncated_and_malicious_files_are_refused(tmp_path, trained_runs):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(UserError, match="not a localitylab checkpoint"):
        localitylab.load(foreign)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(trained_runs["resnet-n"].checkpoint.read_bytes()[:5000])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        localitylab.load(truncated)

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "localitylab.checkpoint", "model_spec": Payload()}, evil)
    with pytest.raises(UserError, match="refused"):
        localitylab.load(evil)
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError):
        safe_torch_load(raw)
    assert not marker.exists()


def test_checkpoint_is_written_atomically(tmp_path):
    result = train(TrainConfig("resnet-n", "digits", out=tmp_path, epochs=1, batch_size=128, warmup_epochs=0, device="cpu"))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == [] and result.checkpoint.exists()
