"""A user's runs survive an upgrade: checkpoints written by localitylab before the training
reshape (commit 46f8488) load, evaluate, give the logits that code gave, and resume, from
the end of an epoch and from the middle of one (the old 'partial' format).

The checkpoints and expected.pt in tests/fixtures/old_checkpoints/ were written by that
commit with tests/fixtures/old_checkpoints/make.py (its docstring has the exact command).
The expected logits were computed on the machine that wrote them; another CPU may round the
last bit of a float differently, hence the tolerance (the same machine agrees exactly).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import localitylab
from localitylab.train import TrainConfig, read_checkpoint, train
from localitylab.train.evaluation import evaluate_checkpoint
from localitylab.train.init_from import init_from_checkpoint

OLD = Path(__file__).resolve().parent / "fixtures" / "old_checkpoints"
SMALL = {"depth": 1, "embed_dim": 32, "num_heads": 2}
# The recipes make.py trained with (the old TrainConfig's keyword arguments).
VIT = dict(epochs=4, batch_size=64, warmup_epochs=1, lr=1e-2, seed=5, device="cpu", model_kw=SMALL)
MAE = dict(epochs=2, batch_size=64, warmup_epochs=0, lr=3e-3, seed=5, device="cpu", model_kw=SMALL, task="mae",
           decoder_dim=16, decoder_depth=1, decoder_heads=2, clip_grad=None, label_smoothing=0.0)
CLOSE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def expected():
    return torch.load(OLD / "expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The fixtures' runs trained from scratch by this code, to the end: what resuming must reach."""
    torch.set_num_threads(1)  # make.py's setting: bit-identity needs the same reduction order
    root = tmp_path_factory.mktemp("uninterrupted")
    # make.py built the fixtures when learned position embeddings started at std 1.0 (the
    # default until issue 15, now 0.02): the run they resume to must start from the same weights.
    then = {"model_kw": {**SMALL, "pos_embed_std": 1.0}}
    return {"vit": train(TrainConfig("vit-n/2", "digits", out=root / "vit", **{**VIT, **then})),
            "mae": train(TrainConfig("pit-n", "digits", out=root / "mae", **{**MAE, **then}))}


def resumed(fixture: str, model: str, recipe: dict, tmp_path: Path):
    run_dir = tmp_path / fixture
    run_dir.mkdir()
    shutil.copy(OLD / fixture / "ckpt.pt", run_dir / "ckpt.pt")
    torch.set_num_threads(1)
    return train(TrainConfig(model, "digits", out=run_dir, resume=True, **recipe))


