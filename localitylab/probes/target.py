"""What a probe looks at: a model with everything needed to feed it and to name it.

A target comes from a localitylab checkpoint (or its run folder), from a registry name
(`pit-n`, untrained: the baseline of "no learning"), or from `timm:NAME[.TAG]`, untrained
or with weights trained elsewhere (timm's pretrained weights, or a weights file). Image shapes and
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
            raise UserError(f"timesteps must be integers from 0 to {self.num_timesteps - 1} (the model's schedule), "
                            f"got {', '.join(map(str, bad)) or 'none'}", setting="timesteps")
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
    """A UserError for timesteps on a model that is not a denoiser, or outside its schedule."""
    if timesteps is None:
        return
    if target.denoising is None:
        raise UserError(f"timesteps applies to diffusion models (dit-*/P); {target.spec.name} is not one",
                        setting="timesteps")
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
