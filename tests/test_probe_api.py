"""`localitylab.probe` on a model in memory: the same table as the command line on the same
weights and images, nothing written, the model left as it was."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

import localitylab
from localitylab.data import load_dataset
from localitylab.errors import UserError
from localitylab.probes import read_table
from localitylab.probes.sources import select_images
from tests.cli_helpers import run_cli, tree
from tests.hub_cache import write_weights_file


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    return write_weights_file(tmp_path_factory.mktemp("weights") / "test_vit.safetensors")


def timm_model(weights: Path):
    import timm

    return timm.create_model("test_vit", pretrained=True, pretrained_cfg_overlay={"file": str(weights)})


def test_python_call_gives_the_cli_table_and_writes_nothing(tmp_path, monkeypatch, weights_file):
    cli = run_cli(["probe", "attention-distance", "timm:test_vit", "--weights", weights_file, "--images", "3",
                   "--batch-size", "2", "--out", tmp_path / "cli", "--device", "cpu"])
    assert cli.status == 0, cli.err
    from_cli = read_table(tmp_path / "cli" / "attention-distance.csv")

    work = tmp_path / "notebook"
    work.mkdir()
    monkeypatch.chdir(work)
    before = tree(tmp_path)
    model = timm_model(weights_file).train()  # as a notebook might leave it: the probe uses eval mode
    images, labels = select_images(load_dataset("digits"), 3, seed=0)  # the CLI's images: uint8, 8 x 8, grey
    table = localitylab.probe("attention-distance", model, images, labels, batch_size=2,
                              model_name="timm:test_vit (test_vit.safetensors)")
    pd.testing.assert_frame_equal(table, from_cli)
    assert tree(tmp_path) == before  # nothing written, anywhere
    assert model.training and all(m.training for m in model.modules())

    # The same images already prepared (timm's own transform) give the same table.
    from localitylab.models.preprocessing import Preprocessing

    pipeline = Preprocessing.of_model(model)
    mean = torch.tensor(pipeline.mean).view(1, 3, 1, 1)
    std = torch.tensor(pipeline.std).view(1, 3, 1, 1)
    prepared = (pipeline.resize(images).float() / 255.0 - mean) / std
    again = localitylab.probe("attention-distance", model, prepared, model_name="timm:test_vit (test_vit.safetensors)",
                              batch_size=2)
    pd.testing.assert_frame_equal(again, from_cli)


def test_a_loaded_checkpoint_probes_as_the_cli_does(trained_runs, tmp_path):
    checkpoint = trained_runs["vit-n/2"].checkpoint
    cli = run_cli(["probe", "attention-distance", checkpoint, "--images", "4", "--out", tmp_path, "--device", "cpu"])
    assert cli.status == 0, cli.err
    model = localitylab.load(checkpoint)
    images, labels = select_images(load_dataset("digits"), 4, seed=0)
    table = localitylab.probe("attention-distance", model, images, labels)
    pd.testing.assert_frame_equal(table, read_table(tmp_path / "attention-distance.csv"))


def test_a_dit_in_memory_is_probed_as_a_denoiser_as_the_cli_does(tmp_path):
    """A DiT built in memory (named by its class, not a registry name) is fed as a denoiser,
    noised to the level asked: the table of the CLI's pipeline (`run_probes`, with the level the
    CLI has no flag for yet) on the same untrained weights and images."""
    from localitylab.models.registry import build_model, default_pos_embed, spec_for_data
    from localitylab.probes.runner import ProbeRequest, run_probes

    run_probes(["attention-distance"], ProbeRequest("dit-n/2", n_images=3, timesteps=[999], out=tmp_path,
                                                    device="cpu"))
    dataset = load_dataset("digits")
    info = dataset.info
    spec = spec_for_data("dit-n/2", info.img_size, info.in_chans, info.num_classes, default_pos_embed("dit-n/2"), None)
    torch.manual_seed(0)  # as the CLI builds an untrained model
    model = build_model(spec)
    images, labels = select_images(dataset, 3, seed=0)
    table = localitylab.probe("attention-distance", model, images, labels, preprocessing=info, timesteps=[999],
                              model_name="dit-n/2 (untrained)")
    assert set(table["setting"].dropna()) == {"t=999"}
    pd.testing.assert_frame_equal(table, read_table(tmp_path / "attention-distance.csv"))
    # The default preprocessing feeds it as a denoiser too (its own size and channels).
    default = localitylab.probe("attention-distance", model, images, labels, timesteps=[999],
                                model_name="dit-n/2 (untrained)")
    pd.testing.assert_frame_equal(default, table)
    with pytest.raises(UserError, match="^timesteps must be integers from 0 to 999"):
        localitylab.probe("attention-distance", model, images, labels, preprocessing=info, timesteps=[1000])


def test_bad_calls_say_what_is_wrong(weights_file):
    model = timm_model(weights_file)
    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(UserError, match="permutation measures accuracy: pass labels"):
        localitylab.probe("permutation", model, images)
    with pytest.raises(UserError, match="2 labels for 3 images|3 labels for 2 images"):
        localitylab.probe("attention-distance", model, images, torch.zeros(3))
    with pytest.raises(UserError, match="has no input pipeline of its own"):
        localitylab.probe("attention-distance", torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)), images)
    with pytest.raises(UserError, match="unknown setting 'nope' for attention-distance"):
        localitylab.probe("attention-distance", model, images, options={"nope": 1})
    with pytest.raises(UserError, match="^unknown setting 'nope'"):  # a keyword, as every probe setting is
        localitylab.probe("attention-distance", model, images, nope=1)
    with pytest.raises(UserError, match="^batch_size must be at least 1, got 0$"):
        localitylab.probe("attention-distance", model, images, batch_size=0)
    with pytest.raises(UserError, match="^device does not apply to a model in memory"):
        localitylab.probe("attention-distance", model, images, device="cpu")
    with pytest.raises(UserError, match="must be uint8"):
        localitylab.probe("attention-distance", model, images.int(), preprocessing="timm")
    with pytest.raises(UserError, match="^timesteps applies to diffusion models"):
        localitylab.probe("attention-distance", model, images, timesteps=[10])


def test_a_model_named_by_its_timm_name_is_probed(weights_file):
    """Without model_name the table names the timm model (not its class); attrs say how."""
    model = timm_model(weights_file)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with pytest.warns(UserWarning, match="16x16 px resized to 160x160.*bicubic"):
        table = localitylab.probe("attention-distance", model, images)
    assert set(table["model"]) == {"timm:test_vit"}
    assert table.attrs["preprocessing"]["input_size"] == (3, 160, 160)
    assert table.attrs["interval"]["level"] == 0.95 and "bootstrap" in table.attrs["interval"]["method"]
    assert "torch" in str(table.attrs["versions"]) and "_px" in table.attrs["units"]
    assert "mean over" in table.attrs["head"]
    assert table[table["metric"] == "mean_distance_px"]["value"].notna().all()


# --- the images people have (issue 29, point 3) ---------------------------------------------
@pytest.fixture(scope="module")
def loaded_vit(trained_runs):
    """A trained nano ViT on 8 x 8 grey digits, four of its test images, and the canonical table."""
    model = localitylab.load(trained_runs["vit-n/2"].checkpoint)
    images, labels = select_images(load_dataset("digits"), 4, seed=0)
    return model, images, labels, localitylab.probe("attention-distance", model, images, labels)


def test_every_layout_list_dataset_and_loader_gives_the_canonical_table(loaded_vit):
    import warnings

    from PIL import Image
    from torch.utils.data import DataLoader, TensorDataset

    model, images, labels, canonical = loaded_vit
    grey = images[:, 0].numpy()  # (N, H, W)
    same = {
        "NHWC numpy": images.permute(0, 2, 3, 1).numpy(),
        "NHW": grey,
        "list of arrays": list(grey),
        "list of PIL": [Image.fromarray(g) for g in grey],
        "Dataset": TensorDataset(images, labels),
        "DataLoader": DataLoader(TensorDataset(images, labels), batch_size=3),
    }
    for case, given in same.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # at the model's size: nothing resized, nothing said
            table = localitylab.probe("attention-distance", model, given,
                                      None if case in ("Dataset", "DataLoader") else labels)
        pd.testing.assert_frame_equal(table, canonical, obj=case)
    with pytest.raises(UserError, match=r"cannot tell whether images of shape \(1, 8, 1\)"):
        localitylab.probe("attention-distance", model, torch.zeros(2, 1, 8, 1, dtype=torch.uint8))
    with pytest.raises(UserError, match="no channel axis of size 1 or 3"):
        localitylab.probe("attention-distance", model, torch.zeros(2, 5, 8, 8, dtype=torch.uint8))


def test_other_sizes_are_resized_to_the_checkpoint_and_said_once(loaded_vit):
    from torchvision.transforms.v2.functional import resize

    model, images, labels, _ = loaded_vit
    large = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    expected = localitylab.probe("attention-distance", model, resize(large, [8, 8], antialias=True), labels)
    with pytest.warns(UserWarning, match=r"^images of 16x16 px resized to 8x8, the size .* bilinear") as said:
        table = localitylab.probe("attention-distance", model, large, labels)
    assert len([w for w in said if "resized" in str(w.message)]) == 1
    pd.testing.assert_frame_equal(table, expected)
    mixed = [large[0], images[1], large[2], images[3]]  # a list of two sizes
    with pytest.warns(UserWarning, match=r"images of 8x8, 16x16 px resized to 8x8"):
        table = localitylab.probe("attention-distance", model, mixed, labels)
    stacked = torch.stack([resize(large[0], [8, 8], antialias=True), images[1],
                           resize(large[2], [8, 8], antialias=True), images[3]])
    pd.testing.assert_frame_equal(table, localitylab.probe("attention-distance", model, stacked, labels))


def test_floats_in_0_1_are_taken_as_prepared_and_said(loaded_vit):
    model, images, labels, canonical = loaded_vit
    data = model.run.data
    prepared = (images.float() / 255 - torch.tensor(data.mean).view(1, -1, 1, 1)) / torch.tensor(data.std).view(1, -1, 1, 1)
    pd.testing.assert_frame_equal(localitylab.probe("attention-distance", model, prepared, labels), canonical)
    with pytest.warns(UserWarning, match=r"float images in \[0, 1\] are taken as prepared: the model's input as "
                                         r"it is, 1x8x8 normalised with mean"):
        localitylab.probe("attention-distance", model, images.float() / 255, labels)


def test_a_timm_model_built_at_32_is_fed_32_pixel_images_as_they_are():
    import warnings

    import timm

    from localitylab.models.preprocessing import Preprocessing

    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, num_classes=3)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = localitylab.probe("attention-distance", model, images, batch_size=2)
    assert table.attrs["preprocessing"]["input_size"] == (3, 32, 32)
    pipeline = Preprocessing.of_model(model, img_size=32)
    mean, std = torch.tensor(pipeline.mean).view(1, 3, 1, 1), torch.tensor(pipeline.std).view(1, 3, 1, 1)
    prepared = (images.float() / 255 - mean) / std  # no resize: the images are at its size
    pd.testing.assert_frame_equal(localitylab.probe("attention-distance", model, prepared, batch_size=2), table)


def test_figures_true_returns_figures_and_writes_nothing(loaded_vit, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    model, images, labels, canonical = loaded_vit
    monkeypatch.chdir(tmp_path)
    table, figures = localitylab.probe("attention-distance", model, images, labels, figures=True)
    pd.testing.assert_frame_equal(table, canonical)
    assert figures and all(isinstance(f, plt.Figure) for f in figures)
    assert list(tmp_path.iterdir()) == []
    for figure in figures:
        plt.close(figure)


def test_dir_lists_the_api():
    assert {"probe", "load", "train", "Preprocessing", "__version__"} <= set(dir(localitylab))
    assert set(localitylab.__all__) <= set(dir(localitylab))


def test_a_notebook_gets_progress_bars_and_a_log_does_not(monkeypatch, capsys):
    """`localitylab.probe` draws bars in a Jupyter kernel (IPython's ZMQInteractiveShell)
    even though its stderr is no terminal; in a terminal IPython writing to a log, or with
    progress=False, it stays silent. The bars count what the probes tell them, nested steps
    in one display, and a step of unknown length ends at what it counted."""
    import sys
    import types

    from localitylab import progress

    class ZMQInteractiveShell:
        pass

    class TerminalInteractiveShell:
        pass

    monkeypatch.delenv("LOCALITYLAB_FORCE_TERMINAL", raising=False)
    ipython = types.ModuleType("IPython")
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    ipython.get_ipython = lambda: TerminalInteractiveShell()
    assert progress.make_progress() is progress.SILENT  # stderr is pytest's capture here
    ipython.get_ipython = lambda: ZMQInteractiveShell()
    assert progress.make_progress(show=False) is progress.SILENT
    bars = progress.make_progress()
    assert isinstance(bars, progress.RichProgress)
    with bars.task("probe all", total=2) as outer:
        with bars.task("batches") as inner:
            inner.advance()
            inner.advance(2)
        outer.advance()
    assert {t.description: (t.completed, t.total) for t in bars.bars.tasks} == {"probe all": (1, 2), "batches": (3, 3)}
    assert "probe all" in capsys.readouterr().err
