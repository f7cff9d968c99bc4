"""The training loop, readable top to bottom.

    data on the device (uint8) -> per-step crop/flip -> [pixel permutation] -> normalise
    -> [mixup/cutmix] -> forward (bf16 autocast on CUDA) -> loss -> backward -> clip -> AdamW
    -> per-step warm-up + cosine -> evaluate each epoch -> checkpoint + metrics.csv

Reproducibility: every epoch reseeds torch, numpy and its own data generator from
(seed, epoch). A run resumed from the checkpoint of epoch e therefore replays epochs e+1...
exactly as an uninterrupted run would: bit-identical weights on CPU.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from localitylab.data.batching import eval_batches, train_batches
from localitylab.data.permutation import permute_pixels, random_permutation
from localitylab.data.registry import DataInfo, DataOptions, ImageDataset, load_dataset
from localitylab.errors import UserError
from localitylab.io import code_version, write_json, write_text
from localitylab.models.describe import model_summary
from localitylab.models.registry import ModelSpec, build_model, model_kind
from localitylab.train.checkpoint import read_checkpoint, save_checkpoint, versions
from localitylab.train.config import RECIPE_KEYS, TrainConfig
from localitylab.train.progress import Reporter

METRIC_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s", "images_per_s")


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    history: list[dict[str, Any]]

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available here")
    return resolved


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**31 - 1)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def prepare_data(config: TrainConfig) -> ImageDataset:
    options = DataOptions(data_dir=Path(config.data_dir) if config.data_dir else None, download=config.download,
                          img_size=config.img_size, seed=config.seed)
    dataset = load_dataset(config.dataset, options)
    if config.crop_padding is not None:
        dataset.info.crop_padding = config.crop_padding
    if config.permute_pixels is not None:
        size = dataset.info.img_size
        dataset.info.permutation = random_permutation(size * size, config.permute_pixels)
        dataset.info.permute_seed = config.permute_pixels
    return dataset


def model_spec_for(config: TrainConfig, info: DataInfo) -> ModelSpec:
    kind = model_kind(config.model)
    model_kw = dict(config.model_kw)
    if config.drop_path > 0:
        model_kw.setdefault("drop_path_rate", config.drop_path)
    if kind == "timm":
        # --model-kw may override the shapes the data set implies.
        img_size = int(model_kw.pop("img_size", info.img_size))
        in_chans = int(model_kw.pop("in_chans", info.in_chans))
        num_classes = int(model_kw.pop("num_classes", info.num_classes))
        return ModelSpec(config.model, img_size, in_chans, num_classes, None, model_kw)
    pos_embed = config.pos_embed if kind in ("pit", "vit") else None
    return ModelSpec(config.model, info.img_size, info.in_chans, info.num_classes, pos_embed, model_kw)


@torch.no_grad()
def evaluate(model: nn.Module, info: DataInfo, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 512, amp: bool = False, transform=None) -> dict[str, float]:
    """Test loss and accuracy. `transform(uint8 batch) -> uint8 batch` is applied before
    the model's own preparation (the permutation probe uses it for its shuffles)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
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
    model.train(was_training)
    count = max(1, len(images))
    return {"loss": float(loss_sum) / count, "accuracy": int(correct) / count}


