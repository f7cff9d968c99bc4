"""--init-from loads exactly the weights whose names and shapes match, refuses the rest with
one clear error, and --linear-probe trains the head alone."""

from __future__ import annotations

import pytest
import torch

from localitylab.errors import UserError
from localitylab.models.registry import ModelSpec, build_model
from localitylab.train import TrainConfig, read_checkpoint, train
from localitylab.train.init_from import init_from_checkpoint


def test_matching_weights_are_loaded_and_a_new_head_is_reported(trained_runs):
    source = trained_runs["vit-n/2"].checkpoint
    saved = read_checkpoint(source)["model_state"]
    model = build_model(ModelSpec("vit-n/2", 8, 1, 5, "learn"))  # five classes: another head
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_from_checkpoint(model, source)
    assert sorted(report.new) == ["head.bias", "head.weight"]
    assert set(report.loaded) == set(saved) - {"head.bias", "head.weight"}
    for key, value in model.state_dict().items():
        expected = before[key] if key in report.new else saved[key]
        assert torch.equal(value, expected), key


@pytest.mark.parametrize("name, img_size, culprit", [("vit-n/2", 16, "pos_embed"), ("pit-n", 8, "pos_embed")])
def test_incompatible_shapes_are_refused_naming_a_tensor(trained_runs, name, img_size, culprit):
    # vit-n/2 at 16 px has 65 tokens where the source has 17; pit-n at 8 px has 65 where
    # vit-n/2 (the source) has 17 and another patch embedding.
    model = build_model(ModelSpec(name, img_size, 1, 10, "learn"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=f"cannot initialise from .*differ in shape.*{culprit}"):
        init_from_checkpoint(model, trained_runs["vit-n/2"].checkpoint)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded


def test_another_family_shares_no_weights(trained_runs):
    model = build_model(ModelSpec("vit-n/2", 8, 1, 10, "learn"))
    with pytest.raises(UserError, match="no tensor of it matches"):
        init_from_checkpoint(model, trained_runs["resnet-n"].checkpoint)


def test_linear_probe_changes_only_the_head(trained_runs, tmp_path):
    source = trained_runs["vit-n/2"].checkpoint
    saved = read_checkpoint(source)["model_state"]
    result = train(TrainConfig("vit-n/2", "digits", out=tmp_path / "probe", epochs=2, batch_size=64,
                               warmup_epochs=0, init_from=str(source), linear_probe=True, label_smoothing=0.0))
    trained = read_checkpoint(result.checkpoint)
    changed = {k for k, v in trained["model_state"].items() if not torch.equal(v, saved[k])}
    assert changed == {"head.weight", "head.bias"}
    assert result.final["test_acc"] > 0.9  # the frozen features of a trained model are good ones
    assert '"init_from"' in (result.run_dir / "run.json").read_text()


def test_linear_probe_needs_features():
    with pytest.raises(UserError, match="give the features with init_from") as refused:
        TrainConfig("vit-n/2", "digits", linear_probe=True)
    assert refused.value.settings == ("linear_probe", "init_from")
