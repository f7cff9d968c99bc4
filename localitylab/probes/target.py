"""What a probe looks at: a model with everything needed to feed it and to name it.

A target comes from a localitylab checkpoint (or its run folder), from a registry name
(`pit-n`, untrained: the baseline of "no learning"), or from `timm:NAME[.TAG]`, untrained
or with weights trained elsewhere (`--pretrained`, `--weights FILE`). Image shapes and
normalisation come from the checkpoint; for a timm model with weights trained elsewhere,
from the model's own pipeline (`Preprocessing`: timm's data config and transform, which
resize every data set's images to what the weights were trained on); else from the data
set the probe runs on.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn as nn

from localitylab.data.registry import DataInfo, DataOptions, ImageDataset, load_dataset
from localitylab.errors import UserError
from localitylab.models.describe import ModelDescription, describe_model
from localitylab.models.preprocessing import Preprocessing
from localitylab.models.registry import ModelSpec, build_model, default_pos_embed, is_model_name, model_kind, spec_for_data
from localitylab.train.checkpoint import load

if TYPE_CHECKING:
    from localitylab.attention import TokenGeometry
    from localitylab.diffusion.objective import DiffusionObjective
from localitylab.device import resolve_device
from localitylab.io import safe_name


@dataclass
class Denoising:
    """How a probe runs a denoiser (docs/probes.md, Diffusion transformers): its images on the
    diffusion scale, noised to a level t of the model's own schedule with noise drawn per
    image from the probe's seed (the same noise at every level), and conditioned on their
    labels, guidance off."""

    objective: DiffusionObjective

    @property
    def num_timesteps(self) -> int:
        return self.objective.schedule.num_timesteps

    def default_timesteps(self) -> list[int]:
        """999, 500, 100, 10 on a 1,000-step schedule: pure noise to nearly clean."""
        steps = self.num_timesteps
        return sorted({steps - 1, steps // 2, steps // 10, steps // 100}, reverse=True)

    def levels(self, timesteps: Sequence[int] | None) -> list[int]:
        """The noise levels to probe: `timesteps` checked against the schedule, or the defaults."""
        if timesteps is None:
            return self.default_timesteps()
        levels = [int(t) for t in timesteps]
        bad = [t for t in levels if not 0 <= t < self.num_timesteps]
        if bad or not levels:
            raise UserError(f"--timesteps must be integers from 0 to {self.num_timesteps - 1} (the model's schedule), "
                            f"got {', '.join(map(str, bad)) or 'none'}")
        return list(dict.fromkeys(levels))  # in the order given, each once

    def noised(self, clean: torch.Tensor, timestep: int, seed: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t) for the probe's images `first`, `first + 1`, ... on the diffusion scale."""
        from localitylab.diffusion.sampling import initial_noise

        noise = initial_noise(tuple(clean.shape[1:]), seed, range(first, first + len(clean))).to(clean)
        timesteps = torch.full((len(clean),), timestep, dtype=torch.long, device=clean.device)
        return self.objective.add_noise(clean, noise, timesteps), timesteps


def denoising_for(spec: ModelSpec, extras: dict[str, Any]) -> Denoising | None:
    """A DiT's `Denoising` (its checkpoint's schedule, or the default one untrained); None for other
    models, and for a model in memory (named by its class: `memory_target` says whether it is a DiT)."""
    if not is_model_name(spec.name) or model_kind(spec.name) != "dit":
        return None
    from localitylab.diffusion.objective import DiffusionObjective

    options = extras.get("diffusion_options")
    return Denoising(DiffusionObjective.from_options(options) if options else DiffusionObjective())


def check_timesteps(target: "ProbeTarget", timesteps: Sequence[int] | None) -> None:
    """A UserError for --timesteps on a model that is not a denoiser, or outside its schedule."""
    if timesteps is None:
        return
    if target.denoising is None:
        raise UserError(f"--timesteps applies to diffusion models (dit-*/P); {target.spec.name} is not one")
    target.denoising.levels(timesteps)