def train(config: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    config.validate()
    reporter = reporter or Reporter()
    device = resolve_device(config.device)
    on_cuda = device.type == "cuda"
    use_amp = config.amp == "on" or (config.amp == "auto" and on_cuda)
    use_compile = config.compile == "on" or (config.compile == "auto" and on_cuda)
    run_dir = config.run_dir()
    ckpt_path = run_dir / "ckpt.pt"

    # --- what to resume from -------------------------------------------------------------
    resumed = None
    if ckpt_path.exists():
        if not config.resume:
            raise UserError(f"{ckpt_path} exists; pass --resume to continue that run, or choose another --out")
        resumed = read_checkpoint(ckpt_path)
        _check_same_recipe(resumed.get("config", {}), config, ckpt_path)

    # --- data, on the device as uint8 -----------------------------------------------------
    dataset = prepare_data(config)
    info = dataset.info
    train_x, train_y = dataset.train_images.to(device), dataset.train_labels.to(device)
    test_x, test_y = dataset.test_images.to(device), dataset.test_labels.to(device)
    permutation = info.permutation.to(device) if info.permutation is not None else None

    # --- model, optimiser, schedule -------------------------------------------------------
    seed_everything(config.seed)
    spec = model_spec_for(config, info)
    model = build_model(spec)
    if config.weights:
        from localitylab.models.timm_adapter import load_weights

        load_weights(model, config.weights)
    model.to(device)
    summary = model_summary(model, spec.in_chans, spec.img_size)
    if device.type == "cuda" and model_kind(config.model) == "convnet":
        model.to(memory_format=torch.channels_last)

    import timm.optim
    from timm.scheduler import CosineLRScheduler

    # timm's factory puts biases, norms, pos_embed and cls_token in a no-decay group.
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=config.lr, weight_decay=config.weight_decay,
                                               **({"fused": True} if on_cuda else {}))
    steps_per_epoch = max(1, len(train_x) // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    scheduler = CosineLRScheduler(
        optimizer, t_initial=total_steps, lr_min=config.min_lr, warmup_t=int(config.warmup_epochs * steps_per_epoch),
        warmup_lr_init=1e-6, t_in_epochs=False,
    )
    mixup = None
    if config.mixup > 0 or config.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                      label_smoothing=config.label_smoothing, num_classes=info.num_classes)
        criterion = lambda logits, target: torch.sum(-target * logits.log_softmax(-1), dim=-1).mean()  # noqa: E731
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    history: list[dict[str, Any]] = []
    first_epoch, step = 1, 0
    if resumed is not None:
        model.load_state_dict(resumed["model_state"])
        optimizer.load_state_dict(resumed["optimizer_state"])
        history = list(resumed.get("history", []))
        first_epoch, step = int(resumed["epoch"]) + 1, int(resumed["step"])
        scheduler.step_update(step)
        if first_epoch > config.epochs:
            reporter.message(f"{run_dir}: already trained for {config.epochs} epochs; nothing to do")
            return TrainResult(run_dir, ckpt_path, history)
        reporter.message(f"resuming {run_dir} at epoch {first_epoch}")

    forward = torch.compile(model) if use_compile else model
    reporter.start(config.epochs, steps_per_epoch, first_epoch)
    try:
        for epoch in range(first_epoch, config.epochs + 1):
            # --- one epoch ----------------------------------------------------------------
            seed_everything(epoch_seed(config.seed, epoch))
            generator = torch.Generator(device=device).manual_seed(epoch_seed(config.seed, epoch))
            model.train()
            started = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            report_every = max(1, steps_per_epoch // 20)
            batches = train_batches(train_x, train_y, config.batch_size, generator, info.crop_padding, info.hflip)
            for i, (images, labels) in enumerate(batches):
                if permutation is not None:
                    images = permute_pixels(images, permutation)
                inputs = info.normalise(images)
                targets = labels
                if mixup is not None:
                    inputs, targets = mixup(inputs, labels)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = forward(inputs)
                    loss = criterion(logits.float(), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
                optimizer.step()
                step += 1
                scheduler.step_update(step)
                # Accumulate on the device: no host synchronisation inside the step.
                loss_sum += loss.detach() * len(labels)
                correct += (logits.detach().argmax(-1) == labels).sum()
                seen += len(labels)
                if (i + 1) % report_every == 0:
                    reporter.step(epoch, i + 1, float(loss.detach()))
                else:
                    reporter.step(epoch, i + 1, None)
            train_loss = float(loss_sum) / max(1, seen)
            if not math.isfinite(train_loss):
                raise UserError(
                    f"training diverged: the loss became {train_loss} in epoch {epoch} (step {step}); "
                    f"the last good checkpoint ({ckpt_path}) is kept. Try a lower --lr."
                )
            elapsed = time.perf_counter() - started
            test = evaluate(model, info, test_x, test_y, config.eval_batch_size, use_amp)
            row = {
                "epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
                "train_loss": train_loss, "train_acc": int(correct) / max(1, seen),
                "test_loss": test["loss"], "test_acc": test["accuracy"],
                "epoch_time_s": elapsed, "images_per_s": seen / max(elapsed, 1e-9),
            }
            history.append(row)
            # --- checkpoint first, then the files derived from it -------------------------
            save_checkpoint(ckpt_path, {
                "model_spec": spec.to_dict(), "model_state": model.state_dict(), "data": info.to_dict(),
                "config": config.to_dict(), "metrics": row, "history": history, "epoch": epoch, "step": step,
                "optimizer_state": optimizer.state_dict(), "model_info": summary,
            })
            write_metrics(run_dir / "metrics.csv", history)
            write_json(run_dir / "run.json", {"model_spec": spec.to_dict(), "data": info.name,
                                              "config": config.to_dict(), "metrics": row, "model_info": summary,
                                              "permute_seed": info.permute_seed, "epochs_done": epoch,
                                              "command": config.command(),
                                              "versions": versions(), **code_version()})
            reporter.epoch_end(row)
    finally:
        reporter.close()
    return TrainResult(run_dir, ckpt_path, history)


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buffer.getvalue())


def _check_same_recipe(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    current = config.recipe()
    for key in RECIPE_KEYS:
        if key in saved and saved[key] != current[key]:
            raise UserError(
                f"cannot resume {path}: {key} was {saved[key]!r}, now {current[key]!r}; "
                f"re-run with the same settings or choose another --out"
            )
