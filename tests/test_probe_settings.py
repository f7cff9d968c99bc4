"""Probe settings are declared once (localitylab/probes/settings.py and each probe's `Options`):
a new option is one field in its probe and appears as a CLI flag, a study key and a keyword of
`localitylab.probe`; the per-probe image counts take effect; errors name the setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from pydantic import field_validator

import localitylab
from localitylab.errors import UserError
from localitylab.probes import Measurements, Probe, ProbeInputs, ProbeRequest, run_probes
from localitylab.probes.registry import _PROBES, register_probe
from localitylab.probes.settings import ProbeSettings, option
from localitylab.settings import Settings
from tests.cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


class ReachOptions(Settings):
    reach: int = option(3, "reach-test: how far it reaches.")  # the ONE place the new option is declared

    @field_validator("reach")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"reach must be at least 1, got {value}")
        return value


class ReachProbe(Probe):
    """Reports its option and how many images and which batches it was given."""

    name = "reach-test"
    Options = ReachOptions
    default_images = 5

    def measure(self, inputs: ProbeInputs, out: Measurements) -> None:
        out.single("reach", inputs.options.reach, n_images=inputs.n_images)
        out.single("batches", len(list(inputs.batches())), n_images=inputs.n_images)


@pytest.fixture()
def reach_probe():
    register_probe(ReachProbe)
    try:
        yield _PROBES[ReachProbe.name]
    finally:
        _PROBES.pop(ReachProbe.name, None)
        from localitylab.probes.api import describe_keywords

        describe_keywords()


def _value(table, metric: str) -> float:
    return float(table.loc[table["metric"] == metric, "value"].iloc[0])


def test_a_new_option_is_a_flag_a_study_key_and_a_keyword(reach_probe, tmp_path):
    # A CLI flag, with the field's help; its value reaches the probe; a bad one is said as the flag.
    help_text = run_cli(["probe", "--help"]).out
    assert "--reach" in help_text and "how far it reaches" in help_text
    result = run_cli(["probe", "reach-test", "resnet-n", "--reach", "7", "--device", "cpu", "--out", tmp_path / "cli"])
    assert result.status == 0, result.err
    from localitylab.probes import read_table

    table = read_table(tmp_path / "cli" / "reach-test.csv")
    assert _value(table, "reach") == 7 and table["n_images"].iloc[0] == 5  # the probe's own default count
    bad = run_cli(["probe", "reach-test", "resnet-n", "--reach", "0", "--out", tmp_path / "bad"])
    assert bad.status == 2 and bad.err_lines == ["localitylab: error: --reach must be at least 1, got 0"]
    assert not (tmp_path / "bad").exists()

    # A study key of [probes], checked by the same field.
    from localitylab.studies import load_study

    text = '[study]\nname = "reach"\ndataset = "digits"\n\n[[models]]\nmodel = "resnet-n"\n\n[probes]\nrun = ["reach-test"]\n'
    spec = tmp_path / "reach.toml"
    spec.write_text(text + "reach = 4\n")
    assert load_study(spec).probe_options == {"reach": 4}
    spec.write_text(text + "reach = 0\n")
    with pytest.raises(UserError, match=re.escape("line 10: [probes] reach must be at least 1, got 0")):
        load_study(spec)

    # A keyword of localitylab.probe, and the error names the setting.
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1))
    images = torch.rand(6, 1, 8, 8)
    import inspect

    assert "reach" in inspect.signature(localitylab.probe).parameters  # listed for help() and editors
    assert _value(localitylab.probe("reach-test", model, images, reach=9), "reach") == 9
    assert _value(localitylab.probe("reach-test", model, images), "reach") == 3
    with pytest.raises(UserError) as caught:
        localitylab.probe("reach-test", model, images, reach=0)
    assert str(caught.value) == "reach must be at least 1, got 0" and caught.value.settings == ("reach",)


def test_image_counts_default_per_probe_and_batches_come_from_the_settings(reach_probe, tmp_path):
    request = ProbeRequest("resnet-n", device="cpu", out=tmp_path / "a")
    (output,) = run_probes(["reach-test"], request)
    assert output.table["n_images"].iloc[0] == 5  # ReachProbe.default_images, not a global default
    ReachProbe.default_images, ReachProbe.max_default_images = None, 11  # the whole split, up to a maximum
    try:
        (output,) = run_probes(["reach-test"], ProbeRequest("resnet-n", device="cpu", out=tmp_path / "b"))
    finally:
        ReachProbe.default_images, ReachProbe.max_default_images = 5, Probe.max_default_images
    assert output.table["n_images"].iloc[0] == 11
    (output,) = run_probes(["reach-test"], ProbeRequest("resnet-n", device="cpu", n_images=7, batch_size=3,
                                                        out=tmp_path / "c"))
    assert output.table["n_images"].iloc[0] == 7 and _value(output.table, "batches") == 3  # ceil(7 / 3)
    assert ProbeSettings().batch_size == ProbeInputs.batch_size  # one default, read in both places


@pytest.mark.parametrize("values, setting, message", [
    ({"batch_size": 0}, "batch_size", "batch_size must be at least 1, got 0"),
    ({"n_images": 0}, "n_images", "n_images must be at least 1, got 0"),
    ({"n_images": "many"}, "n_images", "n_images must be a whole number >= 1, got 'many'"),
    ({"timesteps": "soon"}, "timesteps", "timesteps must be integers separated by commas"),
    ({"draws": 0}, "draws", "draws must be a whole number >= 1, got 0"),
])
def test_errors_name_the_setting_not_a_flag(values, setting, message):
    with pytest.raises(UserError) as caught:
        run_probes(["permutation"], ProbeRequest("resnet-n", options={k: v for k, v in values.items()
                                                                      if k not in ProbeSettings.model_fields},
                                                 **{k: v for k, v in values.items() if k in ProbeSettings.model_fields}))
    assert str(caught.value).startswith(message) and setting in caught.value.settings


def test_no_flag_is_named_inside_the_probes():
    for path in sorted((ROOT / "localitylab" / "probes").glob("*.py")):
        text = path.read_text()
        assert not re.search(r"--[a-z]", text), f"{path.name} names a command-line flag"
        assert len(text.splitlines()) <= 250, f"{path.name} is over 250 lines"