def flat(value, path: str = "") -> dict:
    """Every leaf of nested dicts and lists (a state dict, an optimizer state) by its path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{path}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{path}/{i}").items()}
    return {path: value}


def assert_same_training(resumed: Path, reference: Path, start: Path, keys=("model_state",)) -> float:
    """The resumed run ends where the uninterrupted one does: each tensor's distance from the
    reference is under 1% of how far the reference moved from the fixture's weights (plus 1e-6). Bit
    identity holds only on the CPU that wrote the fixtures: elsewhere other kernels round
    differently over the steps both runs take before the resume point. Returns the
    largest such ratio. Optimizer step counts match exactly."""
    first, second, origin = read_checkpoint(resumed), read_checkpoint(reference), read_checkpoint(start)
    worst = 0.0
    for key in keys:
        mine, theirs, then = flat(first[key]), flat(second[key]), flat(origin[key])
        assert mine.keys() == theirs.keys(), key
        for name, value in mine.items():
            if not isinstance(value, torch.Tensor) or value.ndim == 0:
                assert value == theirs[name], (key, name)
                continue
            value, other = value.double(), theirs[name].double()
            if name.endswith("attn.qkv.bias"):  # the key bias gets no gradient: its value is rounding noise
                third = len(value) // 3
                value, other = value[:third], other[:third]
            moved = float((other - then[name].double().reshape(theirs[name].shape)[: len(other)]).norm())
            off = float((value - other).norm())
            # 1e-6: a tensor that stays put (MAE's frozen classifier) differs only by its init's rounding
            assert off <= 0.01 * moved + 1e-6, f"{key}{name}: off by {off:.2e}, the run moved it {moved:.2e}"
            if moved > 1e-6:
                worst = max(worst, off / moved)
    return worst


def test_an_old_checkpoint_loads_and_gives_the_old_logits(expected):
    model = localitylab.load(OLD / "vit-epoch" / "ckpt.pt")
    assert model.run.spec.name == "vit-n/2" and model.run.spec.model_kw == SMALL and model.run.epoch == 3
    with torch.no_grad():
        logits = model(model.run.data.prepare(expected["images"]))
    torch.testing.assert_close(logits, expected["vit_logits"], **CLOSE)
    print(f"old vit logits: max difference {float((logits - expected['vit_logits']).abs().max()):.1e}")


def test_an_old_checkpoint_evaluates_to_its_recorded_accuracy(expected):
    accuracy = evaluate_checkpoint(OLD / "vit-epoch" / "ckpt.pt", device="cpu")["accuracy"]
    assert accuracy == pytest.approx(float(expected["vit_accuracy"]), abs=1e-9)
    assert accuracy == pytest.approx(read_checkpoint(OLD / "vit-epoch" / "ckpt.pt")["metrics"]["test_acc"])
    assert accuracy > 0.3  # it learned something: a wrong load would sit near 0.1


def test_an_old_mae_checkpoint_loads_as_its_encoder_and_starts_a_fine_tune(expected, tmp_path):
    model = localitylab.load(OLD / "mae-epoch" / "ckpt.pt")
    with torch.no_grad():
        logits = model(model.run.data.prepare(expected["images"]))
    torch.testing.assert_close(logits, expected["mae_logits"], **CLOSE)
    from localitylab.models.registry import ModelSpec, build_model

    report = init_from_checkpoint(build_model(ModelSpec("pit-n", 8, 1, 10, "learn", SMALL)), OLD / "mae-epoch" / "ckpt.pt")
    assert sorted(report.new) == [] and len(report.loaded) == len(read_checkpoint(OLD / "mae-epoch" / "ckpt.pt")["model_state"])


def test_an_old_end_of_epoch_checkpoint_resumes_to_the_uninterrupted_run(uninterrupted, tmp_path):
    result = resumed("vit-epoch", "vit-n/2", VIT, tmp_path)
    reference = uninterrupted["vit"]
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    worst = assert_same_training(result.checkpoint, reference.checkpoint, OLD / "vit-epoch" / "ckpt.pt",
                                 ("model_state", "optimizer_state"))
    for mine, theirs in zip(result.history, reference.history, strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert mine["test_acc"] == pytest.approx(theirs["test_acc"], abs=1 / 360 + 1e-9)
    print(f"resumed from the old end-of-epoch checkpoint: off by at most {worst:.1e} of the last epoch's movement")


def test_an_old_mid_epoch_checkpoint_resumes_where_it_stopped(uninterrupted, tmp_path):
    old = read_checkpoint(OLD / "vit-mid" / "ckpt.pt")
    assert old["partial"]["epoch"] == 4 and old["partial"]["batch"] == 5  # the old shape
    result = resumed("vit-mid", "vit-n/2", VIT, tmp_path)
    reference = uninterrupted["vit"]
    assert read_checkpoint(result.checkpoint)["step"] == read_checkpoint(reference.checkpoint)["step"] == 4 * 22
    worst = assert_same_training(result.checkpoint, reference.checkpoint, OLD / "vit-mid" / "ckpt.pt",
                                 ("model_state", "optimizer_state"))
    # The last epoch's training loss and accuracy count the 5 batches before the stop once.
    assert result.history[-1]["train_loss"] == pytest.approx(reference.history[-1]["train_loss"], rel=1e-5)
    assert result.history[-1]["train_acc"] == pytest.approx(reference.history[-1]["train_acc"], abs=1e-9)
    print(f"resumed from the old mid-epoch checkpoint: off by at most {worst:.1e} of the remaining steps' movement")


def test_an_old_mae_checkpoint_resumes_with_its_decoder(uninterrupted, tmp_path):
    result = resumed("mae-epoch", "pit-n", MAE, tmp_path)
    worst = assert_same_training(result.checkpoint, uninterrupted["mae"].checkpoint, OLD / "mae-epoch" / "ckpt.pt",
                                 ("model_state", "mae_state", "optimizer_state"))
    print(f"resumed MAE from the old checkpoint: off by at most {worst:.1e} of the last epoch's movement")
