"""Training a DiT through the one training loop (`localitylab train dit-n/P digits --task
diffusion`), and what the run gives: a checkpoint the probes and samplers rebuild the schedule
from, a test loss at fixed draws, a bit-identical resume, samples un-permuted, and samples
that a trained classifier takes for their labels."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import localitylab

from localitylab.data.registry import load_dataset
from localitylab.diffusion.objective import DiffusionObjective
from localitylab.errors import RunStopped
from localitylab.train import TrainConfig, read_checkpoint, train
from localitylab.train.progress import Reporter
from localitylab.train.tasks import DenoisingTask
from tests.cli_helpers import run_cli


def test_a_diffusion_run_is_an_ordinary_run_with_its_schedule(trained_dit):
    checkpoint = read_checkpoint(trained_dit.checkpoint)
    assert checkpoint["task"] == "diffusion"
    assert checkpoint["diffusion_options"] == DiffusionObjective().options()  # DDPM linear 1,000 steps, dropout 0.1
    config = checkpoint["config"]
    # DiT's defaults where a diffusion run differs from a classifier: its sin-cos table, no
    # weight decay, no random crops, no label smoothing.
    assert (config["pos_embed"], config["weight_decay"], config["crop_padding"], config["label_smoothing"]) == \
        ("sincos", 0.0, 0, 0.0)
    run = json.loads((trained_dit.run_dir / "run.json").read_text())
    assert "--task diffusion" in run["command"] and run["metrics"]["test_acc"] is None
    history = trained_dit.history
    assert history[-1]["test_loss"] < 0.5 * history[0]["test_loss"]

    from localitylab.probes.sources import load_target

    target, _ = load_target(str(trained_dit.run_dir), device="cpu")
    assert target.denoising.objective.options() == checkpoint["diffusion_options"]


def test_the_command_line_recorded_in_the_run_rebuilds_its_config(trained_dit):
    """run.json's command, parsed by the real command line, gives the run's own config."""
    from cli.options import training_options

    run = json.loads((trained_dit.run_dir / "run.json").read_text())
    captured = {}

    @training_options("train")
    def fake_train(config, nproc, quiet):
        captured["config"] = config

    import typer

    app = typer.Typer()
    app.command()(fake_train)
    from typer.testing import CliRunner

    args = run["command"].split()[2:]  # after `localitylab train`
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert captured["config"].defining() == TrainConfig(**run["config"]).defining()


def test_the_test_loss_is_the_objective_at_fixed_draws():
    """An untrained DiT predicts zero noise (adaLN-Zero), so its test loss is the mean square
    of the drawn noise: computed here from the documented draws, at two batch sizes."""
    from localitylab.data.batching import batch_generator
    from localitylab.models import ModelSpec, build_model

    dataset = load_dataset("digits")
    images, labels = dataset.test_images[:300], dataset.test_labels[:300]
    config = TrainConfig("dit-n/4", "digits", task="diffusion", seed=7)
    task = DenoisingTask(config, dataset.info)
    model = build_model(ModelSpec("dit-n/4", 8, 1, 10, "sincos"))
    expected = []
    for chunk, start in enumerate(range(0, len(images), DenoisingTask.EVAL_DRAWS)):
        generator = batch_generator("cpu", 7, -1, chunk)
        count = len(images[start:start + DenoisingTask.EVAL_DRAWS])
        torch.randint(0, 1000, (count,), generator=generator)  # the timesteps, drawn first
        expected.append(torch.randn((count, 1, 8, 8), generator=generator).pow(2).flatten(1).mean(1))
    expected = torch.cat(expected).double().sum()
    for batch_size in (512, 7):
        sums = task.evaluate(model, dataset.info, images, labels, batch_size, False)
        assert int(sums["count"]) == 300
        assert float(sums["loss_sum"]) == pytest.approx(float(expected), rel=1e-6)


class SignalAt(Reporter):
    """Sends this process SIGTERM right after batch `batch` of epoch `epoch` (a scheduler's
    pre-emption, at an exact step): the loop finishes the step, checkpoints and stops."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.at = (epoch, batch)

    def step(self, epoch, batch, loss):
        if (epoch, batch) == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_stopped_diffusion_run_resumes_bit_identically(tmp_path):
    recipe = dict(task="diffusion", epochs=2, batch_size=64, warmup_epochs=1, device="cpu", seed=3, snapshots=6)
    whole = train(TrainConfig("dit-n/4", "digits", out=tmp_path / "whole", **recipe))
    with pytest.raises(RunStopped):
        train(TrainConfig("dit-n/4", "digits", out=tmp_path / "cut", **recipe), SignalAt(2, 5))
    stopped = read_checkpoint(tmp_path / "cut" / "ckpt.pt")
    assert stopped["epoch"] == 1 and stopped["epoch_progress"]["batch"] == 5  # mid-epoch
    resumed = train(TrainConfig("dit-n/4", "digits", out=tmp_path / "cut", resume=True, **recipe))
    a, b = read_checkpoint(whole.checkpoint), read_checkpoint(resumed.checkpoint)
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key
    for key in ("train_loss", "test_loss"):
        assert [r[key] for r in a["history"]] == [r[key] for r in b["history"]], key
    # The snapshots too (steps 0, 1, 3, 7 and 17 before the stop, 44 after the resume), with
    # the denoising test loss and no accuracy.
    from localitylab.train.snapshots import read_index

    kept = read_index(whole.run_dir)
    assert [e["step"] for e in kept] == [0, 1, 3, 7, 17, 44] and read_index(resumed.run_dir) == kept
    assert kept[-1]["test_loss"] == whole.history[-1]["test_loss"] and kept[-1]["test_acc"] is None
    for entry in kept:
        mine, theirs = (localitylab.load(run.run_dir, step=entry["step"]).state_dict() for run in (whole, resumed))
        assert all(torch.equal(mine[key], theirs[key]) for key in mine), entry["step"]