@dataclass
class ProbeTarget:
    model: nn.Module  # eval mode, on `device`
    spec: ModelSpec
    data: DataInfo  # how images are prepared for this model
    info: ModelDescription
    display_name: str
    source: str
    device: torch.device
    run_dir: Path | None = None  # the run folder of a checkpoint
    checkpoint: dict[str, Any] = field(default_factory=dict)  # config, metrics, epoch of a checkpoint
    # Checkpoint entries beyond the classifier that some probes need (EXTRA_KEYS, e.g. an MAE
    # checkpoint's 'mae_options' and 'mae_state' for mae-reconstruction); empty otherwise.
    extras: dict[str, Any] = field(default_factory=dict)
    # The model's own input pipeline (a timm model with weights trained elsewhere): data-set
    # images are resized by it before the probes see them; None: they are fed as they are.
    preprocessing: Preprocessing | None = None
    weights: dict[str, Any] = field(default_factory=dict)  # where the weights came from, for meta.json
    inputs_prepared: bool = False  # images given already as the model takes them (floats): `prepare` only moves them
    denoising: Denoising | None = None  # set for a denoiser (a DiT): how to feed it

    def __post_init__(self) -> None:
        if self.denoising is None:
            self.denoising = denoising_for(self.spec, self.extras)

    def no_head_reason(self) -> str:
        """Why the model's output is not class scores ('' if it is): a timm encoder built with
        num_classes = 0 returns features (pooled, or every token)."""
        if self.spec.num_classes > 0:
            return ""
        return f"{self.display_name} has no classifier head (num_classes = 0: its output is features, not class scores)"

    def accuracy_caveat(self) -> str:
        """Why the model's accuracy on this data set may not mean what it says ('' if nothing)."""
        if "mae_options" in self.extras:
            return "MAE encoder: its classifier head is untrained, so accuracies are near chance"
        if self.weights and self.data.class_names:
            if self.spec.num_classes != self.data.num_classes:
                return (f"the model has {self.spec.num_classes} classes and {self.data.name} {self.data.num_classes}: "
                        "its accuracy on these labels does not measure it")
            return f"accuracies take {self.data.name}'s class indices to be the model's classes"
        return "" if self.checkpoint or self.weights else "untrained model: accuracies are near chance"

    def model_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images of the data set -> uint8 images as the model takes them (its own
        pipeline's resize and crop; unchanged for a model built for the data set)."""
        return images if self.preprocessing is None else self.preprocessing.resize(images)

    @property
    def geometry(self) -> "TokenGeometry":
        """Where the model's tokens sit on the input image (transformers with a token grid)."""
        from localitylab.attention import TokenGeometry

        side = self.data.img_size
        grid = self.info.grid_for((side, side))
        if grid is None:
            # No one token grid (stages, several grids): the image itself, one pixel per cell, for
            # the attention adapters that place their own tokens on it (they read its shape).
            return TokenGeometry((side, side), 1, 0)
        return TokenGeometry(tuple(grid), self.info.patch_size, int(self.info.num_prefix_tokens))

    @property
    def kind(self) -> str:
        """'pit', 'vit', 'dit', 'convnet' or 'timm'; for a model in memory that the registry did not
        build, 'dit' if it is a denoiser, else 'module'."""
        if is_model_name(self.spec.name):
            return model_kind(self.spec.name)
        return "dit" if self.denoising is not None else "module"

    def default_out_dir(self) -> Path:
        if self.run_dir is not None:
            return self.run_dir / "probes"
        return Path("probes") / safe_name(self.spec.name.replace("/", "-p").replace(":", "-"))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> what the model takes (permutation and normalisation applied; for a
        denoiser, the permutation and the diffusion scale [-1, 1], before any noise)."""
        images = images.to(self.device)
        if self.inputs_prepared:
            return images
        if self.denoising is None:
            return self.data.prepare(images)
        from localitylab.diffusion.objective import to_diffusion_scale

        if self.data.permutation is not None:
            from localitylab.data.permutation import permute_pixels

            images = permute_pixels(images, self.data.permutation.to(images.device))
        return to_diffusion_scale(images)


def is_checkpoint_source(source: str) -> bool:
    path = Path(source).expanduser()
    return path.suffix == ".pt" or path.is_dir() or path.is_file()


def load_target(source: str, device: str = "auto", data: str | None = None, data_options: DataOptions | None = None,
                model_kw: dict[str, Any] | None = None, weights: str | None = None,
                pos_embed: str | None = None, seed: int = 0, pretrained: bool = False) -> tuple[ProbeTarget, ImageDataset]:
    """Resolve a model source and the data set to probe it on."""
    torch_device = resolve_device(device)
    options = data_options or DataOptions()
    if pretrained and weights:
        raise UserError("give --pretrained (timm's own weights) or --weights FILE, not both")
    if pretrained and not source.startswith("timm:"):
        raise UserError(f"--pretrained applies to timm:NAME models (timm's pretrained weights), not to {source}")
    # A user's weights for a timm model they shaped (model_kw) are fed as that model takes them: below.
    if source.startswith("timm:") and (pretrained or (weights and not model_kw)):
        return load_timm_target(source, torch_device, data, options, model_kw, weights)
    if is_checkpoint_source(source):
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / "ckpt.pt"
        model = load(path, torch_device)
        run = model.run
        dataset_name = data or run.data.name
        dataset = load_dataset(dataset_name, run.data_options(dataset_name, options))
        _check_shapes(dataset, run.data)
        target = loaded_target(model, torch_device)
        if model_kw or weights:
            raise UserError("--model-kw and --weights apply to registry and timm: models, not to checkpoints")
        return target, dataset

    # A registry name or timm:NAME, built here: shapes from the data set, as training does.
    dataset = load_dataset(data or "digits", options)
    info = dataset.info
    spec = spec_for_data(source, info.img_size, info.in_chans, info.num_classes, pos_embed or default_pos_embed(source) or "learn", model_kw)
    torch.manual_seed(seed)
    model = build_model(spec)
    if weights:
        from localitylab.models.timm_adapter import load_weights

        load_weights(model, weights)
    model = model.to(torch_device).eval()
    name = source + (" (untrained)" if not weights else f" ({Path(weights).name})")
    target = ProbeTarget(model, spec, info, describe_model(model), name, source, torch_device,
                         weights={"file": str(Path(weights).resolve())} if weights else {})
    _check_shapes(dataset, DataInfo(info.name, spec.img_size, spec.in_chans, info.class_names, info.mean, info.std))
    return target, dataset


def loaded_target(model: nn.Module, device: torch.device) -> ProbeTarget:
    """The target of a model `localitylab.load` returned (its `run` says what it is)."""
    run = model.run
    path = Path(run.path) if run.path is not None else None
    return ProbeTarget(model, run.spec, run.data, describe_model(model), run.display_name,
                       str(path) if path else run.spec.name, device, path.parent if path else None,
                       {"config": run.config, "metrics": run.metrics, "epoch": run.epoch, "versions": run.versions},
                       checkpoint_extras(path) if path else {})


def load_timm_target(source: str, device: torch.device, data: str | None, options: DataOptions,
                     model_kw: dict[str, Any] | None, weights: str | None) -> tuple[ProbeTarget, ImageDataset]:
    """A timm model with weights trained elsewhere (`weights` a file, or None for timm's
    pretrained weights), at the shapes they were trained for and fed by its own pipeline.
    `options.img_size` (--img-size) is the model's input size, given on purpose."""
    from localitylab.models.registry import parse_model_name
    from localitylab.models.timm_adapter import PRETRAINED, build_timm_pretrained

    parse_model_name(source)
    name = source[len("timm:"):]
    model_kw = dict(model_kw or {})
    img_size = options.img_size
    if "img_size" in model_kw:
        if img_size is not None and int(model_kw["img_size"]) != img_size:
            raise UserError(f"--img-size {img_size} and --model-kw img_size={model_kw['img_size']} disagree")
        img_size = int(model_kw.pop("img_size"))
    model = build_timm_pretrained(name, weights or PRETRAINED, img_size, model_kw).to(device).eval()
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    architecture = cfg.get("architecture") or name.split(".")[0]
    if weights:
        display, described = f"timm:{architecture} ({Path(weights).name})", {"file": str(Path(weights).resolve())}
    else:
        tagged = f"{architecture}.{cfg['tag']}" if cfg.get("tag") else architecture
        display = f"timm:{tagged}"
        described = {"pretrained": tagged, "hf_hub_id": cfg.get("hf_hub_id"), "url": cfg.get("url") or None,
                     "license": cfg.get("license")}
    origin = f"{'--weights file' if weights else 'pretrained_cfg'} of timm:{architecture}"
    preprocessing = Preprocessing.of_model(model, img_size, source=f"timm data config ({origin})"
                                           + (f", --img-size {img_size}" if img_size else ""))
    dataset = load_dataset(data or "digits", _decoding_options(data or "digits", options, preprocessing))
    info = DataInfo(dataset.info.name, preprocessing.img_size, preprocessing.input_size[0],
                    list(dataset.info.class_names), list(preprocessing.mean), list(preprocessing.std))
    spec = ModelSpec(display.split(" ")[0], preprocessing.img_size, preprocessing.input_size[0],
                     int(getattr(model, "num_classes", 0) or 0), None, model_kw)
    target = ProbeTarget(model, spec, info, describe_model(model), display, source, device,
                         preprocessing=preprocessing, weights=described)
    return target, dataset


def _decoding_options(dataset_name: str, options: DataOptions, preprocessing: Preprocessing) -> DataOptions:
    """The data set is read for the model's pipeline: a data set of image files is decoded at
    the pipeline's resize side (its shorter side to floor(size / crop_pct), centre-cropped to a
    square), where the pipeline then takes its centre crop; a data set of fixed size is read as
    it is and resized by the pipeline."""

    size = preprocessing.scale_size if dataset_name.startswith("folder:") else None
    return dataclasses.replace(options, img_size=size)


# Checkpoint keys copied into ProbeTarget.extras when present.
EXTRA_KEYS = ("mae_options", "mae_state", "diffusion_options")


def checkpoint_extras(path: Path) -> dict[str, Any]:
    """The EXTRA_KEYS entries of a checkpoint that `load` has already validated.

    Memory-mapped, so the model weights and optimizer state are not read a second time;
    the (small) entries kept are copied off the mapping.
    """
    from localitylab.io import safe_torch_load

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, ValueError, OSError):  # a legacy (non-zip) file cannot be mapped
        data = safe_torch_load(path)

    def detach(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, dict):
            return {k: detach(v) for k, v in value.items()}
        return value

    return {key: detach(data[key]) for key in EXTRA_KEYS if key in data}


def _check_shapes(dataset: ImageDataset, expected: DataInfo) -> None:
    got = tuple(dataset.test_images.shape[1:])
    want = (expected.in_chans, expected.img_size, expected.img_size)
    if got != want:
        raise UserError(f"data set {dataset.name} has images of shape {got}; the model takes {want}")


def select_images(dataset: ImageDataset, n_images: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of the test split (all of it when it is smaller)."""
    if n_images < 1:
        raise UserError(f"--images must be at least 1, got {n_images}")
    images, labels = dataset.test_images, dataset.test_labels
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n_images]
    return images[order], labels[order]
