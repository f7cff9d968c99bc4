"""Training "the usual way": the referee of `train_throughput.py` (images/s, in-process) and of
`whole_process.py` (a whole training run, as its own process).

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

As a process, `train_usual_way` is a whole training script as people write it: imports, the
data set read through scikit-learn for digits (no localitylab cache), the registry's model,
a DataLoader with one worker per core (persistent; pinned memory on CUDA) applying the v2
transforms per image, torch AdamW with its defaults on that device, label smoothing,
clipping, per-step linear warm-up and cosine decay (torch's LinearLR + CosineAnnealingLR),
the test accuracy after every epoch (its own DataLoader) and the final weights saved:

    .venv/bin/python -m benchmarks.usual_way MODEL [--epochs 100] [--out DIR]
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


def usual_transform(info, train: bool = True):
    """torchvision's per-image pipeline with the same augmentation as the data set's recipe
    (none for the test images)."""
    from torchvision.transforms import v2

    steps = []
    if train and info.crop_padding:
        steps.append(v2.RandomCrop(info.img_size, padding=info.crop_padding))
    if train and info.hflip:
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


# --- the usual way as its own process: what a training script does, end to end ------------------
def _schedule(optimizer, lr: float, min_lr: float, warmup: int, total: int):
    """Per-step linear warm-up from 1e-6 and cosine decay to `min_lr`, as torch offers them."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=min_lr)
    if warmup <= 0:
        return cosine
    ramp = LinearLR(optimizer, start_factor=1e-6 / lr, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def _evaluate(net: nn.Module, loader, criterion, device: torch.device) -> tuple[float, float]:
    """Test loss and accuracy, batch by batch from the test loader."""
    net.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = net(images)
            loss_sum += float(criterion(logits.float(), labels)) * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
    net.train()
    return loss_sum / seen, correct / seen


def train_usual_way(model: str, dataset: str = "digits", epochs: int = 100, batch_size: int | None = None,
                    workers: int | None = None, device: str = "auto", out: str | None = None, seed: int = 0) -> dict:
    """A whole training run the usual way: the same model, data, recipe (from `TrainConfig`,
    so the batch size and warm-up are the data set's as in ours), batch size and epochs;
    test accuracy every epoch; the final weights saved. Returns the last epoch's figures."""
    from localitylab.data.registry import DataOptions, load_dataset
    from localitylab.device import resolve_device
    from localitylab.models.registry import build_model
    from localitylab.train.config import TrainConfig
    from localitylab.train.loop import model_spec_for

    config = TrainConfig(model, dataset, epochs=epochs, batch_size=batch_size, seed=seed)
    workers = default_workers() if workers is None else workers
    torch_device = resolve_device(device)
    # Read as a script reads it, without localitylab's image cache (digits: scikit-learn's
    # load_digits and train_test_split, the same split as ours).
    data = load_dataset(dataset, DataOptions(cache=False))
    info = data.info
    torch.manual_seed(seed)
    net = build_model(model_spec_for(config, info)).to(torch_device)
    on_cuda = torch_device.type == "cuda"
    common = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=on_cuda)
    train_loader = torch.utils.data.DataLoader(
        _TransformedImages(data.train_images, data.train_labels, usual_transform(info)),
        batch_size=config.batch_size, shuffle=True, drop_last=True, **common)
    test_loader = torch.utils.data.DataLoader(
        _TransformedImages(data.test_images, data.test_labels, usual_transform(info, train=False)),
        batch_size=config.eval_batch_size, shuffle=False, **common)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total = epochs * len(train_loader)
    warmup = int(config.warmup_epochs * len(train_loader))
    scheduler = _schedule(optimizer, config.lr, config.min_lr, warmup if warmup < total else total // 5, total)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    test_criterion = nn.CrossEntropyLoss()
    net.train()
    for epoch in range(1, epochs + 1):
        loss_sum, seen = torch.zeros((), device=torch_device), 0
        for images, labels in train_loader:
            images, labels = images.to(torch_device, non_blocking=True), labels.to(torch_device, non_blocking=True)
            with torch.autocast(torch_device.type, dtype=torch.bfloat16, enabled=on_cuda):
                loss = criterion(net(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), config.clip_grad)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(labels)
            seen += len(labels)
        test_loss, test_acc = _evaluate(net, test_loader, test_criterion, torch_device)
        result = {"epoch": epoch, "train_loss": float(loss_sum) / seen, "test_loss": test_loss, "test_acc": test_acc}
        print(f"epoch {epoch}: train loss {result['train_loss']:.4f}  test acc {test_acc:.4f}", flush=True)
    if out is not None:
        os.makedirs(out, exist_ok=True)
        torch.save(net.state_dict(), os.path.join(out, "model.pt"))
    return {**result, "model": model, "dataset": dataset, "batch_size": config.batch_size, "workers": workers,
            "device": torch_device.type, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m benchmarks.usual_way",
                                     description="Train MODEL the usual way, as its own process (the referee of "
                                                 "benchmarks/whole_process.py); the last line is the result as JSON.")
    parser.add_argument("model")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, help="default: the data set's, as in ours")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: one per core, at most 8)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="folder for the final weights (model.pt)")
    args = parser.parse_args(argv)
    result = train_usual_way(args.model, args.dataset, args.epochs, args.batch_size, args.workers, args.device,
                             args.out)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
