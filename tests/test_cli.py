"""The command line: quick start-up, commands end to end, one-line errors with status 2."""

from __future__ import annotations

from tests.cli_helpers import run_command as run


def test_help_does_not_import_torch():
    code = "import sys; from cli.main import main; rc = main(['--help']); assert 'torch' not in sys.modules, 'torch'"
    result = run("-c", code, module=None)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "eval" in result.stdout


def test_every_command_help_has_an_example():
    for command in ("train", "eval", "models", "datasets"):
        result = run(command, "--help")
        assert result.returncode == 0 and "Example: localitylab" in result.stdout, command


def test_train_then_eval_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    result = run("train", "resnet-n", "digits", "--epochs", "2", "--warmup-epochs", "0", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout
    assert {"ckpt.pt", "metrics.csv", "run.json"} <= {p.name for p in out.iterdir()}
    evaluated = run("eval", str(out / "ckpt.pt"))
    assert evaluated.returncode == 0 and "accuracy" in evaluated.stdout


def test_models_and_datasets_list_the_registries():
    models = run("models")
    assert models.returncode == 0
    for name in ("pit-t", "vit-t/P", "resnet-18", "pit-n"):
        assert name in models.stdout
    datasets = run("datasets")
    assert datasets.returncode == 0 and "digits" in datasets.stdout and "cifar100" in datasets.stdout


# The catalogue of bad inputs (one line on stderr, status 2, nothing written) runs in-process
# in tests/test_bad_inputs.py; this checks the same contract on a real process.


def test_bad_input_exit_status_of_the_real_process(tmp_path):
    result = run("train", "pit-x", "digits", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        result.stderr.strip()] and "unknown model" in result.stderr
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback():
    result = run("--debug", "train", "pit-x", "digits")
    assert result.returncode != 0 and "Traceback" in result.stderr


# --- the library names settings; the command line says them as flags -------------------------------

def test_library_errors_name_settings_and_the_cli_says_them_as_flags():
    import pytest

    from cli.errors import spoken
    from localitylab.errors import UserError
    from localitylab.settings import parse_key_values
    from localitylab.train.config import TrainConfig

    cases = [(dict(lr=-1.0), "lr must be a positive number, got -1.0", ("lr",)),
             (dict(swaps=4), "swaps says how the permute_pixels permutation is drawn: give its seed with permute_pixels",
              ("swaps", "permute_pixels")),
             (dict(label_dropout=0.2), "label_dropout applies to task diffusion only", ("label_dropout", "task"))]
    for settings, message, named in cases:
        with pytest.raises(UserError) as refused:
            TrainConfig("pit-n", "digits", **settings)
        assert str(refused.value) == message and refused.value.settings == named
        assert "--" not in str(refused.value)
        said = spoken(refused.value)
        assert all(f"--{name.replace('_', '-')}" in said for name in named) and "_" not in said
    with pytest.raises(UserError) as refused:
        parse_key_values(["depth"], "model_kw")
    assert spoken(refused.value) == "--model-kw expects key=value, got 'depth'"


def test_spoken_leaves_the_words_of_a_path_alone():
    from cli.errors import spoken
    from localitylab.errors import UserError

    err = UserError("runs/out/ckpt.pt exists; pass resume to continue that run, or choose another out",
                    settings=("resume", "out"))
    assert spoken(err) == "runs/out/ckpt.pt exists; pass --resume to continue that run, or choose another --out"


def test_the_recorded_command_spells_each_setting_as_the_cli_does():
    """run.json's command (TrainConfig.command) and the CLI's options agree on every flag."""
    from cli.errors import flag_of
    from localitylab.train.config import COMMANDS, TrainConfig, _flag

    offered = {name for command in COMMANDS.values() for name in command.options}
    assert offered and all(_flag(name) == flag_of(name) for name in offered)
    config = TrainConfig("pit-n", "digits", out="runs/x", hflip=False, cache=False, lr=0.01)
    assert config.command().split()[:6] == ["localitylab", "train", "pit-n", "digits", "--out", "runs/x"]
    assert {"--no-hflip", "--no-cache", "--lr"} <= set(config.command().split())


def test_a_cache_that_cannot_be_written_warns_and_the_cli_says_it_in_one_line(tmp_path, monkeypatch, capsys):
    import pytest
    import torch

    from cli.errors import notes
    from localitylab.data import cache

    monkeypatch.setenv("LOCALITYLAB_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    (tmp_path / "a-file").write_text("not a folder")
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    build = lambda: cache.DecodedSplits(images, torch.zeros(2, dtype=torch.long), images, torch.zeros(2, dtype=torch.long), ["a"])  # noqa: E731
    with pytest.warns(cache.CacheNotWritten, match="could not write the image cache"):
        data = cache.cached_decode("test", {"k": 1}, build)
    assert torch.equal(data.train_images, images)  # the run goes on without the cache
    other = []
    shown = notes(lambda *args: other.append(args))
    shown(cache.CacheNotWritten("could not write\nthe image cache"), cache.CacheNotWritten, "f.py", 1)
    shown(UserWarning("timm's"), UserWarning, "f.py", 1)
    assert capsys.readouterr().err == "localitylab: note: could not write the image cache\n" and len(other) == 1


def test_a_stopped_run_is_continued_with_the_command_and_resume():
    from cli.worker import how_to_continue
    from localitylab.errors import RunStopped
    from localitylab.train.config import TrainConfig

    config = TrainConfig("pit-n", "digits", out="runs/x", epochs=3)
    stopped = RunStopped("stopped by SIGINT after step 3 (epoch 1, batch 3 of 10); checkpoint written to runs/x/ckpt.pt. "
                         "The same settings with resume=True continue the run.", 130)
    said = how_to_continue(stopped, config)
    assert str(said) == ("stopped by SIGINT after step 3 (epoch 1, batch 3 of 10); checkpoint written to runs/x/ckpt.pt. "
                         f"Continue with: {config.command()} --resume") and said.exit_code == 130


def test_probe_all_shows_progress_on_a_terminal_and_none_with_quiet(tmp_path, monkeypatch):
    """rich bars (forced as on a terminal) count the probes and each probe's batches; --quiet
    gets none, and the lines on stdout are the same."""
    from tests.cli_helpers import run_cli

    monkeypatch.setenv("LOCALITYLAB_FORCE_TERMINAL", "1")
    args = ["probe", "all", "resnet-n", "--data", "digits", "--images", "2", "--device", "cpu"]
    shown = run_cli([*args, "--out", tmp_path / "a"])
    assert shown.status == 0, shown.err
    assert "probes on resnet-n" in shown.err and "6/6" in shown.err  # every probe counted
    assert "receptive-field (batches)" in shown.err and "\x1b[" in shown.err  # a terminal's bars
    quiet = run_cli([*args, "--out", tmp_path / "b", "--quiet"])
    assert quiet.status == 0, quiet.err
    assert "probes on" not in quiet.err and "\x1b[" not in quiet.err
    assert quiet.out.replace(str(tmp_path / "b"), "") == shown.out.replace(str(tmp_path / "a"), "")
    # The probes that do not apply to a ConvNet say so once, each naming itself (issue 29, point 5).
    refused = [line for line in shown.out.splitlines() if "not apply" in line]
    assert len(refused) == 4 and all(line.count("not apply") == 1 for line in refused), refused
    for line in refused:
        probe = line.split(":")[0]
        assert f"{probe} does not apply" in line, line
