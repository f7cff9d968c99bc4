"""Sample sets on disk and their quality table, with its reference rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from localitylab.data.registry import load_dataset
from localitylab.errors import UserError
from localitylab.generation.quality import (FLOOR, NOISE, UNTRAINED, ZeroNoise, feature_space, reference_sources,
                                            sample_quality, sample_sources)
from localitylab.generation.samples import GRID_NAME, SampleSet, grid_array, read_samples, write_samples


def test_a_sample_set_round_trips_and_leaves_no_temporary_file(tmp_path):
    images = torch.randint(0, 256, (23, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(23) % 10
    meta = {"model": "dit-n/1", "sampler": "ddim", "steps": 10, "guidance": 2.0, "seed": 3}
    write_samples(tmp_path, SampleSet(images, labels, meta))
    back = read_samples(tmp_path)
    assert torch.equal(back.images, images) and torch.equal(back.labels, labels) and back.meta == meta
    assert back.setting == "ddim, 10 steps, guidance 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz", GRID_NAME]


def test_the_grid_has_one_row_per_class_of_enlarged_tiles():
    images = torch.zeros(30, 1, 8, 8, dtype=torch.uint8)
    labels = torch.arange(30) % 3
    images[labels == 1] = 200
    grid = grid_array(images, labels, per_class=10)
    tile, pad = 32, 2  # 8 px enlarged 4x
    assert grid.shape == (3 * (tile + pad) + pad, 10 * (tile + pad) + pad, 3)
    row_1 = grid[pad + (tile + pad): pad + (tile + pad) + tile, pad:pad + tile]
    assert (row_1 == 200).all() and (grid[pad:pad + tile, pad:pad + tile] == 0).all()


def test_a_file_that_is_not_a_sample_set_is_a_user_error(tmp_path):
    (tmp_path / "samples.npz").write_bytes(b"not numpy")
    with pytest.raises(UserError, match="not a localitylab sample set"):
        read_samples(tmp_path)
    with pytest.raises(UserError, match="no sample set"):
        read_samples(tmp_path / "elsewhere")


def test_samples_are_also_measured_at_the_floors_count():
    samples = SampleSet(torch.zeros(50, 1, 8, 8, dtype=torch.uint8), torch.arange(50) % 10,
                        {"model": "m", "sampler": "ddim", "steps": 5, "guidance": 1.0})
    whole, first = sample_sources(samples, floor_count=20)
    assert len(whole.images) == 50 and len(first.images) == 20 and first.setting == "ddim, 5 steps, guidance 1, first 20"
    assert torch.bincount(first.labels).tolist() == [2] * 10
    assert len(sample_sources(samples, floor_count=50)) == 1


@pytest.fixture(scope="module")
def digits_space(trained_runs):
    from localitylab.probes.sources import load_target

    target, dataset = load_target(str(trained_runs["resnet-n"].run_dir), device="cpu")
    return feature_space(target), dataset


def test_the_reference_rows_bracket_the_scale(digits_space):
    """Real held-out digits sit near the train split; noise and an untrained DiT far from it."""
    space, dataset = digits_space
    n = 200
    labels = torch.arange(n) % 10
    untrained_like = SampleSet(torch.zeros(n, 1, 8, 8, dtype=torch.uint8), labels,
                               {"model": "blank", "sampler": "ddim", "steps": 10, "guidance": 1.0, "seed": 0})
    table = sample_quality(space, dataset.train_images,
                           [*sample_sources(untrained_like), *reference_sources(dataset, untrained_like)])
    value = table.set_index(["model", "metric"])["value"]
    fd, accuracy = "fd_resnet-n", "class_accuracy_resnet-n"
    assert value[FLOOR, fd] < 0.05 * min(value[NOISE, fd], value[UNTRAINED, fd])
    assert value[FLOOR, accuracy] > 0.9 and value[NOISE, accuracy] < 0.3
    assert value[FLOOR, "precision_resnet-n"] > 0.5 and value[NOISE, "precision_resnet-n"] < 0.1
    assert set(table["n_images"]) == {n, len(dataset.test_images)}


def test_the_untrained_reference_is_what_an_untrained_dit_samples():
    from localitylab.diffusion.objective import Schedule
    from localitylab.diffusion.sampling import generate
    from localitylab.models import ModelSpec, build_model

    dataset = load_dataset("digits")
    labels = torch.arange(12) % 10
    samples = SampleSet(torch.zeros(12, 1, 8, 8, dtype=torch.uint8), labels,
                        {"sampler": "dpm-solver", "steps": 6, "guidance": 1.0, "seed": 5})
    reference = {s.name: s for s in reference_sources(dataset, samples)}[UNTRAINED]
    dit = build_model(ModelSpec("dit-n/2", 8, 1, 10, "sincos"))
    from_dit = generate(dit, labels, Schedule(), in_chans=1, img_size=8, sampler="dpm-solver", steps=6, seed=5,
                        null_class=dit.null_class)
    assert torch.equal(reference.images, from_dit)
    assert torch.equal(ZeroNoise()(torch.ones(2, 1, 4, 4), None, None), torch.zeros(2, 1, 4, 4))


# --- FID, sFID and IS with Inception weights the user supplies ----------------------------------
@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A state dict of torch-fidelity's Inception-v3 with random weights: the code path of the
    real weights, which are never downloaded in tests."""
    from torch_fidelity import feature_extractor_inceptionv3 as module

    cls = module.FeatureExtractorInceptionV3
    saved_load, saved_url = cls.load_state_dict, module.load_state_dict_from_url
    cls.load_state_dict = lambda self, state, *args, **kwargs: None
    module.load_state_dict_from_url = lambda *args, **kwargs: {}
    try:
        torch.manual_seed(0)
        random_net = cls("random", ["2048"])
    finally:
        cls.load_state_dict, module.load_state_dict_from_url = saved_load, saved_url
    path = tmp_path_factory.mktemp("inception") / "inception.pt"
    torch.save(random_net.state_dict(), path)
    return path


