"""Snapshots (`--snapshots`): the schedule, a killed run resumed to the same snapshots bit for
bit, and `localitylab.load(run, step=...)`. MAE and diffusion snapshots are tested with
their runs (tests/test_mae_training.py, tests/test_diffusion_training.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

import localitylab
from localitylab.errors import UserError
from localitylab.models.registry import ModelSpec, build_model
from localitylab.train import TrainConfig, read_checkpoint, train
from localitylab.train.progress import Reporter
from localitylab.train.snapshots import log_spaced_steps, parse_snapshots, read_index, snapshot_steps


# --- the schedule --------------------------------------------------------------------------------
@pytest.mark.parametrize("count,total", [(2, 10), (8, 66), (8, 7), (5, 1000), (12, 12), (30, 100)])
def test_log_spaced_moments_are_distinct_and_include_step_0_and_the_end(count, total):
    steps = log_spaced_steps(count, total)
    assert steps[0] == 0 and steps[-1] == total
    assert steps == sorted(set(steps)) and len(steps) == min(count, total + 1)


def test_log_spaced_moments_are_evenly_spaced_in_log_steps():
    steps = log_spaced_steps(6, 10_000)  # 1, 10, 100, 1000, 10000 after step 0
    assert steps == [0, 1, 10, 100, 1000, 10_000]
    # 1 .. 45,000 in 7 equal ratios, each moment the nearest whole step to its exact value
    exact = [45_000 ** (i / 7) for i in range(8)]
    assert all(abs(step - value) <= 0.5 for step, value in zip(log_spaced_steps(9, 45_000)[1:], exact, strict=True))


def test_every_k_epochs_and_listed_epochs():
    every = parse_snapshots("every:5")
    assert snapshot_steps(every, steps_per_epoch=10, epochs=12) == (0, 50, 100, 120)  # with step 0 and the end
    assert snapshot_steps(every, steps_per_epoch=10, epochs=10) == (0, 50, 100)
    assert snapshot_steps(parse_snapshots("0,1,2,5,10"), 7, 10) == (0, 7, 14, 35, 70)
    assert snapshot_steps(parse_snapshots([5]), 7, 10) == (35,)  # exactly the epochs listed
    assert snapshot_steps(None, 7, 10) == ()


@pytest.mark.parametrize("given,kept", [(8, "8"), ("8", "8"), (" every:5 ", "every:5"), ([10, 0, 2], "0,2,10"),
                                        ("0, 1,2", "0,1,2"), ([4], "4,"), ("4,", "4,"), (None, None)])
def test_a_spec_has_one_spelling_that_reads_back_as_itself(given, kept):
    config = TrainConfig("resnet-n", "digits", epochs=10, snapshots=given)
    assert config.snapshots == kept
    assert TrainConfig(**config.to_dict()).snapshots == kept
    assert "snapshots" not in config.defining()  # a resumed run may keep other moments


@pytest.mark.parametrize("given", ["x", "1", "0", "every:0", "every:", "every:2.5", "-1,2", "1,1", ",", [],
                                   True, 2.5, "3,x", "0,11"])
def test_odd_specs_are_one_user_error_naming_snapshots(given):
    with pytest.raises(UserError, match="snapshots") as raised:
        TrainConfig("resnet-n", "digits", epochs=10, snapshots=given)
    assert "snapshots" in raised.value.settings


def test_the_command_line_names_the_flag(tmp_path):
    from tests.cli_helpers import assert_one_line_error, run_cli

    result = run_cli(["train", "resnet-n", "digits", "--snapshots", "every:x", "--out", tmp_path / "run"])
    assert_one_line_error(result, "--snapshots must be")
    result = run_cli(["train", "resnet-n", "digits", "--epochs", "3", "--snapshots", "0,5", "--out", tmp_path / "run"])
    assert_one_line_error(result, "--snapshots lists epoch 5, but --epochs is 3")
    assert not (tmp_path / "run").exists()


# --- a run with snapshots, killed and resumed ----------------------------------------------------
RECIPE = dict(epochs=3, batch_size=64, warmup_epochs=1, device="cpu", seed=3, snapshots=8)  # 22 steps an epoch


class KilledAt(Reporter):
    """Simulates a run killed right after step `batch` of epoch `epoch` (no checkpoint then)."""

    def __init__(self, epoch, batch):
        self.at = (epoch, batch)

    def step(self, epoch, batch, loss):
        if (epoch, batch) == self.at:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """resnet-n with 8 snapshots: uninterrupted, and killed in epoch 2 after its snapshot at
    step 33 was written (the checkpoint is at step 22), then resumed."""
    root = tmp_path_factory.mktemp("snapshots")
    whole = train(TrainConfig("resnet-n", "digits", out=root / "whole", **RECIPE))
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig("resnet-n", "digits", out=root / "cut", **RECIPE), KilledAt(2, 15))
    killed = {"checkpoint_step": read_checkpoint(root / "cut" / "ckpt.pt")["step"],
              "steps": [entry["step"] for entry in read_index(root / "cut")]}
    # a moment written by a run killed before its index line was: not in this schedule, dropped on resume
    (root / "cut" / "snapshots" / "step-000050.safetensors").write_bytes(b"torn")
    resumed = train(TrainConfig("resnet-n", "digits", out=root / "cut", resume=True, **RECIPE))
    plain = train(TrainConfig("resnet-n", "digits", out=root / "plain", **{**RECIPE, "snapshots": None}))
    killed["plain"] = read_checkpoint(plain.checkpoint)
    return whole, resumed, killed


def test_the_snapshots_are_those_of_the_schedule_and_the_run_lists_them(runs):
    whole, _, _ = runs
    expected = log_spaced_steps(8, 66)
    assert expected == [0, 1, 2, 4, 8, 16, 33, 66]
    entries = read_index(whole.run_dir)
    assert [entry["step"] for entry in entries] == expected
    assert json.loads((whole.run_dir / "run.json").read_text())["snapshots"] == entries
    assert sorted(p.name for p in (whole.run_dir / "snapshots").iterdir()) == \
        ["index.json", *(f"step-{step:06d}.safetensors" for step in expected)]
    last = entries[-1]
    assert (last["epoch"], last["test_acc"], last["test_loss"]) == \
        (3.0, whole.history[-1]["test_acc"], whole.history[-1]["test_loss"])  # the epoch's own evaluation
    assert entries[6]["epoch"] == pytest.approx(33 / 22)
    with safe_open(str(whole.run_dir / "snapshots" / "step-000033.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert {key: json.loads(metadata[key]) for key in ("step", "epoch", "test_acc")} == \
        {key: entries[6][key] for key in ("step", "epoch", "test_acc")}


def test_a_killed_and_resumed_run_keeps_the_same_snapshots_bit_for_bit(runs):
    whole, resumed, killed = runs
    # the killed run had written the moment at step 33, past its checkpoint at step 22
    assert (killed["checkpoint_step"], killed["steps"]) == (22, [0, 1, 2, 4, 8, 16, 33])
    assert read_index(resumed.run_dir) == read_index(whole.run_dir)  # steps, epochs, test figures
    assert sorted(p.name for p in (resumed.run_dir / "snapshots").iterdir()) == \
        sorted(p.name for p in (whole.run_dir / "snapshots").iterdir())
    for entry in read_index(whole.run_dir):
        a = localitylab.load(whole.run_dir, step=entry["step"]).state_dict()
        b = localitylab.load(resumed.run_dir, step=entry["step"]).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), entry["step"]


def test_keeping_snapshots_changes_nothing_in_the_training(runs):
    """Their evaluations between epoch ends draw nothing from the generators training uses."""
    whole, _, killed = runs
    plain, final = killed["plain"], read_checkpoint(whole.checkpoint)
    assert all(torch.equal(value, final["model_state"][key]) for key, value in plain["model_state"].items())
    assert plain["history"] == [{**row, "epoch_time_s": mine["epoch_time_s"], "images_per_s": mine["images_per_s"]}
                                for row, mine in zip(final["history"], plain["history"], strict=True)]
    assert plain["snapshots"] == [] and not (whole.run_dir.parent / "plain" / "snapshots").exists()


def test_the_snapshot_at_step_0_is_the_untrained_model_of_the_seed(runs):
    whole, _, _ = runs
    loaded = localitylab.load(whole.run_dir, step=0)
    torch.manual_seed(RECIPE["seed"])
    untrained = build_model(ModelSpec.from_dict(read_checkpoint(whole.checkpoint)["model_spec"]))
    mine, built = loaded.state_dict(), untrained.state_dict()
    assert mine.keys() == built.keys() and all(torch.equal(mine[key], built[key]) for key in mine)
    assert (loaded.run.step, loaded.run.epoch, loaded.run.spec.name) == (0, 0.0, "resnet-n")
    assert not loaded.training


def test_the_last_snapshot_is_the_final_checkpoint_and_load_finds_by_epoch(runs):
    whole, _, _ = runs
    final = read_checkpoint(whole.checkpoint)["model_state"]
    by_epoch = localitylab.load(whole.run_dir, epoch=3)
    assert by_epoch.run.step == 66 and by_epoch.run.metrics["test_acc"] == whole.history[-1]["test_acc"]
    assert all(torch.equal(value, final[key]) for key, value in by_epoch.state_dict().items())
    assert math.isclose(localitylab.load(whole.checkpoint, epoch=33 / 22).run.epoch, 1.5)


def test_a_moment_the_run_did_not_keep_is_an_error_listing_the_kept_ones(runs, tmp_path):
    whole, _, _ = runs
    with pytest.raises(UserError, match=r"no snapshot at step 5; it has: step 0 \(epoch 0\), step 1 .*step 66 \(epoch 3\)"):
        localitylab.load(whole.run_dir, step=5)
    with pytest.raises(UserError, match="no snapshot at epoch 2"):
        localitylab.load(whole.run_dir, epoch=2)
    with pytest.raises(UserError, match="not both"):
        localitylab.load(whole.run_dir, step=0, epoch=0)


# --- what a plan counts ----------------------------------------------------------------------------
STUDY = """
[study]
name = "snap"
dataset = "digits"

