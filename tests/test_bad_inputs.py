"""The catalogue of bad inputs: every one ends in one line on stderr, exit status 2, no
traceback, and nothing half-written (no new file or folder anywhere the command could
write, no temporary file left).

Each case runs in-process through `cli.main.main` (the console script's entry point) in a
fresh working folder, so default output folders (runs/, probes/) would show up there too.
`tests/test_cli.py` checks one case in a real process.

docs/bad-inputs.md is this catalogue as a table, with the message a user sees; regenerate
it after changing a case with

    .venv/bin/python tests/test_bad_inputs.py

(test_doc_lists_every_case fails until it is in sync).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script to regenerate the doc
    sys.path.insert(0, str(ROOT))

from tests.cli_helpers import assert_one_line_error, run_cli, tree  # noqa: E402

DOC = ROOT / "docs" / "bad-inputs.md"


# --- inputs the cases share ----------------------------------------------------------------------

def make_fixtures(fx: Path) -> None:
    """The files the cases read: checkpoints good and bad, image folders good and bad, tables."""
    import numpy as np
    import torch
    from PIL import Image

    from localitylab.data import load_dataset
    from localitylab.models.registry import ModelSpec, build_model
    from localitylab.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    spec = ModelSpec("resnet-n", 8, 1, 10)
    payload = {"model_spec": spec.to_dict(), "model_state": build_model(spec).state_dict(),
               "data": load_dataset("digits").info.to_dict(), "config": {}, "epoch": 0}
    checkpoint = save_checkpoint(fx / "run" / "ckpt.pt", payload)
    # The weights of a resnet-n under the name of a pit-n.
    save_checkpoint(fx / "other-model.pt", {**payload, "model_spec": {**spec.to_dict(), "name": "pit-n",
                                                                      "pos_embed": "learn"}})
    torch.save({"weights": torch.zeros(3)}, fx / "foreign.pt")
    (fx / "truncated.pt").write_bytes(checkpoint.read_bytes()[:3000])
    marker = fx / "code-ran"  # the malicious files would create it; the snapshot would show it

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "localitylab.checkpoint", "model_spec": Payload()}, fx / "malicious.pt")
    (fx / "malicious.pkl").write_bytes(pickle.dumps({"model_spec": Payload()}, protocol=4))
    (fx / "notes.txt").write_text("not a checkpoint\n")
    (fx / "a-file").write_text("a file where a folder should be\n")
    (fx / "binary.toml").write_bytes(b"\xff\xfe\x00\x01 not text")

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            for folder in (fx / "images" / split / name, fx / "mismatch" / split / (name if split == "train" else "cow")):
                folder.mkdir(parents=True, exist_ok=True)
                for k in range(2):
                    Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(folder / f"{k}.png")
            text_only = fx / "text-only" / split / name
            text_only.mkdir(parents=True, exist_ok=True)
            (text_only / "readme.txt").write_text("no images here")
            corrupt = fx / "corrupt" / split / name
            corrupt.mkdir(parents=True, exist_ok=True)
            (corrupt / "0.png").write_bytes(b"not a png")
        (fx / "no-classes" / split).mkdir(parents=True, exist_ok=True)
    # A good folder but for one file: a decompression bomb, or a JPEG cut short.
    from tests.dataset_fixtures import bomb_png, truncated_jpeg

    for broken, name, content in (("bomb", "huge.png", bomb_png()), ("truncated", "cut.jpg", truncated_jpeg())):
        shutil.copytree(fx / "images", fx / broken)
        (fx / broken / "val" / "dog" / name).write_bytes(content)
    (fx / "hf-json").mkdir()
    (fx / "hf-json" / "train.jsonl").write_text('{"image": "a.png", "label": 0}\n')

    # An (untrained) diffusion run: a dit-n/2 checkpoint as `train --task diffusion` writes it.
    from localitylab.diffusion.objective import DiffusionObjective

    dit_spec = ModelSpec("dit-n/2", 8, 1, 10, "sincos")
    save_checkpoint(fx / "dit-run" / "ckpt.pt", {
        "model_spec": dit_spec.to_dict(), "model_state": build_model(dit_spec).state_dict(),
        "data": load_dataset("digits").info.to_dict(), "config": {"task": "diffusion"}, "epoch": 0,
        "task": "diffusion", "diffusion_options": DiffusionObjective().options()})

    (fx / "metrics.csv").write_text("epoch,test_acc\n1,0.5\n")
    (fx / "permutation.csv").write_text(
        "model,probe,metric,layer,head,setting,value,n_images,note\n"
        "resnet-n,permutation,accuracy,,,clean,0.5,8,\n")


# A study that passes validation; the study cases break one thing in it.
STUDY = """\
[study]
name = "tiny"
dataset = "digits"

[recipe]
epochs = 1
batch_size = 64
warmup_epochs = 0

[[models]]
model = "resnet-n"

[probes]
run = ["permutation"]
images = 8
"""


# --- the catalogue -------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    what: str  # the bad input, in words
    args: list[str]  # {fx}: the shared inputs above, {tmp}: this case's folder, {out}: its output folder
    message: str  # a piece of the one-line error
    setup: Callable[[Path], None] | None = None  # writes this case's own inputs into {tmp}
    before_data: bool = False  # must be refused before any data set is loaded
    xfail: str | None = None  # why it fails today, and the fix it needs

    def argv(self, fx: Path, tmp: Path) -> list[str]:
        return [a.format(fx=fx, tmp=tmp, out=tmp / "out") for a in self.args]

    @property
    def command(self) -> str:
        """The command as the doc shows it: paths relative to the inputs described there."""
        shown = [a.replace("{fx}/", "").replace("{tmp}/", "").replace("{out}", "out") for a in self.args]
        return " ".join(["localitylab", *(f"'{a}'" if re.search(r"[\s;]", a) else a for a in shown)])


def study_case(id: str, what: str, change: Callable[[str], str], message: str, *extra: str, **kw) -> Case:
    def setup(tmp: Path) -> None:
        (tmp / "study.toml").write_text(change(STUDY))

    return Case(id, what, ["study", "run", "{tmp}/study.toml", "--out", "{out}", *extra], message, setup=setup, **kw)


def _existing_study(tmp: Path) -> None:
    (tmp / "study.toml").write_text(STUDY)
    (tmp / "out").mkdir()
    (tmp / "out" / "study.json").write_text("{}\n")


def _bad_run_json(tmp: Path) -> None:
    (tmp / "run").mkdir()
    (tmp / "run" / "run.json").write_text("{not json")


def _empty_folder(tmp: Path) -> None:
    (tmp / "empty").mkdir()


def _test_vit_weights(tmp: Path) -> None:
    from tests.hub_cache import write_weights_file

    write_weights_file(tmp / "test_vit.safetensors")


def _sample_set(tmp: Path) -> None:
    import torch

    from localitylab.generation.samples import SampleSet, write_samples

    write_samples(tmp / "samples", SampleSet(torch.zeros(20, 1, 8, 8, dtype=torch.uint8), torch.arange(20) % 10,
                                             {"model": "dit-n/2", "data": "digits"}))


def _pretrained_registry_study(tmp: Path) -> None:
    (tmp / "study.toml").write_text('[study]\nname = "s"\ndataset = "digits"\n\n[[models]]\nmodel = "pit-n"\n'
                                    'pretrained = true\n')


def _committed_report(tmp: Path) -> None:
    (tmp / "report").mkdir()
    (tmp / "report" / "report.html").write_text("<html>the committed report</html>\n")


def _shaped_timm_weights(tmp: Path) -> None:
    """A timm ViT shaped by --model-kw for digits (1 channel, 8x8, patch 1, width 32), its weights in a file."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **SHAPED_TIMM_KW, in_chans=1, img_size=8, num_classes=10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "w.safetensors"))


