"""`localitylab.probe` on a model in memory: the same table as the command line on the same
weights and images, nothing written, the model left as it was."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

import localitylab
from localitylab.data import load_dataset
from localitylab.errors import UserError
from localitylab.probes import read_table
from localitylab.probes.target import select_images
from tests.cli_helpers import run_cli, tree
from tests.hub_cache import write_weights_file


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    return write_weights_file(tmp_path_factory.mktemp("weights") / "test_vit.safetensors")


def timm_model(weights: Path):
    import timm

    return timm.create_model("test_vit", pretrained=True, pretrained_cfg_overlay={"file": str(weights)})


def test_python_call_gives_the_cli_table_and_writes_nothing(tmp_path, monkeypatch, weights_file):
    cli = run_cli(["probe", "attention-distance", "timm:test_vit", "--weights", weights_file, "--images", "3",
                   "--batch-size", "2", "--out", tmp_path / "cli", "--device", "cpu"])
    assert cli.status == 0, cli.err
    from_cli = read_table(tmp_path / "cli" / "attention-distance.csv")

    work = tmp_path / "notebook"
    work.mkdir()
    monkeypatch.chdir(work)
    before = tree(tmp_path)
    model = timm_model(weights_file).train()  # as a notebook might leave it: the probe uses eval mode
    images, labels = select_images(load_dataset("digits"), 3, seed=0)  # the CLI's images: uint8, 8 x 8, grey
    table = localitylab.probe("attention-distance", model, images, labels, batch_size=2,
                              model_name="timm:test_vit (test_vit.safetensors)")
    pd.testing.assert_frame_equal(table, from_cli)
    assert tree(tmp_path) == before  # nothing written, anywhere
    assert model.training and all(m.training for m in model.modules())

    # The same images already prepared (timm's own transform) give the same table.
    from localitylab.models.preprocessing import Preprocessing

    pipeline = Preprocessing.of_model(model)
    mean = torch.tensor(pipeline.mean).view(1, 3, 1, 1)
    std = torch.tensor(pipeline.std).view(1, 3, 1, 1)
    prepared = (pipeline.resize(images).float() / 255.0 - mean) / std
    again = localitylab.probe("attention-distance", model, prepared, model_name="timm:test_vit (test_vit.safetensors)",
                              batch_size=2)
    pd.testing.assert_frame_equal(again, from_cli)


def test_a_loaded_checkpoint_probes_as_the_cli_does(trained_runs, tmp_path):
    checkpoint = trained_runs["vit-n/2"].checkpoint
    cli = run_cli(["probe", "attention-distance", checkpoint, "--images", "4", "--out", tmp_path, "--device", "cpu"])
    assert cli.status == 0, cli.err
    model = localitylab.load(checkpoint)
    images, labels = select_images(load_dataset("digits"), 4, seed=0)
    table = localitylab.probe("attention-distance", model, images, labels)
    pd.testing.assert_frame_equal(table, read_table(tmp_path / "attention-distance.csv"))


def test_bad_calls_say_what_is_wrong(weights_file):
    model = timm_model(weights_file)
    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(UserError, match="permutation measures accuracy: pass labels"):
        localitylab.probe("permutation", model, images)
    with pytest.raises(UserError, match="2 labels for 3 images|3 labels for 2 images"):
        localitylab.probe("attention-distance", model, images, torch.zeros(3))
    with pytest.raises(UserError, match="has no input pipeline of its own"):
        localitylab.probe("attention-distance", torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)), images)
    with pytest.raises(UserError, match="unknown probe option 'nope'"):
        localitylab.probe("attention-distance", model, images, options={"nope": 1})
    with pytest.raises(UserError, match="must be uint8"):
        localitylab.probe("attention-distance", model, images.int(), preprocessing="timm")
