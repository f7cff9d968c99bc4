"""Evaluating a classifier: on images in memory (`evaluate`), or a checkpoint on its data set
(`evaluate_checkpoint`, the `localitylab eval` command). Not the training loop's business:
the loop, the probes and the CLI all call these."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from localitylab.data.registry import DataInfo, DataOptions, load_dataset
from localitylab.device import resolve_device
from localitylab.errors import UserError
from localitylab.train.checkpoint import load
from localitylab.train.tasks import classification_sums, sums_to_means


def evaluate(model: nn.Module, info: DataInfo, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 512, amp: bool = False, transform=None) -> dict[str, float]:
    """Test loss and accuracy of a classifier. `transform(uint8 batch) -> uint8 batch` is
    applied before the model's own preparation (the permutation probe uses it)."""
    return sums_to_means(classification_sums(model, info, images, labels, batch_size, amp, transform))


def evaluate_checkpoint(checkpoint: str | Path, data: str | None = None, data_dir: str | Path | None = None,
                        img_size: int | None = None, split: str = "test", batch_size: int = 512,
                        device: str = "auto") -> dict:
    torch_device = resolve_device(device)
    model = load(checkpoint, torch_device)
    if model.run.config.get("task") == "mae":
        raise UserError(
            f"{checkpoint} is an MAE pre-training run: its classifier head was never trained. Fine-tune it first: "
            f"train {model.run.spec.name} on {model.run.data.name} with init_from {checkpoint}", setting="init_from"
        )
    if model.run.config.get("task") == "diffusion":
        raise UserError(f"{checkpoint} is a diffusion run: it classifies nothing. Measure its samples: localitylab "
                        f"sample {Path(checkpoint).parent}, then localitylab evaluate-samples {Path(checkpoint).parent}")
    info = model.run.data
    name = data or info.name
    dataset = load_dataset(name, model.run.data_options(name, DataOptions(data_dir=Path(data_dir) if data_dir else None,
                                                                         img_size=img_size)))
    images, labels = dataset.split(split)
    shape = (info.in_chans, info.img_size, info.img_size)
    if tuple(images.shape[1:]) != shape:
        raise UserError(f"{name} has images of shape {tuple(images.shape[1:])}; the model needs {shape}")
    if int(labels.max()) >= info.num_classes:
        raise UserError(f"{name} has {int(labels.max()) + 1} classes; the model has {info.num_classes}")
    result = evaluate(model, info, images, labels, batch_size, amp=torch_device.type == "cuda")
    return {"model": model.run.display_name, "data": name, "n_images": len(images), **result}
