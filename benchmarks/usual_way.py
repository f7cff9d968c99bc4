"""Training throughput: localitylab's loop against "the usual way", measured in one run.

The usual way is what most training scripts do: the same timm model, a torch DataLoader
whose CPU workers apply torchvision transforms image by image (the same random crop and
flip as ours, then scaling and normalisation), autocast where it helps (CUDA), and a plain
AdamW loop. Ours keeps the uint8 data set on the device and augments whole batches there.
Both run the same number of steps at the same batch size; the first epoch is warm-up and
the figure is the median images/s of the later ones.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from localitylab.data.registry import load_dataset
from localitylab.models.registry import build_model
from localitylab.train import TrainConfig, train
from localitylab.train.loop import model_spec_for, resolve_device

MODELS = ("pit-n", "vit-n/2", "resnet-n")


class _TransformedImages(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), self.labels[index]


def usual_transform(info):
    from torchvision.transforms import v2

    steps = []
    if info.crop_padding:
        steps.append(v2.RandomCrop(info.img_size, padding=info.crop_padding))
    if info.hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(info.mean, info.std)]
    return v2.Compose(steps)


def usual_way(model: str, dataset: str = "digits", batch_size: int = 128, epochs: int = 4, workers: int = 2,
              device: str = "auto") -> float:
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
    rates = []
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
    return statistics.median(rates)


def ours(model: str, dataset: str = "digits", batch_size: int = 128, epochs: int = 4, device: str = "auto") -> float:
    with tempfile.TemporaryDirectory() as tmp:
        result = train(TrainConfig(model, dataset, out=Path(tmp), epochs=epochs, batch_size=batch_size,
                                   warmup_epochs=0, device=device))
    return statistics.median(row["images_per_s"] for row in result.history[1:])


def run(quick: bool = False) -> list[dict]:
    epochs = 2 if quick else 4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for model in MODELS:
        mine = ours(model, epochs=epochs, device=device)
        usual = usual_way(model, epochs=epochs, device=device)
        rows.append({"model": model, "data": "digits", "device": device, "batch_size": 128,
                     "ours_images_per_s": mine, "usual_images_per_s": usual, "ratio": mine / usual})
    return rows


if __name__ == "__main__":
    for row in run():
        print(f"{row['model']:<9} ours {row['ours_images_per_s']:>8.0f} img/s   usual {row['usual_images_per_s']:>8.0f} img/s   "
              f"ratio {row['ratio']:.2f}")
