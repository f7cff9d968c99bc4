"""The run folder: the recipe a run used and where each value came from, the lock that keeps
two runs out of one folder, and the TensorBoard log beside metrics.csv."""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import time

import pytest
import torch

from localitylab.errors import UserError
from localitylab.io import LOCK_NAME, folder_lock
from localitylab.train import TrainConfig, train
from localitylab.train.loop import data_options, prepare_data
from tests.cli_helpers import run_cli, start_command


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One short run through the command line: some recipe settings typed, the rest left to
    digits' defaults and the global ones; flips forced on, no cache, logged to TensorBoard."""
    out = tmp_path_factory.mktemp("cli-run") / "run"
    result = run_cli(["train", "resnet-n", "digits", "--epochs", "2", "--lr", "0.002", "--hflip", "--no-cache",
                      "--log", "tensorboard", "--device", "cpu", "--quiet", "--out", out])
    assert result.status == 0, result.err
    return out, result


def test_the_recipe_is_printed_and_recorded_with_its_sources(cli_run):
    out, result = cli_run
    run = json.loads((out / "run.json").read_text())
    recipe = {name: (entry["value"], entry["from"]) for name, entry in run["recipe"].items()}
    assert recipe["epochs"] == (2, "user") and recipe["lr"] == (0.002, "user") and recipe["hflip"] == (True, "user")
    # digits' DataDefaults: batch 32, one warm-up epoch, no crop; the rest the global defaults.
    assert recipe["batch_size"] == (32, "data set") and recipe["warmup_epochs"] == (1.0, "data set")
    assert recipe["crop_padding"] == (0, "data set")
    assert recipe["weight_decay"] == (0.05, "default") and recipe["label_smoothing"] == (0.1, "default")
    assert run["config"]["cache"] is False
    line = next(line for line in result.err_lines if line.startswith("recipe: "))
    assert "epochs 2, lr 0.002, hflip on (given)" in line
    assert "batch_size 32, warmup_epochs 1, crop_padding 0 (defaults of digits)" in line
    # The command run.json records reproduces the run: the recorded values, typed out.
    assert "--batch-size 32" in run["command"] and "--hflip" in run["command"] and "--no-cache" in run["command"]