SHAPED_TIMM_KW = {"patch_size": 1, "embed_dim": 32, "depth": 3, "num_heads": 2}


def _truncated_idx(tmp: Path) -> None:
    from tests.dataset_fixtures import write_idx_dataset

    write_idx_dataset(tmp / "data" / "MNIST" / "raw")
    packed = tmp / "data" / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    packed.write_bytes(packed.read_bytes()[:12])


TRAIN_BASE = ["train", "pit-n", "digits", "--out", "{out}"]
TRAIN = [*TRAIN_BASE, "--epochs", "1"]  # one epoch, should a case ever get as far as training

CASES = [
    # names
    Case("unknown-model", "a model name not in the registry", ["train", "pit-x", "digits", "--out", "{out}"],
         "unknown model 'pit-x' (did you mean pit-t or pit-s or pit-n?); valid:"),
    Case("unknown-timm-model", "a timm: name timm does not have", ["train", "timm:no_such_model", "digits", "--out", "{out}"],
         "unknown timm model"),
    Case("unknown-dataset", "a data set name not in the registry", ["train", "pit-n", "places365", "--out", "{out}"],
         "unknown data set 'places365'; valid:"),
    Case("unknown-dataset-prefix", "a PREFIX:PATH data set with an unknown prefix",
         ["train", "pit-n", "web:http://x", "--out", "{out}"], "unknown data set 'web:http://x'"),
    Case("unknown-probe", "a probe name not in the registry", ["probe", "nope", "{fx}/run/ckpt.pt", "--out", "{out}"],
         "unknown probe 'nope'; valid:"),
    Case("probe-name-typo", "a probe name one letter off", ["probe", "attention-distanse", "vit-n/2", "--out", "{out}"],
         "unknown probe 'attention-distanse' (did you mean attention-distance"),
    Case("timm-name-typo", "a timm name one letter off (suggested by edit distance)",
         ["train", "timm:vit_smal_patch16_224", "digits", "--out", "{out}"], "did you mean: vit_small_patch16_224"),
    Case("probe-run-folder-missing", "probe of a run folder that does not exist (a path, not a model name)",
         ["probe", "all", "{tmp}/runs/pit-n-digit", "--out", "{out}"], "runs/pit-n-digit: no such file or folder"),
    Case("unknown-command", "a command that does not exist", ["frobnicate"], "No such command"),
    Case("unknown-pos-embed", "a position embedding that does not exist", [*TRAIN, "--pos-embed", "rope"],
         "unknown position embedding 'rope'"),
    Case("unknown-device", "a device that does not exist", [*TRAIN, "--device", "tpu"], "unknown device 'tpu'",
         before_data=True),
    Case("unknown-compile-mode", "--compile other than auto/on/off", [*TRAIN, "--compile", "maybe"],
         "--compile must be auto, on or off", before_data=True),
    # shapes
    Case("patch-not-dividing", "a patch size that does not divide the image size",
         ["train", "vit-n/3", "digits", "--out", "{out}"], "not divisible by patch size 3"),
    Case("patch-larger-than-image", "a patch larger than the image", ["train", "vit-n/16", "digits", "--out", "{out}"],
         "image size 8 is not divisible by patch size 16"),
    Case("patch-zero", "patch size 0", ["train", "vit-n/0", "digits", "--out", "{out}"], "patch size must be at least 1"),
    Case("img-size-zero", "--img-size 0 for a folder data set",
         ["train", "resnet-n", "folder:{fx}/images", "--img-size", "0", "--out", "{out}"], "--img-size must be"),
    Case("img-size-for-fixed-size-data", "--img-size for a data set with one image size (it used to be ignored)",
         ["train", "resnet-n", "digits", "--img-size", "32", "--out", "{out}"], "--img-size applies to folder:"),
    Case("img-size-disagrees-with-name", "--img-size other than the S of shapes-S",
         ["train", "resnet-n", "shapes-16", "--img-size", "32", "--out", "{out}"], "shapes-16 images are 16x16"),
    Case("generated-size-too-small", "shapes-S with S below 4", ["train", "pit-n", "shapes-3", "--out", "{out}"],
         "size must be between 4 and 512"),
    Case("model-kw-shape", "--model-kw setting a shape the data set decides",
         ["train", "vit-n/2", "digits", "--model-kw", "img_size=16", "--out", "{out}"], "img_size cannot be set"),
    # types and values
    Case("epochs-not-a-number", "--epochs many", [*TRAIN_BASE, "--epochs", "many"], "Invalid value for '--epochs'"),
    Case("epochs-fraction", "--epochs 1.5", [*TRAIN_BASE, "--epochs", "1.5"], "Invalid value for '--epochs'"),
    Case("epochs-zero", "--epochs 0", [*TRAIN_BASE, "--epochs", "0"], "--epochs must be at least 1", before_data=True),
    Case("batch-size-zero", "--batch-size 0", [*TRAIN, "--batch-size", "0"], "--batch-size must be at least 1",
         before_data=True),
    Case("lr-negative", "a negative learning rate", [*TRAIN, "--lr", "-1"], "--lr must be a positive number", before_data=True),
    Case("lr-nan", "--lr nan", [*TRAIN, "--lr", "nan"], "--lr", before_data=True),
    Case("min-lr-negative", "a negative --min-lr", [*TRAIN, "--min-lr", "-1"], "--min-lr", before_data=True),
    Case("weight-decay-nan", "--weight-decay nan", [*TRAIN, "--weight-decay", "nan"], "--weight-decay",
         before_data=True),
    Case("label-smoothing-one", "--label-smoothing 1", [*TRAIN, "--label-smoothing", "1"], "--label-smoothing must be in [0, 1)",
         before_data=True),
    Case("drop-path-above-one", "--drop-path 2", [*TRAIN, "--drop-path", "2"], "--drop-path", before_data=True),
    Case("mixup-negative", "--mixup -1", [*TRAIN, "--mixup", "-1"], "--mixup", before_data=True),
    Case("clip-grad-negative", "--clip-grad -1", [*TRAIN, "--clip-grad", "-1"], "--clip-grad", before_data=True),
    Case("log-unknown", "--log with a tracker that does not exist", [*TRAIN, "--log", "csv"],
         "--log must be tensorboard or wandb, got 'csv'", before_data=True),
    Case("swaps-without-permute-pixels", "--swaps without the permutation's seed (--permute-pixels)",
         [*TRAIN, "--swaps", "64"], "give its seed with --permute-pixels", before_data=True),
    Case("swap-distance-without-swaps", "--swap-distance without --swaps",
         [*TRAIN, "--permute-pixels", "0", "--swap-distance", "2"], "give the number of pairs with --swaps", before_data=True),
    Case("swap-distance-below-one", "--swap-distance 0.5 (no other pixel is that close)",
         [*TRAIN, "--permute-pixels", "0", "--swaps", "8", "--swap-distance", "0.5"],
         "--swap-distance must be a number >= 1 (pixels) or inf", before_data=True),
    Case("swaps-negative", "--swaps -1", [*TRAIN, "--permute-pixels", "0", "--swaps", "-1"], "--swaps must be >= 0",
         before_data=True),
    Case("model-kw-no-equals", "--model-kw without '='", [*TRAIN, "--model-kw", "depth"], "--model-kw expects key=value"),
    Case("model-kw-unknown-key", "--model-kw with a key the model does not take",
         [*TRAIN, "--model-kw", "no_such_arg=1"], "no_such_arg"),
    Case("model-kw-bad-value", "--model-kw with a value the model cannot be built with",
         [*TRAIN, "--model-kw", "depth=-1"], "pit-n cannot be built with {'depth': -1}"),
    Case("pos-embed-std-twice", "the position table's std given as --pos-embed-std and --model-kw, differently",
         [*TRAIN, "--pos-embed-std", "0.5", "--model-kw", "pos_embed_std=1.0"], "given twice", before_data=True),
    Case("pos-embed-std-for-a-convnet", "--pos-embed-std for a ResNet (it has no position table)",
         ["train", "resnet-n", "digits", "--pos-embed-std", "1.0", "--out", "{out}"],
         "--pos-embed-std sets the initial std of a learned position table; resnet-n is a ConvNet", before_data=True),
    Case("pos-embed-std-for-sincos", "--pos-embed-std with --pos-embed sincos (a fixed table)",
         [*TRAIN, "--pos-embed", "sincos", "--pos-embed-std", "1.0"], "--pos-embed is 'sincos', not a learned table",
         before_data=True),
    Case("pos-embed-std-negative", "--pos-embed-std -1", [*TRAIN, "--pos-embed-std", "-1"],
         "--pos-embed-std must be a positive number", before_data=True),
    Case("opt-no-equals", "--opt without '='", ["probe", "attention-maps", "vit-n/2", "--opt", "per_head", "--out", "{out}"],
         "--opt expects key=value"),
    # missing files
    Case("cifar-archive-missing", "CIFAR not downloaded, --data-dir without it",
         ["train", "pit-n", "cifar10", "--data-dir", "{tmp}/nonexistent", "--out", "{out}"], "cifar-10-python.tar.gz"),
    Case("folder-missing", "folder:PATH that does not exist",
         ["train", "pit-n", "folder:{tmp}/nonexistent", "--img-size", "8", "--out", "{out}"], "is not a folder"),
    Case("weights-missing", "--weights FILE that does not exist",
         [*TRAIN, "--weights", "{tmp}/nope.safetensors"], "weights file not found"),
    Case("checkpoint-missing", "eval of a checkpoint that does not exist", ["eval", "{tmp}/nonexistent/ckpt.pt"],
         "checkpoint not found"),
    Case("probe-checkpoint-missing", "probe of a checkpoint that does not exist",
         ["probe", "attention-distance", "{tmp}/nothing.pt", "--out", "{out}"], "checkpoint not found"),
    Case("study-missing", "a study file that does not exist", ["study", "run", "{tmp}/missing.toml", "--out", "{out}"],
         "study file not found"),
    Case("plot-table-missing", "plot of a table that does not exist",
         ["plot", "attention-distance", "{tmp}/missing.csv", "--out", "{out}"], "table not found"),
    Case("report-missing-folder", "report on a folder that does not exist",
         ["report", "{tmp}/missing", "--out", "{out}"], "not a run folder (no run.json) nor a probe folder"),
    Case("report-empty-folder", "report on an empty folder", ["report", "{tmp}/empty", "--out", "{out}"],
         "not a run folder (no run.json) nor a probe folder", setup=_empty_folder),
    # empty and broken data sets
    Case("folder-no-classes", "a folder data set whose train/ and val/ hold no class folders",
         ["train", "resnet-n", "folder:{fx}/no-classes", "--img-size", "8", "--out", "{out}"], "has no class folders"),
    Case("folder-only-non-images", "a folder data set whose class folders hold only non-image files",
         ["train", "resnet-n", "folder:{fx}/text-only", "--img-size", "8", "--out", "{out}"], "Found no valid file"),
    Case("folder-corrupt-image", "a .png that is not an image",
         ["train", "resnet-n", "folder:{fx}/corrupt", "--img-size", "8", "--out", "{out}"], "is not a readable image"),
    Case("folder-decompression-bomb", "a 40,000 x 40,000 PNG (190 KB on disk, 1.6 billion pixels) among the images",
         ["train", "resnet-n", "folder:{fx}/bomb", "--img-size", "8", "--out", "{out}"],
         "huge.png is refused as a possible decompression bomb"),
    Case("folder-truncated-image", "a JPEG cut off half-way among the images",
         ["train", "resnet-n", "folder:{fx}/truncated", "--img-size", "8", "--out", "{out}"],
         "cut.jpg is not a readable image: image file is truncated"),
    Case("hf-not-parquet-or-arrow", "an hf: data set stored as JSON lines",
         ["train", "resnet-n", "hf:{fx}/hf-json", "--out", "{out}"],
         "is stored as json files; localitylab reads only Parquet and Arrow"),
    Case("mnist-missing", "MNIST not downloaded, --data-dir without it",
         ["train", "pit-n", "mnist", "--data-dir", "{tmp}/nonexistent", "--out", "{out}"],
         "put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz"),
    Case("mnist-truncated-gzip", "an MNIST file cut short (gzipped)",
         ["train", "pit-n", "mnist", "--data-dir", "{tmp}/data", "--out", "{out}"],
         "train-labels-idx1-ubyte.gz is not a readable gzip file", setup=_truncated_idx),
    Case("tiny-imagenet-download", "--download for Tiny-ImageNet, whose source publishes no checksum",
         ["train", "pit-n", "tiny-imagenet", "--download", "--data-dir", "{tmp}/nonexistent", "--out", "{out}"],
         "the source publishes no checksum, so localitylab does not download it"),
    Case("imagenet-needs-img-size", "ImageNet without --img-size", ["train", "pit-n", "imagenet", "--out", "{out}"],
         "imagenet needs --img-size"),
    Case("folder-class-mismatch", "train/ and val/ with different classes",
         ["train", "resnet-n", "folder:{fx}/mismatch", "--img-size", "8", "--out", "{out}"], "different class folders"),
    Case("folder-needs-img-size", "a folder data set without --img-size",
         ["train", "resnet-n", "folder:{fx}/images", "--out", "{out}"], "needs --img-size"),
    # checkpoints
    Case("checkpoint-not-torch", "a text file as a checkpoint", ["eval", "{fx}/notes.txt"], "not a readable checkpoint"),
    Case("checkpoint-truncated", "a checkpoint cut short", ["eval", "{fx}/truncated.pt"],
         "not a readable checkpoint: it is cut short"),
    Case("checkpoint-foreign", "a torch file that is not a localitylab checkpoint", ["eval", "{fx}/foreign.pt"],
         "not a localitylab checkpoint"),
    Case("checkpoint-other-model", "a checkpoint whose weights belong to another model", ["eval", "{fx}/other-model.pt"],
         "weights do not fit pit-n"),
    Case("checkpoint-malicious", "a checkpoint whose unpickling would run a shell command", ["eval", "{fx}/malicious.pt"],
         "refused: loading it would call posix.system"),
    Case("checkpoint-malicious-raw-pickle", "a bare pickle (protocol 4) that would run a shell command",
         ["eval", "{fx}/malicious.pkl"], "malicious.pkl"),
    Case("probe-checkpoint-truncated", "probe of a checkpoint cut short",
         ["probe", "attention-distance", "{fx}/truncated.pt", "--out", "{out}"], "not a readable checkpoint"),
    # eval options
    Case("eval-unknown-split", "--split other than train/test", ["eval", "{fx}/run/ckpt.pt", "--split", "val"],
         "unknown split 'val'; valid: train, test"),
    Case("eval-batch-size-zero", "eval --batch-size 0", ["eval", "{fx}/run/ckpt.pt", "--batch-size", "0"],
         "--batch-size must be at least 1"),
    Case("eval-data-wrong-shape", "eval on a data set of another image shape",
         ["eval", "{fx}/run/ckpt.pt", "--data", "shapes-8"], "the model needs (1, 8, 8)"),
    # probe options
    Case("probe-no-model", "a probe without a model", ["probe", "attention-distance"], "needs a model"),
    Case("probe-unknown-option", "--opt with a name no chosen probe reads",
         ["probe", "attention-distance", "vit-n/2", "--opt", "nope=1", "--out", "{out}"],
         "unknown setting '--nope' for attention-distance; valid: --images, --batch-size, --seed, --device, "
         "--timesteps, --over-training, --query-block"),
    Case("probe-over-training-no-snapshots", "--over-training on a run trained without snapshots",
         ["probe", "attention-distance", "{fx}/run", "--over-training", "--out", "{out}"],
         "keeps no snapshot: train it with --snapshots=8 (or every:K, or a list of epochs) to probe it with "
         "--over-training"),
    Case("probe-query-block-zero", "--opt query_block=0",
         ["probe", "attention-distance", "vit-n/2", "--opt", "query_block=0", "--out", "{out}"],
         "--query-block must be a positive integer"),
    Case("probe-query-outside-image", "an attention-maps query pixel outside the image",
         ["probe", "attention-maps", "vit-n/2", "--query", "99,99", "--out", "{out}"], "0 <= row < 8"),
    Case("probe-per-head-not-a-flag", "--opt per_head=maybe",
         ["probe", "attention-maps", "vit-n/2", "--opt", "per_head=maybe", "--out", "{out}"],
         "--per-head must be true or false"),
    Case("probe-all-bad-option-value", "probe all with a bad value for the last probe's option (nothing is written "
         "for the first probes either)", ["probe", "all", "vit-n/2", "--opt", "ig_steps=0", "--out", "{out}"],
         "--ig-steps must be a whole number >= 1"),
    Case("probe-window-size-one", "--opt window_sizes=1",
         ["probe", "permutation", "vit-n/2", "--opt", "window_sizes=1", "--out", "{out}"],
         "--window-sizes and --tile-grids must be >= 2"),
    Case("probe-swap-distance-below-one", "--opt swap_distances=0.5",
         ["probe", "permutation", "vit-n/2", "--opt", "swap_distances=0.5", "--out", "{out}"],
         "reaches no other pixel"),
    Case("probe-images-zero", "--images 0", ["probe", "attention-distance", "vit-n/2", "--images", "0", "--out", "{out}"],
         "--images must be at least 1"),
    Case("probe-model-kw-on-checkpoint", "--model-kw for a checkpoint",
         ["probe", "attention-distance", "{fx}/run/ckpt.pt", "--model-kw", "depth=2", "--out", "{out}"],
         "apply to registry and timm: models, not to checkpoints"),
    Case("probe-data-wrong-shape", "probe a checkpoint on data of another shape",
         ["probe", "attention-distance", "{fx}/run/ckpt.pt", "--data", "shapes-16", "--out", "{out}"],
         "has images of shape (3, 16, 16); the model takes (1, 8, 8)"),
    # weights trained elsewhere
    Case("probe-pretrained-and-weights", "--pretrained and --weights together",
         ["probe", "attention-distance", "timm:test_vit.r160_in1k", "--pretrained", "--weights", "{tmp}/w.safetensors",
          "--out", "{out}"], "give --pretrained or --weights, not both"),
    Case("probe-pretrained-registry-model", "--pretrained for a registry model",
         ["probe", "attention-distance", "pit-n", "--pretrained", "--out", "{out}"],
         "--pretrained applies to timm:NAME models"),
    Case("probe-pretrained-unknown-tag", "a pretrained tag timm does not have",
         ["probe", "attention-distance", "timm:test_vit.no_such_tag", "--pretrained", "--out", "{out}"],
         "timm has no pretrained tag 'no_such_tag' for test_vit; tags: r160_in1k"),
    Case("probe-pretrained-none-exist", "--pretrained for an architecture timm has no weights for",
         ["probe", "attention-distance", "timm:vit_small_patch16_18x2_224", "--pretrained", "--out", "{out}"],
         "timm has no pretrained weights for vit_small_patch16_18x2_224"),
    Case("probe-weights-disagree-with-model-kw", "--weights FILE for a timm: model shaped by --model-kw, the "
         "file's shapes other than the options' (patch 1 in the file, patch_size=2 given)",
         ["probe", "attention-distance", "timm:vit_tiny_patch16_224", "--model-kw", "patch_size=2", "--model-kw",
          "embed_dim=32", "--model-kw", "depth=3", "--model-kw", "num_heads=2", "--weights", "{tmp}/w.safetensors",
          "--out", "{out}"], "the first pos_embed: file (1, 65, 32), model (1, 17, 32)", setup=_shaped_timm_weights),
    Case("probe-weights-of-another-model", "--weights of one timm model for another",
         ["probe", "attention-distance", "timm:test_vit2", "--weights", "{tmp}/test_vit.safetensors", "--out", "{out}"],
         "do not fit timm:test_vit2", setup=_test_vit_weights),
    Case("study-pretrained-registry-model", "a study model with pretrained = true that is not a timm: model",
         ["study", "run", "{tmp}/study.toml", "--out", "{out}"], "pretrained = true applies to timm:NAME models",
         setup=_pretrained_registry_study),
    # outputs
    Case("probe-out-is-a-file", "probe --out naming a file", ["probe", "attention-distance", "vit-n/2", "--out", "{fx}/a-file"],
         "is a file, not a folder"),
    Case("report-out-is-a-file", "report --out naming a file", ["report", "{tmp}/empty", "--out", "{fx}/a-file"],
         "is a file, not a folder", setup=_empty_folder),
    Case("train-out-is-a-file", "train --out naming a file", ["train", "pit-n", "digits", "--epochs", "1", "--out", "{fx}/a-file"], "a-file", before_data=True),
    Case("report-unknown-format", "report --format docx", ["report", "{tmp}/empty", "--out", "{out}", "--format", "docx"],
         "unknown report format 'docx'"),
    Case("report-corrupt-run-json", "a run folder whose run.json is not JSON", ["report", "{tmp}/run", "--out", "{out}"],
         "run.json is not readable JSON", setup=_bad_run_json),
    Case("plot-not-a-probe-table", "plot of a CSV that is not a probe table",
         ["plot", "attention-distance", "{fx}/metrics.csv", "--out", "{out}"], "is not a probe table: no column 'model'"),
    Case("plot-other-probe-table", "plot of another probe's table",
         ["plot", "attention-distance", "{fx}/permutation.csv", "--out", "{out}"],
         "is a permutation table, not attention-distance"),
    Case("demo-committed-report", "demo --report-dir naming a folder that holds a report (the committed reports/demo)",
         ["demo", "--out", "{out}", "--report-dir", "{tmp}/report"], "already holds a report", setup=_committed_report),
    # studies
    Case("study-not-text", "a binary file as a study", ["study", "run", "{fx}/binary.toml", "--out", "{out}"],
         "not a study file (not UTF-8 text)"),
    study_case("study-missing-name", "a study without [study] name (the line removed)", lambda s: s.replace('name = "tiny"\n', ""),
               "[study] needs 'name'"),
    study_case("study-unknown-key", "a misspelt key in [[models]] (`lr_max = 0.1`)",
               lambda s: s.replace('model = "resnet-n"', 'model = "resnet-n"\nlr_max = 0.1'),
               "line 12: unknown key 'lr_max' in [[models]] entry 1"),
    study_case("study-seeds-wrong-type", "seeds as a string (`seeds = \"0\"`)", lambda s: s.replace('dataset = "digits"', 'dataset = "digits"\nseeds = "0"'),
               "[study] seeds must be a non-empty list of integers"),
    study_case("study-scale-seeds-repeated", "a scale whose seeds repeat one (`[scale.small] seeds = [0, 0]`): two runs in one folder",
               lambda s: s + "\n[scale.small]\nseeds = [0, 0]\n", "line 18: [scale.small] seeds must be distinct"),
    study_case("study-permute-pixels-twice", "permute_pixels in [study] (every model both ways) and in a model's recipe",
               lambda s: s.replace('dataset = "digits"', 'dataset = "digits"\npermute_pixels = 3')
               .replace('model = "resnet-n"', 'model = "resnet-n"\npermute_pixels = 1'),
               "line 13: permute_pixels is set in [study], which trains every model on natural and on permuted pixels"),
    study_case("study-permute-pixels-path", "permute_pixels that is a path, not a seed (`permute_pixels = \"/../../../escaped\"`: it became part of a run folder's path)",
               lambda s: s.replace('dataset = "digits"', 'dataset = "digits"\npermute_pixels = "/../../../escaped"'),
               "permute_pixels must be an integer seed"),
    study_case("study-model-not-a-string", "a model that is a number (`model = 5`)", lambda s: s.replace('model = "resnet-n"', "model = 5"),
               "[[models]] entry 1: model must be a string"),
    study_case("study-recipe-bad-value", "a recipe value out of range (`lr = -1.0`)", lambda s: s.replace("epochs = 1", "epochs = 1\nlr = -1.0"),
               "model 'resnet-n': lr must be a positive number"),
    study_case("study-recipe-out", "a recipe that tries to place the runs (`out = \"/tmp/elsewhere\"`)",
               lambda s: s.replace("epochs = 1", 'epochs = 1\nout = "/tmp/elsewhere"'), "unknown key 'out' in [recipe]"),
    study_case("study-probe-images-not-a-number", "[probes] images as a string (`images = \"many\"`)",
               lambda s: s.replace("images = 8", 'images = "many"'), "[probes] images must be a whole number >= 1"),
    study_case("study-probe-run-not-a-list", "[probes] run as a number (`run = 5`)", lambda s: s.replace('run = ["permutation"]', "run = 5"),
               "[probes] run must be a probe name or a list of them"),
    study_case("study-probe-unknown-option", "[probes] options with a name no probe reads (`options = { nope = 1 }`)",
               lambda s: s.replace("images = 8", "images = 8\noptions = { nope = 1 }"), "unknown setting 'nope'"),
    study_case("study-probe-bad-option-value", "[probes] options with a bad value (`options = { window_sizes = 1 }`)",
               lambda s: s.replace("images = 8", "images = 8\noptions = { window_sizes = 1 }"),
               "[probes] window_sizes and tile_grids must be >= 2"),
    study_case("study-scale-not-a-table", "scale.NAME that is not a table (`[scale]` with `small = 3`)", lambda s: s + "\n[scale]\nsmall = 3\n",
               "'scale.small' must be a [scale.small] table"),
    study_case("study-unknown-scale", "--scale that the file does not define", lambda s: s, "unknown scale 'huge'",
               "--scale", "huge"),
    study_case("study-jobs-zero", "--jobs 0", lambda s: s, "--jobs must be at least 1", "--jobs", "0"),
    Case("study-out-holds-a-study", "study run into a folder that holds a study, without --resume",
         ["study", "run", "{tmp}/study.toml", "--out", "{out}"], "already holds a study; pass --resume",
         setup=_existing_study),
    # diffusion: training, sampling, evaluating samples, probing at noise levels
    Case("train-diffusion-classifier-model", "--task diffusion for a model that is not a DiT",
         [*TRAIN, "--task", "diffusion"], "--task diffusion trains a diffusion transformer", before_data=True),
    Case("train-dit-as-classifier", "a DiT trained without --task diffusion",
         ["train", "dit-n/2", "digits", "--epochs", "1", "--out", "{out}"],
         "dit-n/2 is a diffusion transformer: train it with --task diffusion", before_data=True),
    Case("train-task-mae", "train --task mae (pre-training has its own command)", [*TRAIN, "--task", "mae"],
         "use `localitylab pretrain mae`", before_data=True),
    Case("train-unknown-task", "an unknown --task", [*TRAIN, "--task", "segment"], "--task must be one of classify, mae, diffusion; got 'segment'",
         before_data=True),
    Case("label-dropout-for-a-classifier", "--label-dropout without --task diffusion", [*TRAIN, "--label-dropout", "0.2"],
         "--label-dropout applies to --task diffusion only", before_data=True),
    Case("diffusion-with-mixup", "--mixup for a diffusion run",
         ["train", "dit-n/2", "digits", "--task", "diffusion", "--mixup", "0.8", "--epochs", "1", "--out", "{out}"],
         "--task diffusion takes no --linear-probe, --mixup, --cutmix or --drop-path", before_data=True),
    Case("eval-diffusion-run", "eval of a diffusion run (it classifies nothing)", ["eval", "{fx}/dit-run/ckpt.pt"],
         "is a diffusion run: it classifies nothing"),
    Case("sample-a-classifier", "sample from a classifier run", ["sample", "{fx}/run", "--n", "4", "--out", "{out}"],
         "resnet-n is not a diffusion model"),
    Case("sample-unknown-sampler", "sample --sampler euler",
         ["sample", "{fx}/dit-run", "--sampler", "euler", "--out", "{out}"], "unknown sampler 'euler'; valid: ddim, dpm-solver"),
    Case("sample-steps-zero", "sample --steps 0", ["sample", "{fx}/dit-run", "--steps", "0", "--out", "{out}"],
         "--steps must be between 1 and 1000"),
    Case("sample-n-zero", "sample --n 0", ["sample", "{fx}/dit-run", "--n", "0", "--out", "{out}"],
         "--n must be at least 1"),
    Case("sample-guidance-below-one", "sample --guidance 0.5", ["sample", "{fx}/dit-run", "--guidance", "0.5", "--out", "{out}"],
         "--guidance must be at least 1"),
    Case("evaluate-samples-no-classifier", "evaluate-samples without --classifier",
         ["evaluate-samples", "{tmp}/samples", "--out", "{out}"], "evaluate-samples needs --classifier RUN",
         setup=_sample_set),
    Case("evaluate-samples-missing", "evaluate-samples of a folder with no sample set",
         ["evaluate-samples", "{tmp}/empty", "--classifier", "{fx}/run", "--out", "{out}"], "no sample set at",
         setup=_empty_folder),
    Case("evaluate-samples-dit-classifier", "evaluate-samples with a diffusion run as the classifier",
         ["evaluate-samples", "{tmp}/samples", "--classifier", "{fx}/dit-run", "--out", "{out}"],
         "dit-n/2 is a diffusion model; --classifier must name a run that classifies images", setup=_sample_set),
    Case("evaluate-samples-untrained-classifier", "evaluate-samples with an untrained classifier",
         ["evaluate-samples", "{tmp}/samples", "--classifier", "resnet-n", "--out", "{out}"],
         "--classifier resnet-n: give the run folder or checkpoint of a trained network", setup=_sample_set),
    Case("probe-timesteps-for-a-classifier", "probe --timesteps on a model that is not a denoiser",
         ["probe", "attention-distance", "{fx}/run", "--timesteps", "10", "--out", "{out}"],
         "--timesteps applies to diffusion models"),
    Case("probe-timesteps-not-integers", "probe --timesteps that are not integers",
         ["probe", "attention-distance", "{fx}/dit-run", "--timesteps", "high,low", "--out", "{out}"],
         "--timesteps must be integers separated by commas"),
    Case("probe-timesteps-outside-schedule", "probe --timesteps past the model's schedule",
         ["probe", "attention-distance", "{fx}/dit-run", "--timesteps", "1000", "--out", "{out}"],
         "--timesteps must be integers from 0 to 999"),
]


