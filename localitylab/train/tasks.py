"""What a training run optimises. The loop is the same for every task; a task says which
module trains, what its loss is, how it is evaluated and what it adds to the checkpoint.

- `Classification`: cross-entropy (label smoothing, mixup/cutmix), accuracy.
- `MaskedAutoencoding`: MAE pre-training of a PiT or ViT encoder; the loss is the
  reconstruction error on the masked tokens. The checkpoint's `model_state` is the encoder
  alone, so every probe, `init_from` and `localitylab.load()` read it as an ordinary model.
- `DenoisingTask`: a DiT's noise prediction (`localitylab.diffusion`: DDPM's linear 1,000-step
  schedule, labels dropped to the null class for classifier-free guidance); images on the
  diffusion scale [-1, 1]. The test loss is the same objective on the test split with every
  label kept and the same noise and timesteps every epoch. The checkpoint carries
  `diffusion_options` (the schedule), from which probes and samplers rebuild it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from localitylab.data.batching import batch_generator, eval_batches
from localitylab.data.registry import DataInfo
from localitylab.train.config import TrainConfig

Sums = dict[str, torch.Tensor]  # loss_sum, correct, count: summed over images (and ranks)


def sums_to_means(sums: Sums) -> dict[str, float]:
    """{'loss', 'accuracy'}: the summed test figures divided by the image count."""
    count = max(1, int(sums["count"]))
    return {"loss": float(sums["loss_sum"]) / count, "accuracy": int(sums["correct"]) / count}


@contextmanager
def evaluating(module: nn.Module) -> Iterator[torch.device]:
    """Eval mode for the block (the module's device is yielded); the train mode is restored."""
    was_training = module.training
    module.eval()
    try:
        yield next(module.parameters()).device
    finally:
        module.train(was_training)


def split_sums(loss_sum: torch.Tensor, images: torch.Tensor, correct: torch.Tensor | None = None) -> Sums:
    """The `Sums` of a test split: its summed loss, correct predictions (none for tasks without
    accuracy) and image count, on the loss's device."""
    device = loss_sum.device
    if correct is None:
        correct = torch.zeros((), device=device, dtype=torch.long)
    return {"loss_sum": loss_sum, "correct": correct, "count": torch.tensor(len(images), device=device, dtype=torch.long)}


class Task:
    name = ""
    reports_accuracy = True

    def module(self, model: nn.Module) -> nn.Module:
        """The module the optimiser trains (the model itself, or a wrapper around it)."""
        return model

    def inputs(self, info: DataInfo, images: torch.Tensor) -> torch.Tensor:
        """uint8 training images (already permuted, if the run permutes) -> what `loss` takes."""
        return info.normalise(images)

    def loss(self, forward: Callable, inputs: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean loss, number of correct predictions or None) for one batch."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, module: nn.Module, info: DataInfo, images: torch.Tensor, labels: torch.Tensor,
                 batch_size: int, amp: bool) -> Sums:
        raise NotImplementedError

    def checkpoint_extras(self, module: nn.Module) -> dict[str, Any]:
        return {"task": self.name}

    def restore(self, module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Load what `checkpoint_extras` saved (the model state itself is loaded by the loop)."""


class Classification(Task):
    name = "classify"

    def __init__(self, config: TrainConfig, info: DataInfo) -> None:
        self.mixup = None
        if config.mixup > 0 or config.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                               label_smoothing=config.label_smoothing, num_classes=info.num_classes)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    def loss(self, forward, inputs, labels, generator):
        targets = labels
        if self.mixup is not None:
            inputs, targets = self.mixup(inputs, labels)  # soft targets, smoothing included
        logits = forward(inputs)
        if self.mixup is not None:
            loss = torch.sum(-targets * logits.float().log_softmax(-1), dim=-1).mean()
        else:
            loss = self.criterion(logits.float(), targets)
        return loss, (logits.detach().argmax(-1) == labels).sum()

    @torch.no_grad()
    def evaluate(self, module, info, images, labels, batch_size, amp):
        return classification_sums(module, info, images, labels, batch_size, amp)


@torch.no_grad()
def classification_sums(model: nn.Module, info: DataInfo, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 512, amp: bool = False, transform=None) -> Sums:
    """Summed test loss and correct predictions. `transform(uint8 batch) -> uint8 batch` is
    applied before the model's own preparation (the permutation probe uses it)."""
    with evaluating(model) as device:
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for batch, target in eval_batches(images, labels, batch_size):
            batch, target = batch.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if transform is not None:
                batch = transform(batch)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(info.prepare(batch))
            loss_sum += nn.functional.cross_entropy(logits.float(), target, reduction="sum")
            correct += (logits.argmax(-1) == target).sum()
    return split_sums(loss_sum, images, correct)


class MaskedAutoencoding(Task):
    name = "mae"
    reports_accuracy = False

    def __init__(self, config: TrainConfig, info: DataInfo) -> None:
        self.options = config.mae_options()
        self.seed = config.seed

    def module(self, model: nn.Module) -> nn.Module:
        from localitylab.models.mae import MaskedAutoencoder

        # The classifier gets no gradient from reconstruction: freeze it, so that neither the
        # optimiser nor DDP waits for a gradient that never comes.
        model.get_classifier().requires_grad_(False)
        return MaskedAutoencoder(model, **self.options)

    def loss(self, forward, inputs, labels, generator):
        return forward(inputs, generator).loss, None

    @torch.no_grad()
    def evaluate(self, module, info, images, labels, batch_size, amp):
        """Masked-token reconstruction loss over the test split, with the same masks every epoch."""
        with evaluating(module) as device:
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            for index, (batch, _) in enumerate(eval_batches(images, labels, batch_size)):
                generator = batch_generator(device, self.seed, -1, index)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    output = module(info.prepare(batch.to(device)), generator)
                loss_sum += output.loss.double() * len(batch)
        return split_sums(loss_sum, images)

    def checkpoint_extras(self, module):
        return {"task": self.name, "mae_options": module.options(), "mae_state": module.decoder_state_dict()}

    def restore(self, module, checkpoint):
        module.load_decoder_state_dict(checkpoint["mae_state"])


class DenoisingTask(Task):
    name = "diffusion"
    reports_accuracy = False
    # The test loss draws its timesteps and noise for each run of EVAL_DRAWS test images from
    # a CPU generator seeded by (seed, index of the run): the same draws every epoch, on any
    # device and at any eval_batch_size.
    EVAL_DRAWS = 256

    def __init__(self, config: TrainConfig, info: DataInfo) -> None:
        from localitylab.diffusion.objective import DiffusionObjective

        self.objective = DiffusionObjective(label_dropout=config.label_dropout)
        self.null_class = info.num_classes  # the DiT's extra label row (models/dit.py)
        self.seed = config.seed

    def inputs(self, info, images):
        from localitylab.diffusion.objective import to_diffusion_scale

        return to_diffusion_scale(images)

    def loss(self, forward, inputs, labels, generator):
        return self.objective.loss(forward, inputs, labels, generator, self.null_class), None

    @torch.no_grad()
    def evaluate(self, module, info, images, labels, batch_size, amp):
        """The noise-prediction error on the test split (every label kept), at fixed draws."""
        from localitylab.data.permutation import permute_pixels
        from localitylab.diffusion.objective import to_diffusion_scale

        with evaluating(module) as device:
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            step = min(batch_size, self.EVAL_DRAWS)
            for chunk, start in enumerate(range(0, len(images), self.EVAL_DRAWS)):
                clean, classes = images[start:start + self.EVAL_DRAWS], labels[start:start + self.EVAL_DRAWS]
                generator = batch_generator("cpu", self.seed, -1, chunk)
                timesteps = torch.randint(0, self.objective.schedule.num_timesteps, (len(clean),), generator=generator)
                noise = torch.randn(clean.shape, generator=generator)
                for first in range(0, len(clean), step):
                    batch = clean[first:first + step].to(device)
                    if info.permutation is not None:
                        batch = permute_pixels(batch, info.permutation.to(device))
                    t, eps = timesteps[first:first + step].to(device), noise[first:first + step].to(device)
                    noisy = self.objective.add_noise(to_diffusion_scale(batch), eps, t)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        prediction = module(noisy, t, classes[first:first + step].to(device))
                    loss_sum += (prediction.float() - eps).pow(2).flatten(1).mean(1).double().sum()
        return split_sums(loss_sum, images)

    def checkpoint_extras(self, module):
        return {"task": self.name, "diffusion_options": self.objective.options()}


TASKS = {"classify": Classification, "mae": MaskedAutoencoding, "diffusion": DenoisingTask}


def make_task(config: TrainConfig, info: DataInfo) -> Task:
    return TASKS[config.task](config, info)
