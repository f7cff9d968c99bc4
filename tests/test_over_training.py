"""`probe NAME RUN --over-training`: the same probe on every snapshot of a run, on the same
images; the long table, its step-0 rows against the untrained model, and the cache."""

from __future__ import annotations

import pandas as pd
import pytest

import localitylab
from localitylab.errors import UserError
from localitylab.probes import ProbeRequest, run_probes
from localitylab.train import TrainConfig, train
from localitylab.train.snapshots import read_index

IMAGES = 12


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """vit-n/2 on digits, 2 epochs of 23 steps, 4 log-spaced snapshots (steps 0, 3, 12, 46)."""
    out = tmp_path_factory.mktemp("over-training") / "vit"
    return train(TrainConfig("vit-n/2", "digits", out=out, epochs=2, batch_size=64, warmup_epochs=1, device="cpu",
                             seed=0, snapshots=4)).run_dir


def _over(run_dir, name="attention-distance", **extra):
    return run_probes([name], ProbeRequest(str(run_dir), n_images=IMAGES, over_training=True, **extra))[0]


def test_every_snapshot_gives_the_single_model_rows_with_its_step_and_epoch(run):
    entries = read_index(run)
    assert len(entries) == 4
    output = _over(run)
    single = run_probes(["attention-distance"], ProbeRequest(str(run), n_images=IMAGES, out=run / "single"))[0].table
    table = output.table
    assert len(table) == 4 * len(single)
    assert sorted(table["step"].unique()) == [e["step"] for e in entries]
    assert sorted(table["epoch"].unique()) == pytest.approx([e["epoch"] for e in entries])
    # the last snapshot is the final model: its rows are the single-model table
    last = table[table["step"] == entries[-1]["step"]].drop(columns=["step", "epoch"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(last, single, check_exact=False, rtol=1e-9)
    assert (run / "probes" / "over-training" / "attention-distance.csv").is_file()
    assert "step" not in single.columns  # a single model's table keeps its schema


def test_step_0_rows_equal_probing_the_untrained_model_built_with_the_same_seed(run, tmp_path):
    table = _over(run).table
    built = localitylab.load(run).run.spec.model_kw  # as training built it (digits: pos_embed_std 1)
    untrained = run_probes(["attention-distance"], ProbeRequest("vit-n/2", data="digits", n_images=IMAGES, seed=0,
                                                                model_kw=dict(built), out=tmp_path))[0].table
    first = table[table["step"] == 0].drop(columns=["step", "epoch", "model"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(first, untrained.drop(columns=["model"]), check_exact=False, rtol=1e-9)
    ratio = first[(first["metric"] == "locality_ratio") & first["head"].isna()]["value"]
    assert ratio.between(0.9, 1.1).all()  # untrained attention is near uniform


def test_a_second_call_probes_nothing_new_and_other_settings_probe_again(run):
    first = _over(run, name="pe-similarity")
    again = _over(run, name="pe-similarity")
    assert again.probed == 0
    pd.testing.assert_frame_equal(first.table, again.table)
    other = run_probes(["pe-similarity"], ProbeRequest(str(run), n_images=IMAGES, seed=1, over_training=True))[0]
    assert other.probed == 4
    assert localitylab.probe_over_training("pe-similarity", run, n_images=IMAGES, seed=1).equals(other.table)


def test_a_run_without_snapshots_or_a_model_name_is_one_user_error(trained_runs, tmp_path):
    for source in (str(trained_runs["resnet-n"].run_dir), "vit-n/2"):
        with pytest.raises(UserError, match="snapshots|not a run folder") as raised:
            run_probes(["attention-distance"], ProbeRequest(source, n_images=4, over_training=True, out=tmp_path))
        assert "over_training" in raised.value.settings


def test_the_report_draws_the_section_over_runs_with_snapshots_and_not_over_runs_without(run, trained_runs, tmp_path):
    import shutil

    from localitylab.report import build_report

    _over(run)
    _over(run, name="pe-similarity")
    copies = [shutil.copytree(run, tmp_path / name, ignore=shutil.ignore_patterns("single")) for name in ("a", "b")]
    html = build_report(copies, tmp_path / "with", formats=("html",))["html"].read_text()
    assert '<section id="over-training"' in html
    assert "vit-n/2 (a), block 0: locality ratio" in html and "vit-n/2 (b), block 3: locality ratio" in html
    assert "vit-n/2 (a): the position table" in html
    plain = shutil.copytree(trained_runs["resnet-n"].run_dir, tmp_path / "plain")
    html = build_report([plain], tmp_path / "without", formats=("html",))["html"].read_text()
    assert 'id="over-training"' not in html and "Locality over training" not in html


def _e(value, half=0.01):
    from localitylab.report.summary import Estimate

    return Estimate(value, value - half, value + half)


def test_the_reading_names_the_first_epoch_the_ratio_stays_below_1_or_says_it_never_does():
    from localitylab.report.over_training import emergence, ordered

    # below by 0.05 at epoch 2, back up at 4, below for good from epoch 7
    points = [(0, _e(1.0)), (2, _e(0.93)), (4, _e(0.99)), (7, _e(0.94)), (10, _e(0.90))]
    assert "below 1 by at least 0.05 from epoch 7 on (0.940 [0.930, 0.950] there)" in emergence(points, 0.05)
    # interval below 1 from epoch 4, but never by the effect worth a word
    small = [(0, _e(1.0)), (2, _e(1.0)), (4, _e(0.98)), (7, _e(0.97))]
    assert "interval below 1 from epoch 4 on" in emergence(small, 0.05)
    assert "never by the 0.05 worth a word" in emergence(small, 0.05)
    assert emergence([(0, _e(1.0)), (5, _e(0.995))], 0.05).endswith("never below 1 for good")
    assert "became spatially ordered" in ordered([(0, _e(0.0)), (5, _e(0.3))], [])
    assert "did not become spatially ordered" in ordered([(0, _e(0.0)), (5, _e(0.005))], [])
    assert "describe its initialisation" in ordered([(0, _e(0.0)), (5, _e(0.3))], [(5, _e(0.05, 0))])
    # Not ordered by distance, but position reads out linearly: the reading says both.
    flat = [(0, _e(0.0)), (5, _e(0.04, 0.1))]
    reading = ordered(flat, [], [(0, _e(-0.07)), (5, _e(0.38, 0.2))])
    assert "did not become spatially ordered" in reading and "yet position can be read from it" in reading
    assert "yet" not in ordered(flat, [], [(0, _e(-0.07)), (5, _e(0.05, 0.2))])  # inside the 0.10 worth a word
    assert "yet" not in ordered([(0, _e(0.0)), (5, _e(0.3))], [], [(5, _e(0.38, 0.2))])  # already ordered


def test_a_study_with_over_training_writes_both_tables_and_then_counts_the_piece_done(run, tmp_path):
    import shutil
    from types import SimpleNamespace

    from localitylab.studies.pieces import probe_done, run_probe

    copy = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("probes", "single"))
    piece = SimpleNamespace(pretrained=None, run_dir=copy, images=8, batch_size=None, seed=0,
                            options={"over_training": True}, probes=["pe-similarity"])
    assert not probe_done(piece)
    run_probe(piece, 1)
    assert (copy / "probes" / "pe-similarity.csv").is_file()
    assert (copy / "probes" / "over-training" / "pe-similarity.csv").is_file()
    assert probe_done(piece)