def _params():
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        yield pytest.param(case, id=case.id, marks=marks)


class ReachedDataLoading(BaseException):
    """Raised by every data set loader in a `before_data` case (BaseException: nothing catches it)."""


@contextlib.contextmanager
def data_loading_forbidden(enabled: bool = True):
    from localitylab.data import registry  # the package registers every loader on import

    saved = dict(registry._DATASETS)

    def refuse(*args, **kwargs):
        raise ReachedDataLoading("a bad setting reached data loading; it should be refused before")

    try:
        if enabled:
            for name, entry in saved.items():
                registry._DATASETS[name] = dataclasses.replace(entry, loader=refuse)
        yield
    finally:
        registry._DATASETS.clear()
        registry._DATASETS.update(saved)


def run_case(case: Case, fx: Path, tmp: Path):
    """Run one case in `tmp` (the working folder); returns (result, files before, files after)."""
    if case.setup:
        case.setup(tmp)
    # The decoded-image cache too: a bad image must not leave an entry there either.
    roots = [fx, tmp, Path(os.environ.get("LOCALITYLAB_CACHE_DIR", tmp))]
    before = tree(*roots)
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        with data_loading_forbidden(case.before_data):
            result = run_cli(case.argv(fx, tmp))
    finally:
        os.chdir(cwd)
    return result, before, tree(*roots)


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-input-files")
    make_fixtures(root)
    return root


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input_is_one_line_status_2_and_writes_nothing(case: Case, fx: Path, tmp_path: Path):
    result, before, after = run_case(case, fx, tmp_path)
    assert_one_line_error(result, case.message)
    assert after == before, f"written: {sorted(after - before)}; removed: {sorted(before - after)}"
    assert not [p for p in after if p.endswith(".tmp")]


