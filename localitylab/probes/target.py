"""What a probe looks at: a model with everything needed to feed it and to name it.

A target comes from a localitylab checkpoint (or its run folder), from a registry name
(`pit-n`, untrained: the baseline of "no learning"), or from `timm:NAME` with optional
`--weights`. Image shapes and normalisation come from the checkpoint, or else from the
data set the probe runs on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn as nn

from localitylab.data.registry import DataInfo, DataOptions, ImageDataset, load_dataset
from localitylab.errors import UserError
from localitylab.models.describe import ModelInfo, describe_model
from localitylab.models.registry import ModelSpec, build_model, default_pos_embed, model_kind, spec_for_data
from localitylab.train.checkpoint import load

if TYPE_CHECKING:
    from localitylab.attention import TokenGeometry
    from localitylab.diffusion.objective import DiffusionObjective
from localitylab.device import resolve_device
from localitylab.io import safe_name


@dataclass
class Denoising:
    """How a probe runs a denoiser (PROBES.md, Diffusion transformers): its images on the
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
    """A DiT's `Denoising` (its checkpoint's schedule, or the default one untrained); None for other models."""
    if model_kind(spec.name) != "dit":
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
    info: ModelInfo
    display_name: str
    source: str
    device: torch.device
    run_dir: Path | None = None  # the run folder of a checkpoint
    checkpoint: dict[str, Any] = field(default_factory=dict)  # config, metrics, epoch of a checkpoint
    # Checkpoint entries beyond the classifier that some probes need (EXTRA_KEYS, e.g. an MAE
    # checkpoint's 'mae_options' and 'mae_state' for mae-reconstruction); empty otherwise.
    extras: dict[str, Any] = field(default_factory=dict)
    denoising: Denoising | None = None  # set for a denoiser (a DiT): how to feed it

    def __post_init__(self) -> None:
        if self.denoising is None:
            self.denoising = denoising_for(self.spec, self.extras)

    @property
    def geometry(self) -> "TokenGeometry":
        """Where the model's tokens sit on the input image (transformers with a token grid)."""
        from localitylab.attention import TokenGeometry

        return TokenGeometry(tuple(self.info.grid), int(self.info.patch_size), int(self.info.num_prefix_tokens))

    @property
    def kind(self) -> str:
        """'pit', 'vit', 'dit', 'convnet' or 'timm'."""
        return model_kind(self.spec.name)

    def default_out_dir(self) -> Path:
        if self.run_dir is not None:
            return self.run_dir / "probes"
        return Path("probes") / safe_name(self.spec.name.replace("/", "-p").replace(":", "-"))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> what the model takes (permutation and normalisation applied; for a
        denoiser, the permutation and the diffusion scale [-1, 1], before any noise)."""
        images = images.to(self.device)
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
                pos_embed: str | None = None, seed: int = 0) -> tuple[ProbeTarget, ImageDataset]:
    """Resolve a model source and the data set to probe it on."""
    torch_device = resolve_device(device)
    options = data_options or DataOptions()
    if is_checkpoint_source(source):
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / "ckpt.pt"
        model = load(path, torch_device)
        run = model.run
        dataset_name = data or run.data.name
        if dataset_name.startswith("folder:") and options.img_size is None:
            options = DataOptions(options.data_dir, options.download, run.data.img_size, options.seed)
        dataset = load_dataset(dataset_name, options)
        _check_shapes(dataset, run.data)
        target = ProbeTarget(model, run.spec, run.data, describe_model(model), run.display_name, str(path),
                             torch_device, path.parent,
                             {"config": run.config, "metrics": run.metrics, "epoch": run.epoch,
                              "versions": run.versions},
                             checkpoint_extras(path))
        if model_kw or weights:
            raise UserError("--model-kw and --weights apply to registry and timm: models, not to checkpoints")
        return target, dataset

    # A registry name or timm:NAME, built here: shapes from the data set, as training does.
    dataset = load_dataset(data or "digits", options)
    info = dataset.info
    spec = spec_for_data(source, info.img_size, info.in_chans, info.num_classes,
                         pos_embed or default_pos_embed(source) or "learn", model_kw)
    torch.manual_seed(seed)
    model = build_model(spec)
    if weights:
        from localitylab.models.timm_adapter import load_weights

        load_weights(model, weights)
    model = model.to(torch_device).eval()
    name = source + (" (untrained)" if not weights else f" ({Path(weights).name})")
    target = ProbeTarget(model, spec, info, describe_model(model), name, source, torch_device)
    _check_shapes(dataset, DataInfo(info.name, spec.img_size, spec.in_chans, info.class_names, info.mean, info.std))
    return target, dataset


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