[recipe]
epochs = 10
batch_size = 32
snapshots = "every:5"

[[models]]
model = "resnet-n"

[[models]]
model = "vit-n/2"
snapshots = [0, 1, 2, 4]
"""


def test_study_show_counts_each_runs_snapshots_and_their_weights_in_its_estimate(tmp_path):
    from localitylab.models.registry import build_model
    from localitylab.studies.runner import describe_plan
    from localitylab.studies.spec import load_study
    from localitylab.train.snapshots import WRITE_BYTES_PER_S, planned_snapshots

    spec = tmp_path / "snap.toml"
    spec.write_text(STUDY)
    rows = {row["model"]: row for row in describe_plan(load_study(spec), tmp_path / "out")["runs"]}
    assert (rows["resnet-n"]["snapshots"], rows["vit-n/2"]["snapshots"]) == (3, 4)  # epochs 0, 5, 10; 0, 1, 2, 4
    config = TrainConfig("vit-n/2", "digits", epochs=10, batch_size=32, snapshots="0,1,2,4")
    parameters = sum(p.numel() for p in build_model(ModelSpec("vit-n/2", 8, 1, 10)).parameters())
    assert planned_snapshots(config, 1437, parameters) == (4, 4 * 4 * parameters / WRITE_BYTES_PER_S)
