"""Studies: shipped files validate (tests/test_study_variants.py runs them at their small scale); a killed study
re-run ends with the same tables without redoing finished pieces; bad files name the key."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pandas as pd
import pytest

from localitylab.errors import UserError
from localitylab.studies import load_study, make_plan, run_study
from tests.cli_helpers import ROOT, run_command, start_command

STUDY_FILES = sorted((ROOT / "studies").glob("*.toml"))
# The suite's budget: one epoch, a few images, HTML only. The shipped files keep their settings.
SHRINK = {"epochs": 1, "batch_size": 64, "warmup_epochs": 0}


def small_variants():
    for path in STUDY_FILES:
        study = load_study(path)
        if all(entry.pretrained for entry in study.models):
            continue  # hub weights need the network: tests/test_pretrained.py runs its pipeline offline
        yield path, study.scales[0] if study.scales else None


def test_every_shipped_study_validates_at_every_scale():
    assert {p.name for p in STUDY_FILES} >= {"demo.toml", "pit_vs_vit_cifar100.toml", "patch_size_scaling.toml",
                                            "pe_ablation.toml", "permutation_gap.toml", "locality_need.toml",
                                            "pixel_swaps.toml"}
    for path in STUDY_FILES:
        study = load_study(path)
        for scale in study.scales:
            small = load_study(path, scale)
            assert all(m.model.endswith(("-n", "-n/1", "-n/2", "-n/4", "-n/8")) for m in small.models), (path, scale)
            assert len(small.seeds) >= 3, f"{path.name} --scale {scale}: a laptop-scale variant trains 3 seeds or more"
        if not study.scales and not all(m.pretrained for m in study.models):  # laptop-sized as it stands (the demo)
            assert len(study.seeds) >= 3, f"{path.name}: a laptop-scale study trains 3 seeds or more"
        if study.dataset.startswith("cifar"):
            assert study.scales and study.gpu_hours, f"{path.name}: a CIFAR study needs a scale and its GPU-hours"
            assert study.expect, f"{path.name}: a CIFAR study states the published numbers"


def test_a_scale_has_its_own_seeds_and_a_model_its_own_permutation():
    """[scale.NAME] seeds replace [study] seeds at that scale only; without [study]
    permute_pixels, each [[models]] entry trains on its own permutation (a sweep of T)."""
    gap = ROOT / "studies" / "permutation_gap.toml"
    assert load_study(gap).seeds == [0]
    laptop = load_study(gap, "laptop")
    assert laptop.seeds == [0, 1, 2]
    plan = make_plan(laptop, Path("out"))
    assert len(plan.train) == 3 * 2 * 3  # models x (natural, permuted) x seeds
    assert {p.run_dir.name for p in plan.train if p.entry.model == "pit-n"} == {
        f"pit-n-s{seed}{variant}" for seed in (0, 1, 2) for variant in ("", "-perm0")}

    swaps = load_study(ROOT / "studies" / "pixel_swaps.toml")
    by_label = {p.run_dir.name: p.config(swaps) for p in make_plan(swaps, Path("out")).train}
    assert len(by_label) == 3 * 5 * 3
    assert by_label["vit-n-p2-T0-s1"].pixel_permutation_setting() is None
    assert by_label["vit-n-p2-T64-s1"].pixel_permutation_setting() == "swaps-64-2"
    assert by_label["vit-n-p2-T64-s1"].permute_pixels == 0 and by_label["vit-n-p2-T64-s1"].seed == 1
    assert by_label["resnet-n-full-s2"].pixel_permutation_setting() == "global"


def test_a_scales_substitute_carries_its_own_settings(tmp_path):
    """[scale.NAME.models] "full" = {model = "small", ...}: the substitute's settings win over
    the scale's recipe, its model_kw adds to the entry's, and the full scale keeps neither."""
    spec = ROOT / "studies" / "pe_ablation.toml"
    full, laptop = load_study(spec), load_study(spec, "laptop")
    settings = {p.run_dir.name: p.config(laptop) for p in make_plan(laptop, Path("out")).train}
    assert {c.model for c in settings.values()} == {"pit-n"} and len(settings) == 3 * 3
    assert all(c.epochs == 10 for c in settings.values())
    # The shared start of learned tables reaches the learned entries only: for sin-cos and
    # none it would mean nothing, and is dropped rather than refused.
    assert all(c.model_kw == ({"pos_embed_std": 1.0} if c.pos_embed == "learn" else {}) for c in settings.values())
    assert {c.pos_embed for c in settings.values()} == {"learn", "sincos", "none"}
    assert settings["pit-t-none-s2"].pos_embed == "none"  # the entry's own setting stays
    assert all(p.config(full).model_kw == {} for p in make_plan(full, Path("out")).train)

    text = TINY.replace('model = "vit-n/2"', 'model = "vit-n/2"\nmodel_kw = { depth = 1 }') + """