def test_inception_metrics_from_a_weights_file(inception_file):
    """Inception-v3 at 299 x 299 is 6 GFLOPs an image: two images per set keep this short."""
    from localitylab.generation.inception import inception_features, inception_rows, inception_score, load_inception
    from localitylab.generation.quality import Source

    extractor = load_inception(inception_file)
    generator = torch.Generator().manual_seed(0)
    reference = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8, generator=generator)
    other = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8, generator=generator)
    table = inception_rows(extractor, reference, [Source("same", reference, torch.zeros(2)),
                                                  Source("other", other, torch.zeros(2))], batch_size=4)
    value = table.set_index(["model", "metric"])["value"]
    assert value["same", "fid"] == pytest.approx(0.0, abs=1e-6) and value["same", "sfid"] == pytest.approx(0.0, abs=1e-6)
    assert value["other", "fid"] > 0 and value["other", "sfid"] > 0 and value["other", "inception_score"] >= 1.0
    features = inception_features(extractor, reference[:1])
    assert features["spatial"].shape == (1, 7 * 17 * 17) and features["pool"].shape == (1, 2048)
    assert features["logits"].shape == (1, 1008)
    # The score: exp E KL(p(y|x) || p(y)); one prediction for every image carries no information.
    same_logits = torch.randn(1, 1008).expand(20, -1)
    assert inception_score(same_logits)[0] == pytest.approx(1.0)
    # Two equally likely, certain and different predictions: KL = log 2, so the score is 2.
    certain = torch.full((20, 1008), -30.0)  # probabilities e^-30: zero to 1e-12, yet no 0 * log 0
    certain[::2, 0], certain[1::2, 1] = 0.0, 0.0
    assert inception_score(certain, splits=1)[0] == pytest.approx(2.0)


def test_inception_weights_that_are_not_are_user_errors(tmp_path):
    from localitylab.generation.inception import load_inception

    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match="does not hold the Inception-v3 weights"):
        load_inception(tmp_path / "wrong.pt")
    with pytest.raises(UserError, match="not found"):
        load_inception(tmp_path / "missing.pt")


