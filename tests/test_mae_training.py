"""MAE pre-training through the one training loop, then fine-tuning and probing from it:
what `localitylab pretrain mae` and `train --init-from` promise, end to end on digits."""

from __future__ import annotations

import pytest
import torch

from localitylab.models.mae import mae_from_checkpoint
from localitylab.probes import ProbeRequest, run_probes
from localitylab.train import TrainConfig, read_checkpoint, train
from localitylab.train.tasks import MaskedAutoencoding


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mae") / "mae-pit-n"
    # Position embedding at std 1.0, as the suite's digits runs (tests/conftest.py): from the
    # default 0.02 an 8-epoch fine-tune of pit-n on digits stays near 30% (docs/defaults.md).
    return train(TrainConfig("pit-n", "digits", out=out, task="mae", epochs=6, batch_size=32, warmup_epochs=1,
                             label_smoothing=0.0, clip_grad=None, device="cpu", model_kw={"pos_embed_std": 1.0},
                             snapshots="every:3"))


def untrained_test_loss(config: TrainConfig) -> float:
    from localitylab.models.registry import build_model
    from localitylab.train.loop import model_spec_for, prepare_data

    dataset = prepare_data(config)
    torch.manual_seed(config.seed)
    task = MaskedAutoencoding(config, dataset.info)
    module = task.module(build_model(model_spec_for(config, dataset.info)))
    sums = task.evaluate(module, dataset.info, dataset.test_images, dataset.test_labels, 512, False)
    return float(sums["loss_sum"]) / int(sums["count"])


def test_reconstruction_loss_falls_well_below_its_start(mae_run):
    config = TrainConfig(**{**read_checkpoint(mae_run.checkpoint)["config"], "out": None})
    start = untrained_test_loss(config)
    losses = [row["test_loss"] for row in mae_run.history]
    print(f"MAE pit-n digits: test masked MSE {start:.3f} untrained -> {losses[-1]:.3f} after {len(losses)} epochs")
    assert losses[-1] < 0.6 * start
    assert all(row["test_acc"] is None for row in mae_run.history)  # no classifier to score


def test_the_checkpoint_is_an_encoder_every_tool_reads(mae_run):
    from localitylab.train import load

    data = read_checkpoint(mae_run.checkpoint)
    assert data["task"] == "mae" and data["mae_options"]["mask_ratio"] == 0.75
    encoder = load(mae_run.checkpoint)  # the registry model, strict state-dict load
    assert set(encoder.state_dict()) == set(data["model_state"])
    mae = mae_from_checkpoint(data)  # and the decoder comes back with it
    assert all(torch.equal(v, data["mae_state"][k]) for k, v in mae.decoder_state_dict().items())


def test_mae_snapshots_keep_the_encoder_from_its_initialisation(mae_run):
    from localitylab.train import load
    from localitylab.train.snapshots import read_index

    kept = read_index(mae_run.run_dir)
    assert [entry["epoch"] for entry in kept] == [0.0, 3.0, 6.0] and all(e["test_acc"] is None for e in kept)
    assert [entry["test_loss"] for entry in kept[1:]] == [mae_run.history[2]["test_loss"], mae_run.history[5]["test_loss"]]
    # step 0 is the untrained encoder: its masked-token loss is the one computed from the seed alone
    config = TrainConfig(**{**read_checkpoint(mae_run.checkpoint)["config"], "out": None})
    assert kept[0]["test_loss"] == pytest.approx(untrained_test_loss(config), rel=1e-9)
    last, final = load(mae_run.run_dir, step=kept[-1]["step"]), read_checkpoint(mae_run.checkpoint)["model_state"]
    assert last.state_dict().keys() == final.keys()  # the encoder, as the checkpoint keeps it
    assert all(torch.equal(value, final[key]) for key, value in last.state_dict().items())


def test_fine_tuning_from_mae_reaches_a_sane_accuracy(mae_run, tmp_path):
    result = train(TrainConfig("pit-n", "digits", out=tmp_path / "ft", epochs=8, batch_size=32, warmup_epochs=1,
                               init_from=str(mae_run.checkpoint), device="cpu"))
    print(f"pit-n fine-tuned from MAE: test accuracy {result.final['test_acc']:.3f}")
    assert result.final["test_acc"] > 0.8


def test_probes_read_the_mae_encoder(mae_run, tmp_path):
    request = ProbeRequest(source=str(mae_run.checkpoint), n_images=16, batch_size=16, device="cpu", out=tmp_path)
    outputs = {o.probe: o for o in run_probes(["attention-distance", "mae-reconstruction"], request)}
    distances = outputs["attention-distance"].table
    assert distances["value"].notna().all() and len(distances) > 0
    recon = outputs["mae-reconstruction"].table
    relative = recon[(recon["metric"] == "relative_mse") & (recon["setting"] == "ratio-0.75")]["value"]
    assert len(relative) == 1 and 0 < float(relative.iloc[0]) < 1  # better than predicting the mean colour
    assert any(path.name == "mae-reconstruction.png" for path in outputs["mae-reconstruction"].figures)


def test_pretraining_runs_on_two_processes(tmp_path):
    """--nproc hands the ranks the configuration as data; it once re-parsed a command line
    that named an option `pretrain mae` does not have (--label-smoothing)."""
    from tests.cli_helpers import run_command

    out = tmp_path / "mae-ddp"
    result = run_command("pretrain", "mae", "pit-n", "digits", "--epochs", "1", "--batch-size", "128",
                         "--warmup-epochs", "0", "--nproc", "2", "--out", out, "--quiet", "--snapshots", "2",
                         env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    data = read_checkpoint(out / "ckpt.pt")
    assert data["task"] == "mae" and data["epoch"] == 1 and data["config"]["clip_grad"] is None
    assert "test reconstruction loss" in result.stdout
    # rank 0 wrote the snapshots (step 0 and the end) and the run lists them
    from localitylab.train.snapshots import read_index

    assert [entry["step"] for entry in read_index(out)] == [0, data["step"]] == \
        [entry["step"] for entry in data["snapshots"]]