[scale.small]
recipe = { epochs = 1, lr = 1e-3 }

[scale.small.models]
"vit-n/2" = { model = "vit-n/4", model_kw = { num_heads = 1 }, lr = 5e-3 }
"""
    path = tmp_path / "scaled.toml"
    path.write_text(text)
    small = load_study(path, "small")
    config = {p.entry.model: p.config(small) for p in make_plan(small, Path("out")).train if p.config(small).permute_pixels is None}
    assert config["vit-n/4"].model_kw == {"depth": 1, "num_heads": 1} and config["vit-n/4"].lr == 5e-3
    assert config["resnet-n"].lr == 1e-3 and config["resnet-n"].epochs == config["vit-n/4"].epochs == 1
    path.write_text(text.replace("lr = 5e-3", "learning_rate = 5e-3"))
    with pytest.raises(UserError, match=r"unknown key 'learning_rate' in \[scale.small\] models.vit-n/2"):
        load_study(path, "small")


TINY = """
[study]
name = "tiny"
dataset = "digits"
permute_pixels = 3

[recipe]
epochs = 2
batch_size = 128
warmup_epochs = 0

[[models]]
model = "resnet-n"

[[models]]
model = "vit-n/2"

[probes]
run = ["permutation"]
images = 16
"""


def _run(args):
    return start_command(*args)


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    return {f"{p.parent.parent.name}/{p.name}": pd.read_csv(p) for p in sorted(out.glob("runs/*/probes/*.csv"))}


def test_killed_study_resumes_to_the_same_tables_without_redoing_pieces(tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY)
    whole = tmp_path / "whole"
    done = _run(["study", "run", str(spec), "--out", str(whole)])
    assert done.wait(timeout=400) == 0, done.stderr.read()

    cut = tmp_path / "cut"
    runner = _run(["study", "run", str(spec), "--out", str(cut)])
    first = cut / "runs" / "resnet-n" / "run.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (first.is_file() and '"epochs_done": 2' in first.read_text()):
        time.sleep(0.2)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    assert first.is_file()
    finished_mtime = (cut / "runs" / "resnet-n" / "ckpt.pt").stat().st_mtime_ns

    again = _run(["study", "run", str(spec), "--out", str(cut), "--resume"])
    assert again.wait(timeout=400) == 0
    log = again.stderr.read()
    assert "skip   train resnet-n (done)" in log and "[1/8" in log
    assert (cut / "runs" / "resnet-n" / "ckpt.pt").stat().st_mtime_ns == finished_mtime
    a, b = _tables(whole), _tables(cut)
    assert sorted(a) == sorted(b) and len(a) == 4
    for key in a:
        pd.testing.assert_frame_equal(a[key], b[key])
    assert (cut / "report" / "report.html").is_file()


@pytest.mark.parametrize(
    "text, message",
    [
        (TINY.replace("epochs = 2", "epoch = 2"), "line 8: unknown key 'epoch' in [recipe]"),
        (TINY.replace('model = "vit-n/2"', 'model = "vit-x/2"'), "unknown model"),
        (TINY.replace('dataset = "digits"', 'dataset = "places365"'), "line 4: unknown data set"),
        (TINY.replace('run = ["permutation"]', 'run = ["nope"]'), "unknown probe 'nope'"),
        (TINY.replace("epochs = 2", 'epochs = "two"'), "epochs = 'two' has the wrong type"),
        (TINY.replace("[study]", "[studdy]"), "unknown key 'studdy'"),
        ("[study\nname=1", "not valid TOML"),
        (TINY.replace('model = "vit-n/2"', 'model = "vit-n/2"\ninit_from = "pit-n"'),
         "init_from must be the label of an earlier model in this study (one of: resnet-n), got 'pit-n'"),
    ],
)
def test_bad_study_files_name_the_key(tmp_path, text, message):
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    with pytest.raises(UserError, match=__import__("re").escape(message)):
        load_study(spec)
    result = run_command("study", "show", spec)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_study_show_prints_the_plan_with_flops(tmp_path):
    result = run_command("study", "show", ROOT / "studies" / "pit_vs_vit_cifar100.toml")
    assert result.returncode == 0, result.stderr
    assert "pit-t" in result.stdout and "GFLOPs" in result.stdout and "GPU-hours" in result.stdout


def test_a_failed_piece_is_reported_and_the_rest_goes_on(tmp_path):
    spec = tmp_path / "broken.toml"
    spec.write_text(TINY.replace('model = "vit-n/2"', 'model = "vit-n/2"\nmodel_kw = { no_such_arg = 1 }')
                    .replace("permute_pixels = 3\n", ""))
    study = load_study(spec)
    ticks = []
    first = run_study(study, tmp_path / "out", log=lambda line: None, formats=("html",),
                      progress=lambda finished, total, running: ticks.append((finished, total, sorted(running))))
    assert set(first.failed) == {"train vit-n-p2"} and "no_such_arg" in first.failed["train vit-n-p2"]
    # The progress bar's feed: every piece seen running, then finished; the count only grows.
    total = ticks[0][1]
    assert [finished for finished, _, _ in ticks] == sorted(finished for finished, _, _ in ticks)
    # All pieces but the failed run's probe, which is never tried, are finished at the end.
    assert ticks[-1][0] == total - 1 and ticks[-1][2] == [] and all(t == total for _, t, _ in ticks)
    assert {"train vit-n-p2", "train resnet-n", "probe resnet-n"} <= {name for *_, running in ticks for name in running}
    assert "train resnet-n" in first.done and "probe resnet-n" in first.done
    assert (tmp_path / "out" / "report" / "report.html").is_file()  # the report covers what did finish
    again = run_study(study, tmp_path / "out", log=lambda line: None, formats=("html",))
    assert "train resnet-n" in again.skipped and "probe resnet-n" in again.skipped
    assert set(again.failed) == {"train vit-n-p2"}  # only the failed piece was tried again


def test_a_fine_tune_waits_for_its_pre_training_and_fails_with_it(tmp_path):
    spec = tmp_path / "mae.toml"
    spec.write_text(TINY.replace("permute_pixels = 3\n", "").replace('model = "resnet-n"', 'model = "vit-n/2"\nlabel = "pre"\ntask = "mae"')
                    .replace('model = "vit-n/2"\n\n', 'model = "vit-n/2"\nlabel = "ft"\ninit_from = "pre"\n\n'))
    study = load_study(spec)
    plan = make_plan(study, tmp_path / "out")
    fine_tune = next(p for p in plan.train if p.entry.label == "ft")
    assert fine_tune.config(study).init_from == str(tmp_path / "out" / "runs" / "pre" / "ckpt.pt")
    study.models[0].recipe["mask_ratio"] = 1.5  # the pre-training piece fails...
    result = run_study(study, tmp_path / "out", log=lambda line: None, formats=("html",))
    assert set(result.failed) == {"train pre", "train ft"}  # ...and the fine-tune is not tried
    assert "its starting point pre failed" in result.failed["train ft"]
