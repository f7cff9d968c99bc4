"""DiT's training objective: predict the noise added at a uniformly drawn timestep.

DDPM's forward process (Ho et al. 2020) with its linear 1,000-step schedule (beta from
1e-4 to 0.02), as DiT trains: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, the loss the
mean squared error between eps and the model's prediction ("L_simple"). Labels are replaced
by the null class with probability `label_dropout` (10% in DiT), so one model learns the
conditional and the unconditional denoiser that classifier-free guidance combines.

Images live on the diffusion scale [-1, 1] (`to_diffusion_scale`), not the classifier's
standardisation: the samplers clip their clean-image estimate to that range.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Schedule:
    """The noise schedule a model was trained with (stored in its checkpoint)."""

    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def scheduler(self):
        """diffusers' DDPMScheduler for this schedule (noise prediction, samples clipped to [-1, 1])."""
        from diffusers import DDPMScheduler

        return DDPMScheduler(num_train_timesteps=self.num_timesteps, beta_schedule=self.beta_schedule,
                             beta_start=self.beta_start, beta_end=self.beta_end, prediction_type="epsilon",
                             clip_sample=True, clip_sample_range=1.0)


def to_diffusion_scale(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images on the diffusion scale -> uint8, rounded and clipped (the inverse of `to_diffusion_scale`)."""
    return ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def drop_labels(labels: torch.Tensor, probability: float, null_class: int, generator: torch.Generator) -> torch.Tensor:
    """Each label replaced by `null_class` with `probability`, one draw per image from `generator`."""
    if probability <= 0:
        return labels
    dropped = torch.rand(labels.shape, generator=generator, device=labels.device) < probability
    return torch.where(dropped, torch.full_like(labels, null_class), labels)


class DiffusionObjective:
    """Noise prediction under `schedule`, with label dropout for classifier-free guidance."""

    def __init__(self, schedule: Schedule | None = None, label_dropout: float = 0.1) -> None:
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label dropout must be in [0, 1), got {label_dropout}")
        self.schedule = schedule or Schedule()
        self.label_dropout = label_dropout
        self.scheduler = self.schedule.scheduler()

    def options(self) -> dict[str, Any]:
        return {"schedule": self.schedule.to_dict(), "label_dropout": self.label_dropout}

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "DiffusionObjective":
        return cls(Schedule(**options["schedule"]), float(options["label_dropout"]))

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, per image."""
        return self.scheduler.add_noise(clean, noise, timesteps)

    def draw(self, clean: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, noise) for a batch: t uniform over the schedule, eps standard normal."""
        timesteps = torch.randint(0, self.schedule.num_timesteps, (clean.shape[0],), generator=generator,
                                  device=clean.device)
        noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        return timesteps, noise

    def loss(self, model: nn.Module, clean: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
             null_class: int, train: bool = True, reduction: str = "mean") -> torch.Tensor:
        """The mean squared error of the predicted noise: mean over the batch, or per image
        (`reduction='none'`). `train=False` keeps every label (the test loss)."""
        timesteps, noise = self.draw(clean, generator)
        if train:
            labels = drop_labels(labels, self.label_dropout, null_class, generator)
        prediction = model(self.add_noise(clean, noise, timesteps), timesteps, labels)
        error = (prediction.float() - noise.float()).pow(2).flatten(1).mean(1)
        return error.mean() if reduction == "mean" else error
