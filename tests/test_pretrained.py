"""Models people use: timm's pretrained weights (through the hub's own cache, offline), weights
files loaded the way timm loads them, and each model fed by its own input pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from localitylab.data import DataOptions
from localitylab.models.preprocessing import Preprocessing
from localitylab.probes import load_target
from tests.cli_helpers import assert_one_line_error, run_cli, tree
from tests.hub_cache import MODEL, write_hub_cache, write_weights_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    return write_weights_file(tmp_path_factory.mktemp("weights") / "test_vit.safetensors")


# --- --pretrained through the hub's cache, offline ----------------------------------------------
OFFLINE_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, sys
    import torch
    from safetensors.torch import load_file
    from cli.main import main
    from localitylab.probes import load_target

    out, weights, model = sys.argv[1:4]
    common = ["--images", "3", "--device", "cpu", "--batch-size", "2"]
    hub = main(["probe", "attention-distance", "timm:" + model, "--pretrained", "--out", out + "/hub", *common])
    file = main(["probe", "attention-distance", "timm:" + model.split(".")[0], "--weights", weights,
                 "--out", out + "/file", *common])
    target, _ = load_target("timm:" + model, device="cpu", pretrained=True)
    state, expected = target.model.state_dict(), load_file(weights)
    same = sorted(state) == sorted(expected) and all(torch.equal(state[k], expected[k]) for k in expected)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # a model whose weights are not in the cache
        missing = main(["probe", "attention-distance", "timm:test_vit2.r160_in1k", "--pretrained",
                        "--out", out + "/missing", *common])
    print(json.dumps({"hub": hub, "file": file, "same_weights": same, "missing": missing,
                      "missing_err": err.getvalue()}))
""")


