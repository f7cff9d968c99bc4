"""Sample sets on disk and their quality table, with its reference rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from localitylab.data.registry import load_dataset
from localitylab.errors import UserError
from localitylab.generation.quality import (FLOOR, NOISE, UNTRAINED, ZeroNoise, feature_space, reference_sources,
                                            sample_quality, sample_source)
from localitylab.generation.samples import GRID_NAME, SampleSet, grid_array, read_samples, write_samples


def test_a_sample_set_round_trips_and_leaves_no_temporary_file(tmp_path):
    images = torch.randint(0, 256, (23, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(23) % 10
    meta = {"model": "dit-n/1", "sampler": "ddim", "steps": 10, "guidance": 2.0, "seed": 3}
    write_samples(tmp_path, SampleSet(images, labels, meta))
    back = read_samples(tmp_path)
    assert torch.equal(back.images, images) and torch.equal(back.labels, labels) and back.meta == meta
    assert back.setting == "ddim, 10 steps, guidance 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz", GRID_NAME]


def test_the_grid_has_one_row_per_class_of_enlarged_tiles():
    images = torch.zeros(30, 1, 8, 8, dtype=torch.uint8)
    labels = torch.arange(30) % 3
    images[labels == 1] = 200
    grid = grid_array(images, labels, per_class=10)
    tile, pad = 32, 2  # 8 px enlarged 4x
    assert grid.shape == (3 * (tile + pad) + pad, 10 * (tile + pad) + pad, 3)
    row_1 = grid[pad + (tile + pad): pad + (tile + pad) + tile, pad:pad + tile]
    assert (row_1 == 200).all() and (grid[pad:pad + tile, pad:pad + tile] == 0).all()


def test_a_file_that_is_not_a_sample_set_is_a_user_error(tmp_path):
    (tmp_path / "samples.npz").write_bytes(b"not numpy")
    with pytest.raises(UserError, match="not a localitylab sample set"):
        read_samples(tmp_path)
    with pytest.raises(UserError, match="no sample set"):
        read_samples(tmp_path / "elsewhere")


@pytest.fixture(scope="module")
def digits_space(trained_runs):
    from localitylab.probes.target import load_target

    target, dataset = load_target(str(trained_runs["resnet-n"].run_dir), device="cpu")
    return feature_space(target), dataset


def test_the_reference_rows_bracket_the_scale(digits_space):
    """Real held-out digits sit near the train split; noise and an untrained DiT far from it."""
    space, dataset = digits_space
    n = 200
    labels = torch.arange(n) % 10
    untrained_like = SampleSet(torch.zeros(n, 1, 8, 8, dtype=torch.uint8), labels,
                               {"model": "blank", "sampler": "ddim", "steps": 10, "guidance": 1.0, "seed": 0})
    table = sample_quality(space, dataset.train_images,
                           [sample_source(untrained_like), *reference_sources(dataset, untrained_like)])
    value = table.set_index(["model", "metric"])["value"]
    fd, accuracy = "fd_resnet-n", "class_accuracy_resnet-n"
    assert value[FLOOR, fd] < 0.05 * min(value[NOISE, fd], value[UNTRAINED, fd])
    assert value[FLOOR, accuracy] > 0.9 and value[NOISE, accuracy] < 0.3
    assert value[FLOOR, "precision_resnet-n"] > 0.5 and value[NOISE, "precision_resnet-n"] < 0.1
    assert set(table["n_images"]) == {n, len(dataset.test_images)}


def test_the_untrained_reference_is_what_an_untrained_dit_samples():
    from localitylab.diffusion.objective import Schedule
    from localitylab.diffusion.sampling import generate
    from localitylab.models import ModelSpec, build_model

    dataset = load_dataset("digits")
    labels = torch.arange(12) % 10
    samples = SampleSet(torch.zeros(12, 1, 8, 8, dtype=torch.uint8), labels,
                        {"sampler": "dpm-solver", "steps": 6, "guidance": 1.0, "seed": 5})
    reference = {s.name: s for s in reference_sources(dataset, samples)}[UNTRAINED]
    dit = build_model(ModelSpec("dit-n/2", 8, 1, 10, "sincos"))
    from_dit = generate(dit, labels, Schedule(), in_chans=1, img_size=8, sampler="dpm-solver", steps=6, seed=5,
                        null_class=dit.null_class)
    assert torch.equal(reference.images, from_dit)
    assert torch.equal(ZeroNoise()(torch.ones(2, 1, 4, 4), None, None), torch.zeros(2, 1, 4, 4))
