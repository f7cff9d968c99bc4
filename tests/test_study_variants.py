"""Every shipped study runs end to end at its small scale (one seed, one epoch, a few images).
Kept apart from tests/test_studies.py so that make test's two workers share the study tests."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from localitylab.studies import load_study, make_plan, run_study
from tests.test_studies import SHRINK, small_variants


@pytest.fixture(scope="module")
def trained_pieces() -> dict[str, Path]:
    """Run folders the small variants trained, by the settings that define the run. Studies
    share runs (pit-n on digits for one epoch is in five of them): each is trained once, and
    a later study starts with a copy, which its runner skips as done."""
    return {}


def _defined_by(config) -> str:
    # snapshots do not define a run, but a copy must carry the ones its study probes over training
    return json.dumps({**config.defining(), "snapshots": config.snapshots}, sort_keys=True, default=str)


@pytest.mark.parametrize("path, scale", list(small_variants()), ids=lambda v: getattr(v, "name", str(v)))
def test_small_variant_runs_end_to_end(tmp_path, path, scale, trained_pieces):
    # The suite's budget: one training seed (the shipped laptop scales train 3), one epoch.
    study = dataclasses.replace(load_study(path, scale), seeds=load_study(path, scale).seeds[:1])
    study.scale_recipe = {**study.scale_recipe, **SHRINK}
    if path.name == "pixel_swaps.toml":  # the sweep of T for resnet-n, the cheapest; the others at T = 0 and full
        study.models = [m for m in study.models if m.model == "resnet-n" or m.label.endswith(("-T0", "-full"))]
    study.probe_images = 8
    # the shrunk suite runs one probe per run; the demo, which `make demo` runs in full, runs them all
    if path.name != "demo.toml":
        study.probes = study.probes[:1] if study.probes != ["all"] else ["permutation"]
    if study.samples:  # a diffusion study: one seed, and a few samples in two steps, say the stage runs
        study.seeds = study.seeds[:1]
        study.samples = {**study.samples, "n": 20, "steps": 2}
    plan = make_plan(study, tmp_path)
    for piece in plan.train:
        trained = trained_pieces.get(_defined_by(piece.config(study)))
        if trained is not None:
            piece.run_dir.mkdir(parents=True)
            for name in ("ckpt.pt", "metrics.csv", "run.json"):
                shutil.copy2(trained / name, piece.run_dir / name)
            if (trained / "snapshots").is_dir():
                shutil.copytree(trained / "snapshots", piece.run_dir / "snapshots")
    result = run_study(study, tmp_path, log=lambda line: None, formats=("html",))
    assert not result.failed, result.failed
    for piece in plan.train:
        trained_pieces.setdefault(_defined_by(piece.config(study)), piece.run_dir)
    for piece in plan.probe:
        tables = list((piece.run_dir / "probes").glob("*.csv"))
        assert tables, piece.run_dir
    for piece in plan.sample:
        assert (piece.run_dir / "samples" / "samples.npz").is_file() and (piece.run_dir / "samples" / "sample-quality.csv").is_file()
    page = result.report["html"].read_text()
    if plan.sample:
        assert page.count(">fd_resnet-n<") >= len(plan.sample)  # the generation section, filled
    for piece in plan.train:
        assert piece.run_dir.name in page
    if study.expect:
        assert "Published versus ours" in page