def test_catalogue_is_large_and_its_ids_unique():
    ids = [case.id for case in CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)


# --- names that become folders stay inside their folder -------------------------------------------
# An explicit --out (train, probe, report, study) is the user's own path and is used as given;
# these check the folders localitylab derives from names: run, study, label, scale and probe names.

ESCAPING_LABELS = ["../../x", "/etc/passwd", "..", "a/../../b", "~root", "C:\\evil"]


def test_study_names_and_labels_cannot_leave_the_output_folder(tmp_path):
    import json

    from localitylab.studies import load_study, make_plan

    text = STUDY.replace('name = "tiny"', 'name = "../../up"\nseeds = [0, 1]\npermute_pixels = 3')
    text = text.replace('[[models]]\nmodel = "resnet-n"\n', "".join(
        f'[[models]]\nmodel = "resnet-n"\nlabel = {json.dumps(label)}\n' for label in ESCAPING_LABELS))
    (tmp_path / "study.toml").write_text(text)
    study = load_study(tmp_path / "study.toml")
    assert study.name == "up"
    out = tmp_path / "out"
    plan = make_plan(study, out)
    assert len(plan.train) == len(ESCAPING_LABELS) * 2 * 2
    for piece in plan.train:
        assert piece.run_dir.parent == out / "runs" and piece.run_dir.name not in (".", "..")
        assert piece.run_dir.resolve().is_relative_to((out / "runs").resolve())