def test_pretrained_offline_loads_the_cached_weights_as_weights_file_does(tmp_path, weights_file):
    """HF_HUB_OFFLINE=1 and HF_HOME at a hub cache holding generated weights: --pretrained finds
    them where the hub put them, loads exactly them (every tensor equal to the file's) and gives
    the same table as --weights on the same file; a model not in the cache is one line, status 2."""
    from safetensors.torch import load_file

    write_hub_cache(tmp_path / "hf", load_file(str(weights_file)))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(tmp_path / "out"), str(weights_file), MODEL],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["hub"] == 0 and result["file"] == 0, done.stderr
    assert result["same_weights"]
    hub = pd.read_csv(tmp_path / "out" / "hub" / "attention-distance.csv")
    file = pd.read_csv(tmp_path / "out" / "file" / "attention-distance.csv")
    assert set(hub["model"]) == {f"timm:{MODEL}"} and set(file["model"]) == {"timm:test_vit (test_vit.safetensors)"}
    per_head = hub[hub["metric"] == "mean_distance_px"].dropna(subset=["head"])
    assert sorted(set(zip(per_head["layer"], per_head["head"]))) == [(l, h) for l in range(6) for h in range(2)]
    pd.testing.assert_frame_equal(hub.drop(columns="model"), file.drop(columns="model"))
    meta = json.loads((tmp_path / "out" / "hub" / "meta.json").read_text())
    assert meta["weights"]["pretrained"] == MODEL and meta["weights"]["hf_hub_id"] == f"timm/{MODEL}"
    assert meta["preprocessing"]["input_size"] == [3, 160, 160] and meta["preprocessing"]["mean"] == [0.5] * 3
    assert result["missing"] == 2
    lines = result["missing_err"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("localitylab: error: timm:test_vit2.r160_in1k: pretrained "
                                                   "weights are not in the local hub cache"), lines
    assert "HF_HUB_OFFLINE" in lines[0]
    assert not (tmp_path / "out" / "missing").exists()


def test_the_generated_weights_change_the_table(weights_file):
    """The offline test above would pass vacuously if neither path loaded anything: the table
    with the generated weights is not the table of timm's own initialisation."""
    import timm

    from localitylab.probes import get_probe

    target, dataset = load_target("timm:test_vit", device="cpu", weights=str(weights_file))
    images = target.model_images(dataset.test_images[:2])
    labels = dataset.test_labels[:2]
    with_weights = get_probe("attention-distance").run(target, images, labels).table
    torch.manual_seed(0)
    target.model.load_state_dict(timm.create_model("test_vit", pretrained=False).state_dict())
    initial = get_probe("attention-distance").run(target, images, labels).table
    distance = with_weights["metric"] == "mean_distance_px"
    assert not np.allclose(with_weights.loc[distance, "value"], initial.loc[distance, "value"], atol=1e-3)


# --- the model's own pipeline ------------------------------------------------------------------------
# Pretrained configs that differ in every field of the pipeline: size, interpolation, crop
# fraction and mode, mean and std.
PIPELINES = ["test_vit.r160_in1k", "vit_base_patch16_clip_224.openai", "resnet50.a1_in1k", "resnet18.tv_in1k",
             "deit3_small_patch16_384.fb_in1k", "eva02_tiny_patch14_224.mim_in22k",
             "vit_small_patch14_reg4_dinov2.lvd142m", "convnext_tiny.fb_in22k_ft_in1k_384"]


def timm_reference(preprocessing: Preprocessing, images: torch.Tensor) -> torch.Tensor:
    """timm's own transform, create_transform(**config), on each image as a PIL image in RGB."""
    from PIL import Image

    transform = preprocessing.transform()
    out = []
    for image in images:
        array = image.numpy()
        pil = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0).copy())
        out.append(transform(pil.convert("RGB")))
    return torch.stack(out)


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_equals_timms_transform(name):
    """Our split pipeline (timm's geometric transform to uint8, then the normalisation on the
    device) gives what timm's create_transform gives on the same image, for colour and grey
    images of sizes that are not the model's."""
    from timm.models import get_pretrained_cfg

    from localitylab.data.registry import DataInfo

    holder = SimpleNamespace(pretrained_cfg=get_pretrained_cfg(name).to_dict())  # all resolve_model_data_config reads
    preprocessing = Preprocessing.of_model(holder)
    cfg = holder.pretrained_cfg
    assert preprocessing.input_size == tuple(cfg["input_size"]) and preprocessing.mean == tuple(cfg["mean"])
    assert preprocessing.crop_pct == cfg["crop_pct"] and preprocessing.interpolation == cfg["interpolation"]
    generator = torch.Generator().manual_seed(0)
    info = DataInfo("x", preprocessing.img_size, 3, ["a"], list(preprocessing.mean), list(preprocessing.std))
    for shape in ((3, 37, 53), (1, 40, 30), (3, 8, 8)):
        images = torch.randint(0, 256, (2, *shape), generator=generator, dtype=torch.uint8)
        ours = info.prepare(preprocessing.resize(images))
        reference = timm_reference(preprocessing, images)
        assert ours.shape == reference.shape == (2, *cfg["input_size"])
        assert torch.equal(ours, reference)  # bit for bit


def test_pretrained_target_is_built_and_fed_as_its_weights_were_trained(weights_file):
    """A timm model with weights from elsewhere keeps its own shapes (160 px, 3 channels, 1000
    classes) whatever the data set (digits: 8 px, grey, 10 classes), and its inputs are timm's
    transform of the data set's images."""
    from timm.data import resolve_model_data_config

    target, dataset = load_target("timm:test_vit", device="cpu", weights=str(weights_file))
    assert (target.spec.img_size, target.spec.in_chans, target.spec.num_classes) == (160, 3, 1000)
    assert target.info.grid == (10, 10) and target.info.patch_size == 16
    assert target.preprocessing.config() == {**resolve_model_data_config(target.model)}
    images = dataset.test_images[:3]
    assert torch.equal(target.prepare(target.model_images(images)), timm_reference(target.preprocessing, images))
    assert "does not measure it" in target.accuracy_caveat()  # 1000 classes against digits' 10


