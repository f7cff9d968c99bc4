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