def test_default_study_folder_stays_under_runs_whatever_the_scale_is_called(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import localitylab.studies
    from cli.study import run_study_command

    escaping = "../../../escape"
    (tmp_path / "study.toml").write_text(STUDY.replace('name = "tiny"', 'name = "../up"')
                                         + f'\n[scale."{escaping}"]\ndataset = "digits"\n')
    used = []
    monkeypatch.setattr(localitylab.studies, "run_study",
                        lambda study, out, **kw: used.append(Path(out)) or SimpleNamespace(report={}, failed={}))
    monkeypatch.chdir(tmp_path)
    assert run_study_command(tmp_path / "study.toml", None, escaping, 1, False, None) == 0
    (out,) = used
    assert out.parent == Path("runs") and out.name not in (".", "..") and out.name.startswith("up-")


@pytest.mark.parametrize("name", ["timm:../../x", "timm:/etc/x", "timm:..", "vit-n/2"])
def test_probe_default_folder_stays_under_probes(name):
    from localitylab.models.registry import ModelSpec
    from localitylab.probes.target import ProbeTarget

    target = ProbeTarget(model=None, spec=ModelSpec(name, 8, 1, 10), data=None, info=None, display_name=name,
                         source=name, device="cpu")
    out = target.default_out_dir()
    assert out.parent == Path("probes") and out.name not in (".", "..")



# --- issue 29: offline in one line, suggestions, commands that do what they say ----------------

def test_hub_unreachable_is_one_line_without_retries(tmp_path, monkeypatch):
    """--pretrained with the hub unreachable (HF_HUB_OFFLINE unset, HF_ENDPOINT a closed local
    port: no real network): one connection attempt, then the cache only; one line, status 2.
    Without it huggingface_hub retried five times (about 55 s, 22 lines)."""
    import time

    from huggingface_hub import constants

    from localitylab import network

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    network.reset()
    import huggingface_hub.file_download  # noqa: F401 - imports before the clock: it times the network part
    import timm  # noqa: F401

    import localitylab.probes  # noqa: F401
    try:
        started = time.monotonic()
        result = run_cli(["probe", "attention-distance", "timm:test_vit.r160_in1k", "--pretrained",
                          "--out", str(tmp_path / "out")])
        took = time.monotonic() - started
        assert constants.HF_HUB_OFFLINE  # switched for the rest of the process
    finally:
        network.reset()
    assert_one_line_error(result, "not in the local hub cache")
    assert "the hub (http://127.0.0.1:9) could not be reached" in result.err
    assert "Retry" not in result.err and not (tmp_path / "out").exists()
    assert took < 10, f"{took:.1f} s: the hub was retried"  # a guard only: retries took about 55 s
    assert not constants.HF_HUB_OFFLINE  # reset() undid what the module switched


def test_hf_data_set_with_the_hub_unreachable_is_one_line(tmp_path, monkeypatch):
    """`train pit-n hf:NAME` with the hub unreachable and nothing cached: one line naming why."""
    import datasets
    from huggingface_hub import constants

    from localitylab import network

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    network.reset()
    try:
        result = run_cli(["train", "pit-n", "hf:uoft-cs/cifar10", "--out", str(tmp_path / "out")])
    finally:
        network.reset()
    assert_one_line_error(result, "hf:uoft-cs/cifar10 is not in the local Hugging Face cache and the hub "
                                  "(http://127.0.0.1:9) could not be reached")
    assert "Retry" not in result.err and not (tmp_path / "out").exists()


def test_download_with_no_network_says_once_what_to_put_where(tmp_path, monkeypatch):
    """--download when the mirrors' names do not resolve: no second mirror tried, one line that
    says once which files to put where (it said "put ... by hand" once per mirror)."""
    import socket
    import urllib.request

    import torchvision.datasets

    from localitylab.data import files

    tried = []

    def no_network(url, timeout=None):
        tried.append(url)
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(files, "_NO_NETWORK", [])
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["https://a.invalid/", "https://b.invalid/"])
    result = run_cli(["train", "vit-n/4", "mnist", "--download", "--data-dir", str(tmp_path / "data"),
                      "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz")
    assert result.err.count("by hand") == 1 and len(tried) == 1
    assert not list((tmp_path / "data").rglob("*.gz"))


def test_probe_names_take_underscores():
    from localitylab.probes import get_probe

    assert get_probe("attention_distance").name == "attention-distance"


def test_probe_and_plot_write_nothing_in_the_current_folder_but_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli(["probe", "attention-distance", "vit-n/2", "--images", "4"])
    assert result.status == 0, result.err
    table = tmp_path / "runs" / "probes" / "vit-n-p2" / "attention-distance.csv"
    assert table.is_file()
    result = run_cli(["plot", "attention-distance", str(table)])
    assert result.status == 0, result.err
    assert (tmp_path / "runs" / "plots" / "attention-distance" / "attention-distance.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_a_run_is_evaluated_on_the_data_in_its_own_data_folder(tmp_path):
    """A run trained with --data-dir D (run.json / the checkpoint's config) reads its data set
    from D when no --data-dir is given."""
    import torch

    from localitylab.models.registry import ModelSpec, build_model
    from localitylab.train.checkpoint import save_checkpoint
    from tests.dataset_fixtures import write_idx_dataset

    data_dir = tmp_path / "elsewhere"
    write_idx_dataset(data_dir / "FashionMNIST" / "raw")
    spec = ModelSpec("resnet-n", 28, 1, 10)
    info = {"name": "fashion-mnist", "img_size": 28, "in_chans": 1, "class_names": [str(i) for i in range(10)],
            "mean": [0.5], "std": [0.5]}
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "run" / "ckpt.pt", {
        "model_spec": spec.to_dict(), "model_state": build_model(spec).state_dict(), "data": info,
        "config": {"data_dir": str(data_dir), "dataset": "fashion-mnist"}, "epoch": 1})
    result = run_cli(["eval", str(checkpoint)])
    assert result.status == 0, result.err
    assert "on fashion-mnist (test, 6 images)" in result.out


@pytest.mark.parametrize("args, title", [(["models", "--data", "digits"], "models on digits at 8x8x1, 10 classes"),
                                         (["datasets"], "localitylab data sets")])
def test_listings_fit_80_columns(args, title):
    result = run_cli(args)
    assert result.status == 0, result.err
    assert title in result.out
    assert max(len(line) for line in result.out.splitlines()) <= 80


def test_a_warmup_as_long_as_the_run_is_shortened_and_said(caplog):
    import torch.nn as nn

    from localitylab.train.config import TrainConfig
    from localitylab.train.loop import _optimiser, warmup_steps

    assert warmup_steps(5, 1, 1) == 0 and warmup_steps(5, 10, 20) == 4 and warmup_steps(1, 10, 30) == 10
    said = []
    reporter = type("Reporter", (), {"message": lambda self, text: said.append(text)})()
    config = TrainConfig("resnet-n", "digits", epochs=1, batch_size=64, warmup_epochs=5)
    with caplog.at_level("WARNING"):
        _, scheduler = _optimiser(nn.Linear(2, 2), config, 10, reporter)
    assert said == ["warm-up of 5 epochs is at least as long as the run (1 epoch): shortened to 0 of its 1 steps "
                    "(a fifth)"]
    assert scheduler.warmup_t == 0 and "Cosine annealing" not in caplog.text


def test_pos_embed_std_for_a_convnet_is_not_recorded():
    from localitylab.errors import UserError
    from localitylab.train.config import TrainConfig

    with pytest.raises(UserError) as refused:
        TrainConfig("resnet-n", "digits", pos_embed_std=1.0)
    assert refused.value.settings[0] == "pos_embed_std"  # the library names the setting; the CLI, its flag
    assert "pos_embed_std" not in TrainConfig("resnet-n", "digits").command()


def test_shaped_timm_weights_give_the_table_of_the_same_model_probed_in_python(tmp_path):
    """Issue 29 point 7: a timm ViT shaped by --model-kw for digits, its weights in a file, probed
    from the command line, gives the table of the same model built in Python and probed with
    localitylab.probe on the same images, normalised as digits are."""
    import pandas as pd
    import timm
    from safetensors.torch import load_file

    import localitylab
    from localitylab.data import load_dataset
    from localitylab.probes.sources import select_images

    _shaped_timm_weights(tmp_path)
    args = [a for key, value in SHAPED_TIMM_KW.items() for a in ("--model-kw", f"{key}={value}")]
    result = run_cli(["probe", "attention-distance", "timm:vit_tiny_patch16_224", *args, "--weights",
                      str(tmp_path / "w.safetensors"), "--data", "digits", "--images", "8", "--out", str(tmp_path / "out")])
    assert result.status == 0, result.err
    cli_table = pd.read_csv(tmp_path / "out" / "attention-distance.csv")

    model = timm.create_model("vit_tiny_patch16_224", **SHAPED_TIMM_KW, in_chans=1, img_size=8, num_classes=10)
    model.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    digits = load_dataset("digits")
    images, labels = select_images(digits, 8, seed=0)
    api_table = localitylab.probe("attention-distance", model, images, labels, preprocessing=digits.info)
    keys = ["metric", "layer", "head"]
    both = cli_table.merge(api_table, on=keys, suffixes=("_cli", "_api"))
    assert len(both) == len(api_table) == len(cli_table) > 0
    assert both["value_cli"].to_numpy() == pytest.approx(both["value_api"].to_numpy(), rel=1e-5, abs=1e-6, nan_ok=True)


# --- the doc ------------------------------------------------------------------------------------

DOC_HEAD = """\
# Bad inputs and what localitylab says

Every mistake below ends with **one line on stderr**, exit status **2**, no traceback (pass
`--debug` to see one), and **nothing written**: no new file or folder, no temporary file.
This table is the catalogue in `tests/test_bad_inputs.py`, which checks all of that for each
row; regenerate it with `.venv/bin/python tests/test_bad_inputs.py` after changing a case.

Paths in the commands: `run/ckpt.pt` is a localitylab checkpoint of `resnet-n` on digits;
`images/` is a good folder data set (`images/train/<class>/*.png`, `images/val/...`);
`no-classes/`, `text-only/`, `corrupt/` and `mismatch/` are broken ones (no class folders,
only `.txt` files, a `.png` that is not an image, different classes in train and val), and
`bomb/` and `truncated/` are `images/` plus one bad file (a decompression bomb, a JPEG cut
short); `hf-json/` is a folder of JSON lines;
`dit-run/ckpt.pt` an untrained `dit-n/2` saved as a diffusion run on digits;
`other-model.pt` holds resnet-n weights under the name pit-n; `foreign.pt` is a plain
`torch.save` of a dict; `malicious.pt` / `malicious.pkl` would run a shell command if
unpickled (nothing runs); `a-file` is a file; `study.toml` is a small valid study with the
one change the row describes; `samples` a sample set on digits; `out` is the output folder;
`w.safetensors` the weights of a timm ViT shaped for digits (`--model-kw patch_size=1
embed_dim=32 depth=3 num_heads=2`, 1 channel, 8x8); `data/` an MNIST folder with one file
cut short; `report/` a folder holding a report.

Cases that need a network that is not there, or a run of their own, are tests of their own
in the same file (same contract: one line, status 2, nothing written):

- the Hugging Face hub unreachable (`HF_HUB_OFFLINE` unset, `HF_ENDPOINT` a closed port), `probe
  attention-distance timm:test_vit.r160_in1k --pretrained`: `timm:test_vit.r160_in1k:
  pretrained weights are not in the local hub cache (...) and the hub (http://127.0.0.1:9)
  could not be reached; download them once with network, or pass --weights FILE`, in well
  under a second after the imports (one connection attempt, then offline mode for the process;
  `hf:` data sets the same way);
- `train vit-n/4 mnist --download` with no network (names do not resolve): `mnist: could not
  download train-images-idx3-ubyte.gz (...: Name or service not known); put
  train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, ... in DATA/MNIST/raw by hand`, once,
  no second mirror tried.

Commands that used to do something else than they said (tests of their own there too):
`probe`/`plot` without `--out` write under `runs/` (`runs/probes/<model>`,
`runs/plots/<probe>`), never into the current folder; a run trained with `--data-dir D` is
probed and evaluated from D; `models --data NAME` describes the zoo on NAME; `models` and
`datasets` fit 80 columns; a warm-up at least as long as the run is shortened to a fifth of
it, and said; `--weights FILE` with `--model-kw` for a timm: model gives the table of the
same model built and probed in Python; MNIST and Fashion-MNIST files are read by content
(any gzip level), the MD5 kept for `--download`.

Rows marked *pending* are not handled yet: the last column says what happens today and the
fix it needs; the case is an expected failure (`xfail`) in the tests until the fix lands.

| id | bad input | command | what the user sees |
| --- | --- | --- | --- |
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def doc_row(case: Case, seen: str) -> str:
    return f"| {case.id} | {_cell(case.what)} | `{_cell(case.command)}` | {_cell(seen)} |"


def observed_message(case: Case, fx: Path, tmp: Path, result) -> str:
    """The error line as a user sees it, with this run's temporary paths taken out."""
    line = result.err_lines[0] if result.err_lines else ""
    for path, shown in ((tmp / "out", "out"), (tmp, ""), (fx, "")):
        line = line.replace(f"{path}/", f"{shown}/" if shown else "").replace(str(path), shown or ".")
    return f"`{line}`"


# --- the Python API: `localitylab.probe` with images it cannot take ---------------------------
@dataclass
class ApiCase:
    id: str
    what: str
    call: str  # the images (and keywords) given to localitylab.probe("attention-distance", model, ...)
    message: str  # the UserError's message starts with this


API_CASES = [
    ApiCase("api-layout-ambiguous", "a shape where either end could be the channels",
            "torch.zeros(2, 1, 8, 1, dtype=torch.uint8)",
            "cannot tell whether images of shape (1, 8, 1) are (C, H, W) or (H, W, C): pass layout='NCHW' or "
            "layout='NHWC'"),
    ApiCase("api-layout-no-channels", "no axis of 1 or 3 channels at either end",
            "torch.zeros(2, 5, 8, 8, dtype=torch.uint8)", "images of shape (5, 8, 8) have no channel axis of size 1 or 3"),
    ApiCase("api-layout-unknown", "a layout that is not NCHW or NHWC",
            "torch.zeros(2, 1, 8, 8, dtype=torch.uint8), layout='CHW'", "layout must be one of NCHW, NHWC, got 'CHW'"),
    ApiCase("api-integer-images", "integer images that are not uint8", "torch.zeros(2, 1, 8, 8, dtype=torch.int64)",
            "images must be uint8 (0-255) or floats, got torch.int64"),
    ApiCase("api-mixed-dtypes", "a list mixing uint8 and float images",
            "[torch.zeros(1, 8, 8, dtype=torch.uint8), torch.zeros(1, 8, 8)]", "images mix dtypes"),
    ApiCase("api-no-images", "an empty list", "[]", "images must hold at least one image, got none"),
    ApiCase("api-floats-of-two-sizes", "float images (taken as prepared) of two sizes",
            "[torch.zeros(1, 8, 8), torch.zeros(1, 16, 16)]",
            "float images are taken as prepared (the model's input) and must share one size"),
    ApiCase("api-labels-count", "labels for another number of images",
            "torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(3)", "3 labels for 2 images"),
]


def api_error(case: ApiCase) -> str:
    """The UserError's message for one API case (a tiny ViT made for 8x8 grey images)."""
    import timm
    import torch

    import localitylab
    from localitylab.errors import UserError

    model = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=1,
                              num_heads=1, num_classes=2)
    try:
        eval(f'localitylab.probe("attention-distance", model, {case.call}, progress=False)',
             {"localitylab": localitylab, "torch": torch, "model": model})
    except UserError as error:
        return str(error)
    return "(no error)"


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_bad_images_in_python_are_one_user_error(case: ApiCase):
    assert api_error(case).startswith(case.message)