def test_img_size_overrides_the_input_size_on_purpose(weights_file):
    """--img-size is the model's input size: timm resamples the position embedding, the pipeline
    resizes to it, and the record says so. Without it the data set's size never leaks in."""
    target, _ = load_target("timm:test_vit", device="cpu", weights=str(weights_file),
                            data_options=DataOptions(img_size=64))
    assert target.preprocessing.input_size == (3, 64, 64) and target.info.grid == (4, 4)
    assert target.model.pos_embed.shape[1] == 1 + 16
    assert "input size 64" in target.preprocessing.source
    target, _ = load_target("timm:test_vit", device="cpu", weights=str(weights_file), data="shapes-16")
    assert target.preprocessing.input_size == (3, 160, 160)


# --- bad inputs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["timm:test_vit.r160_in1k", "--pretrained", "--weights", "{w}"], "give --pretrained or --weights, not both"),
    (["pit-n", "--pretrained"], "--pretrained applies to timm:NAME models"),
    (["timm:test_vit.no_such_tag", "--pretrained"], "timm has no pretrained tag 'no_such_tag' for test_vit; tags: "
                                                    "r160_in1k"),
    (["timm:vit_small_patch16_18x2_224", "--pretrained"], "timm has no pretrained weights for "
                                                          "vit_small_patch16_18x2_224"),
    (["timm:test_vit2", "--weights", "{w}"], "weights in {w} do not fit timm:test_vit2:"),
    (["timm:test_vit", "--weights", "{missing}"], "weights file not found"),
])
def test_bad_pretrained_inputs_are_one_line(tmp_path, weights_file, args, message):
    fill = {"w": str(weights_file), "missing": str(tmp_path / "nope.safetensors")}
    before = tree(tmp_path)
    result = run_cli(["probe", "attention-distance", *[a.format(**fill) for a in args], "--images", "2",
                      "--out", tmp_path / "out", "--device", "cpu"])
    assert_one_line_error(result, message.format(**fill))
    assert tree(tmp_path) == before


# --- the pretrained zoo study, offline ----------------------------------------------------------------
def test_pretrained_zoo_study_runs_offline(tmp_path, monkeypatch, weights_file):
    """studies/pretrained_zoo.toml names nine real timm tags (validated against timm's registry);
    its pipeline (probe-only pieces, the report, the published facts beside our numbers) runs
    offline with every model replaced by the generated test_vit in a local hub cache."""
    import dataclasses

    import huggingface_hub.constants as hub_constants
    from safetensors.torch import load_file

    from localitylab.probes import read_table
    from localitylab.studies.runner import expectations, make_plan, run_study
    from localitylab.studies.spec import load_study

    write_hub_cache(tmp_path / "hf", load_file(str(weights_file)))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read at each request, as HF_HUB_OFFLINE=1 sets it

    study = load_study(ROOT / "studies" / "pretrained_zoo.toml")
    assert len(study.models) == 9 and all(entry.pretrained for entry in study.models)
    assert all(e["probe"] == "attention-distance" for e in study.expect)
    small = dataclasses.replace(study, models=[dataclasses.replace(e, model=f"timm:{MODEL}") for e in study.models],
                           dataset="shapes-32", probes=["attention-distance"], probe_images=2, probe_batch_size=2)
    out = tmp_path / "out"
    result = run_study(small, out, log=lambda line: None, formats=("html",))
    assert not result.failed, result.failed
    assert len(result.done) == 9 and not (out / "runs" / "vit-b16-in21k" / "ckpt.pt").exists()  # nothing trained
    rows = expectations(small, make_plan(small, out))
    assert [r["model"] for r in rows] == [e["model"] for e in study.expect]
    first = read_table(out / "runs" / "vit-b16-in21k" / "probes" / "attention-distance.csv")
    first = first[(first["metric"] == "mean_distance_px") & (first["layer"] == 0)]
    assert rows[0]["ours"] == pytest.approx(first["value"].min()) and rows[1]["ours"] == pytest.approx(first["value"].max())
    assert all(r["ours"] is not None for r in rows)
    html = (out / "report" / "report.html").read_text()
    assert "attention distance increases with depth" in html and "Teaching Matters" in html
    again = run_study(small, out, log=lambda line: None, formats=("html",))
    assert len(again.skipped) == 9 and not again.done