def test_a_permuted_run_samples_in_natural_pixel_order(tmp_path):
    """--permute-pixels: the DiT learns and generates permuted images; `sample` writes them
    put back in natural order, which is the model's own output with the inverse permutation."""
    from localitylab.data.permutation import random_permutation
    from localitylab.diffusion.sampling import balanced_labels, generate
    from localitylab.generation.runs import SampleRequest, sample_run
    from localitylab.train import load

    run = train(TrainConfig("dit-n/4", "digits", task="diffusion", permute_pixels=5, epochs=1, batch_size=128,
                            out=tmp_path / "perm", device="cpu"))
    samples, _ = sample_run(SampleRequest(str(run.run_dir), n=12, steps=3, device="cpu", out=tmp_path / "s"))
    assert samples.meta["unpermuted"] and samples.meta["permute_seed"] == 5
    model = load(run.checkpoint)
    raw = generate(model, balanced_labels(12, 10), DiffusionObjective().schedule, in_chans=1, img_size=8, steps=3,
                   null_class=10).flatten(2)
    natural = torch.empty_like(raw)
    natural[..., random_permutation(64, 5)] = raw  # pixel j of the permuted image is pixel perm[j]
    assert torch.equal(samples.images, natural.view(12, 1, 8, 8))
    assert not torch.equal(samples.images.flatten(2), raw)


def test_a_trained_dits_samples_beat_the_untrained_and_carry_their_labels(trained_dit, trained_runs, tmp_path):
    """Through the command line: `sample`, then `evaluate-samples` in a trained resnet-n's
    features. The test split (the floor) is far below the samples, which are far below the
    untrained DiT (the ceiling); the classifier takes the samples for their labels."""
    from localitylab.generation.quality import FLOOR, NOISE, UNTRAINED

    out = tmp_path / "samples"
    result = run_cli(["sample", trained_dit.run_dir, "--n", "200", "--guidance", "2", "--seed", "1", "--device", "cpu",
                      "--out", out])
    assert result.status == 0, result.err
    assert (out / "samples.npz").is_file() and (out / "samples.png").is_file()
    result = run_cli(["evaluate-samples", out, "--classifier", trained_runs["resnet-n"].run_dir, "--device", "cpu"])
    assert result.status == 0, result.err
    assert "fd_resnet-n" in result.out
    table = json.loads((out / "sample-quality.json").read_text())
    assert table["sample_meta"]["guidance"] == 2.0 and table["against"] == "digits"
    from localitylab.probes.output import read_table

    rows = read_table(out / "sample-quality.csv")
    ours = rows[~rows["model"].str.startswith("reference:") & (rows["n_images"] == 200)].set_index("metric")
    value = rows.set_index(["model", "metric"])["value"]
    fd, accuracy = "fd_resnet-n", "class_accuracy_resnet-n"
    assert ours.loc[fd, "value"] < 0.2 * value[UNTRAINED, fd]
    assert value[FLOOR, fd] < 0.5 * ours.loc[fd, "value"]
    assert ours.loc[accuracy, "ci_low"] > 0.5  # chance is 0.1
    assert value[NOISE, accuracy] < 0.3