API_HEAD = """

## In Python: `localitylab.probe` with images it cannot take

Each raises one `localitylab.errors.UserError` (no library internals); the call is
`localitylab.probe("attention-distance", model, IMAGES...)` with a ViT for 8x8 grey images.

| id | bad input | images given | the error |
| --- | --- | --- | --- |
"""


def write_doc() -> None:
    """Run every case and write docs/bad-inputs.md with the messages seen."""
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        fx = Path(scratch) / "fx"
        fx.mkdir()
        make_fixtures(fx)
        for case in CASES:
            if case.xfail:  # what happens today is in the reason (some would train for minutes)
                rows.append(doc_row(case, f"*pending*: {case.xfail}"))
                continue
            tmp = Path(scratch) / case.id
            tmp.mkdir()
            result, _, _ = run_case(case, fx, tmp)
            rows.append(doc_row(case, observed_message(case, fx, tmp, result)))
            shutil.rmtree(tmp)
    api_rows = [f"| {c.id} | {_cell(c.what)} | `{_cell(c.call)}` | `{_cell(api_error(c))}` |" for c in API_CASES]
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(DOC_HEAD + "\n".join(rows) + API_HEAD + "\n".join(api_rows) + "\n", encoding="utf-8")


def test_doc_lists_every_case():
    text = DOC.read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "`" in line}
    assert sorted(rows) == sorted([c.id for c in CASES] + [c.id for c in API_CASES]), \
        "docs/bad-inputs.md is out of date: run tests/test_bad_inputs.py"
    for api in API_CASES:
        assert _cell(api.message) in rows[api.id], f"{api.id}: the message changed; regenerate the doc"
    for case in CASES:
        row = rows[case.id]
        assert f"| `{_cell(case.command)}` |" in row, f"{case.id}: the command changed; regenerate the doc"
        if case.xfail:
            assert "*pending*" in row, f"{case.id}: the doc should mark it pending"
        else:
            assert _cell(case.message) in row and "*pending*" not in row, f"{case.id}: the message changed"


if __name__ == "__main__":
    write_doc()
    print(f"wrote {DOC}")
