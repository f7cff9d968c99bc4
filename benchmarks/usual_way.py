"""Training "the usual way", for the ours/usual ratio of `train_throughput.py`.

The usual way is what most training scripts do: the same model (same registry builder and
initialisation), a torch DataLoader whose CPU workers apply torchvision v2 transforms image
by image (the same random crop with padding and horizontal flip as ours where the data set
has them, then scaling and normalisation), bf16 autocast on CUDA, cross-entropy with the
same label smoothing, gradient clipping and a plain torch AdamW. Ours keeps the uint8 data
set on the device and augments whole batches there.

Both run the same number of epochs over the same data at the same batch size; each epoch is
timed from the first batch request to the last optimiser step, the first epoch is warm-up
(worker start-up, allocator) and the figure is the median images/s of the later ones.

    .venv/bin/python -m benchmarks.train_throughput [--quick]   # ours and the usual way, side by side
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn as nn


class _TransformedImages(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), self.labels[index]


def usual_transform(info):
    """torchvision's per-image pipeline with the same augmentation as the data set's recipe."""
    from torchvision.transforms import v2

    steps = []
    if info.crop_padding:
        steps.append(v2.RandomCrop(info.img_size, padding=info.crop_padding))
    if info.hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(info.mean, info.std)]
    return v2.Compose(steps)


def default_workers() -> int:
    """What a training script would set: one worker per core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def usual_way(model: str, dataset: str = "digits", batch_size: int = 128, epochs: int = 4,
              workers: int | None = None, device: str = "auto") -> list[float]:
    """images/s of each epoch after the first."""
    from benchmarks.common import register_bench_datasets
    from localitylab.data.registry import load_dataset
    from localitylab.models.registry import build_model
    from localitylab.train import TrainConfig
    from localitylab.device import resolve_device
    from localitylab.train.loop import model_spec_for

    register_bench_datasets()
    workers = default_workers() if workers is None else workers
    torch_device = resolve_device(device)
    data = load_dataset(dataset)
    config = TrainConfig(model, dataset, batch_size=batch_size)
    torch.manual_seed(0)
    net = build_model(model_spec_for(config, data.info)).to(torch_device)
    loader = torch.utils.data.DataLoader(
        _TransformedImages(data.train_images, data.train_labels, usual_transform(data.info)), batch_size=batch_size,
        shuffle=True, drop_last=True, num_workers=workers, persistent_workers=workers > 0,
        pin_memory=torch_device.type == "cuda",
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    net.train()
    rates = []
    try:
        for epoch in range(epochs):
            seen, started = 0, time.perf_counter()
            for images, labels in loader:
                images, labels = images.to(torch_device, non_blocking=True), labels.to(torch_device, non_blocking=True)
                with torch.autocast(torch_device.type, dtype=torch.bfloat16, enabled=torch_device.type == "cuda"):
                    loss = criterion(net(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), config.clip_grad)
                optimizer.step()
                seen += len(labels)
            if torch_device.type == "cuda":
                torch.cuda.synchronize()
            if epoch > 0:
                rates.append(seen / (time.perf_counter() - started))
    finally:
        del loader  # shuts persistent workers down before the next measurement
    return rates