def test_tensorboard_holds_the_numbers_of_metrics_csv(cli_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = cli_run
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    columns = [c for c in rows[0] if c != "epoch" and rows[0][c] != ""]
    assert set(events.Tags()["scalars"]) >= {f"epoch/{c}" for c in columns} | {"step/train_loss", "step/lr"}
    for column in columns:
        logged = [(e.step, e.value) for e in events.Scalars(f"epoch/{column}")]
        assert [step for step, _ in logged] == [int(r["epoch"]) for r in rows]
        # TensorBoard keeps float32
        assert [value for _, value in logged] == pytest.approx([float(r[column]) for r in rows], rel=1e-6), column
    # Step scalars: the last learning rate logged is the schedule's at that step; steps rise.
    steps = [e.step for e in events.Scalars("step/train_loss")]
    assert steps == sorted(steps) and steps[-1] <= int(rows[-1]["step"])


def test_flip_crop_cache_and_columns_reach_the_data():
    config = TrainConfig("resnet-n", "digits", epochs=1, hflip=True, crop_padding=2, cache=False,
                         image_column="img", label_column="coarse")
    options = data_options(config)
    assert (options.hflip, options.crop_padding, options.cache) == (True, 2, False)
    assert (options.image_column, options.label_column) == ("img", "coarse")
    info = prepare_data(TrainConfig("resnet-n", "digits", epochs=1, hflip=True, crop_padding=2)).info
    assert (info.hflip, info.crop_padding) == (True, 2)
    # Left unset: the data set's default, which differs by data set.
    assert prepare_data(TrainConfig("resnet-n", "digits", epochs=1)).info.hflip is False
    assert prepare_data(TrainConfig("resnet-n", "shapes-8", epochs=1)).info.hflip is True
    assert TrainConfig("resnet-n", "cifar10").batch_size == 128 and TrainConfig("resnet-n", "digits").batch_size == 32


def test_the_position_tables_std_is_one_setting_however_given():
    """digits' recipe starts learned tables at std 1.0, other data sets at timm's 0.02; given as
    --pos-embed-std or as --model-kw pos_embed_std (the studies' way) it is the user's, and the
    model is built with it; given both ways, the two must agree."""
    from localitylab.data import load_dataset
    from localitylab.models.registry import build_model
    from localitylab.train.config import recipe_record
    from localitylab.train.loop import model_spec_for

    info = load_dataset("digits").info
    cases = [(dict(), 1.0, "data set"), (dict(pos_embed_std=0.3), 0.3, "user"),
             (dict(model_kw={"pos_embed_std": 0.3}), 0.3, "user"), (dict(dataset="shapes-8"), 0.02, "default")]
    for settings, std, source in cases:
        config = TrainConfig("vit-n/2", settings.pop("dataset", "digits"), epochs=1, **settings)
        assert recipe_record(config, 0, False)["pos_embed_std"] == {"value": std, "from": source}
        torch.manual_seed(0)
        table = build_model(model_spec_for(config, info)).pos_embed.detach()
        # trunc_normal_ at +-2 std: the sample std is the truncated normal's, 0.88 std
        assert table.std().item() == pytest.approx(0.88 * std, rel=0.1), settings
    assert "pos_embed_std" not in recipe_record(TrainConfig("resnet-n", "digits", epochs=1), 0, False)
    assert "pos_embed_std" not in recipe_record(TrainConfig("vit-n/2", "digits", pos_embed="sincos"), 0, False)
    with pytest.raises(UserError, match="given twice.*give it once"):
        TrainConfig("vit-n/2", "digits", pos_embed_std=0.5, model_kw={"pos_embed_std": 1.0})


def test_resume_keeps_the_values_a_run_was_trained_with_where_the_user_left_them_unset(tmp_path):
    # A run trained with the old global defaults (batch 128, 5 warm-up epochs) resumes without
    # naming them; a value the user does type must still agree.
    train(TrainConfig("resnet-n", "digits", epochs=1, batch_size=128, warmup_epochs=5, out=tmp_path, device="cpu"))
    again = train(TrainConfig("resnet-n", "digits", epochs=1, out=tmp_path, resume=True, device="cpu"))
    assert len(again.history) == 1
    with pytest.raises(UserError, match="batch_size was 128, now 64"):
        train(TrainConfig("resnet-n", "digits", epochs=1, batch_size=64, out=tmp_path, resume=True, device="cpu"))


def test_a_held_folder_refuses_a_second_holder_and_is_left_as_found(tmp_path):
    folder = tmp_path / "new" / "run"
    with folder_lock(folder, "first"):
        with pytest.raises(UserError, match=rf"in use by pid {os.getpid()} on .* \(first\)"):
            with folder_lock(folder, "second"):
                pass
    # Created for the lock and nothing written: nothing is left.
    assert not (tmp_path / "new").exists()
    folder.mkdir(parents=True)
    with folder_lock(folder, "third"):
        (folder / "kept").write_text("x")
    assert sorted(p.name for p in folder.iterdir()) == ["kept"]


def test_wandb_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it fails, as where it is not installed
    result = run_cli(["train", "resnet-n", "digits", "--log", "wandb", "--out", tmp_path / "out"])
    assert result.status == 2 and result.err_lines == [
        "localitylab: error: --log wandb needs the wandb package (pip install wandb); it is not installed here"]
    assert not (tmp_path / "out").exists()


def _holder(lock_file):
    try:
        return json.loads(lock_file.read_text())
    except (OSError, ValueError):
        return None


def test_two_runs_on_one_folder_one_refused_and_a_killed_holder_blocks_nothing(tmp_path):
    out = tmp_path / "run"
    command = ["train", "resnet-n", "digits", "--device", "cpu", "--quiet", "--out", out]
    env = {"OMP_NUM_THREADS": "1"}
    first = start_command(*command, "--epochs", "100", env=env)  # long enough to be running throughout
    try:
        deadline = time.monotonic() + 120
        while (_holder(out / LOCK_NAME) or {}).get("pid") != first.pid:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        started = time.monotonic()
        second = run_cli([*command, "--epochs", "100"])  # in this process: the holder is the other one
        refused_after = time.monotonic() - started
        assert first.poll() is None, "the first run ended before the second was refused; make it longer"
        assert second.status == 2 and len(second.err_lines) == 1, second.err
        assert f"{out} is in use by pid {first.pid}" in second.err and "localitylab train resnet-n" in second.err
        assert refused_after < 5, refused_after  # at once: before any data or model
        print(f"second run refused after {refused_after:.2f} s")
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert _holder(out / LOCK_NAME)["pid"] == first.pid  # the dead holder's file is still there
    for name in ("ckpt.pt", "metrics.csv", "run.json"):  # a short run of its own, not 100 epochs resumed
        (out / name).unlink(missing_ok=True)
    third = train(TrainConfig("resnet-n", "digits", epochs=1, device="cpu", out=out))
    assert third.final["epoch"] == 1 and json.loads((out / "run.json").read_text())["epochs_done"] == 1
    assert not (out / LOCK_NAME).exists()