# --- sampling a run and evaluating its samples --------------------------------------------------
def test_sample_an_untrained_dit_and_evaluate_its_samples(tmp_path, digits_space, trained_runs):
    from localitylab.generation.runs import EvaluateRequest, SampleRequest, evaluate_samples, sample_run

    samples, folder = sample_run(SampleRequest("dit-n/2", n=20, steps=3, seed=1, data="digits", device="cpu",
                                               out=tmp_path / "s"))
    assert folder == tmp_path / "s" and (folder / "samples.npz").is_file() and (folder / "samples.png").is_file()
    assert samples.labels.tolist() == [i % 10 for i in range(20)] and samples.meta["data"] == "digits"
    table, csv = evaluate_samples(EvaluateRequest(str(folder), str(trained_runs["resnet-n"].run_dir), device="cpu"))
    assert csv == folder / "sample-quality.csv" and csv.is_file()
    value = table.set_index(["model", "metric"])["value"]
    # An untrained DiT predicts zero noise: its samples are the untrained reference, exactly.
    assert value["dit-n/2 (untrained)", "fd_resnet-n"] == value[UNTRAINED, "fd_resnet-n"]
    assert set(table["model"]) == {"dit-n/2 (untrained)", FLOOR, UNTRAINED, NOISE}


def test_sample_and_evaluate_refuse_what_they_cannot_use(tmp_path, trained_runs):
    from localitylab.generation.runs import EvaluateRequest, SampleRequest, evaluate_samples, sample_run

    classifier = str(trained_runs["resnet-n"].run_dir)
    with pytest.raises(UserError, match="not a diffusion model"):
        sample_run(SampleRequest(classifier, n=2, device="cpu", out=tmp_path / "a"))
    with pytest.raises(UserError, match="unknown sampler 'euler'"):
        sample_run(SampleRequest("dit-n/2", sampler="euler", data="digits", out=tmp_path / "b"))
    with pytest.raises(UserError, match="steps must be between 1 and 1000"):
        sample_run(SampleRequest("dit-n/2", steps=0, n=2, data="digits", device="cpu", out=tmp_path / "c"))
    samples, folder = sample_run(SampleRequest("dit-n/4", n=4, steps=2, data="digits", device="cpu",
                                               out=tmp_path / "d"))
    with pytest.raises(UserError, match="is a diffusion model"):
        evaluate_samples(EvaluateRequest(str(folder), "dit-n/2", against="digits", device="cpu"))
    with pytest.raises(UserError, match="give the run folder or checkpoint of a trained network"):
        evaluate_samples(EvaluateRequest(str(folder), "resnet-n", against="digits", device="cpu"))
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*"))  # no temporary file left
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_the_report_shows_samples_their_quality_and_locality_against_noise(tmp_path, trained_runs):
    from localitylab.generation.runs import EvaluateRequest, SampleRequest, evaluate_samples, sample_run
    from localitylab.probes.runner import ProbeRequest, run_probes
    from localitylab.report.render import build_report

    folders = []
    for name in ("dit-n/2", "dit-n/4"):
        folder = tmp_path / name.replace("/", "-p")
        run_probes(["attention-distance"], ProbeRequest(name, data="digits", n_images=4, device="cpu", out=folder,
                                                        timesteps=[999, 100, 10]))
        sample_run(SampleRequest(name, n=20, steps=2, data="digits", device="cpu", out=folder / "samples"))
        evaluate_samples(EvaluateRequest(str(folder / "samples"), str(trained_runs["resnet-n"].run_dir),
                                         device="cpu"))
        folders.append(folder)
    html = build_report(folders, tmp_path / "report", formats=("html",))["html"].read_text()
    generation = html[html.index('<section id="generation"'):html.index("</section>", html.index('id="generation"'))]
    assert generation.count("<img") == 2 and generation.count(f">{FLOOR}<") == 4  # the floor once per metric
    assert generation.count(">fd_resnet-n<") == 2 + 3  # two models, three references
    assert "attention distance noise" in html  # locality ratio against the noise level, models overlaid
