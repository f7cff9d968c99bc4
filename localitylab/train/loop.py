"""The training loop, readable top to bottom. One loop for every task (classification,
MAE pre-training) and for one process or many (torchrun + DDP).

    data on the device (uint8) -> per-step crop/flip -> [pixel permutation] -> normalise
    -> this rank's shard -> task loss (bf16 autocast on CUDA) -> backward -> clip -> AdamW
    -> per-step warm-up + cosine -> evaluate each epoch -> checkpoint + metrics.csv

Reproducibility: batch i of epoch e draws its crops, flips, masks and dropout from seeds
derived from (seed, e, i) alone. A run resumed from any checkpoint, whether written at the
end of an epoch or mid-epoch on SIGINT/SIGTERM, replays the remaining steps exactly as an
uninterrupted run would: bit-identical weights on CPU.

Faults: a non-finite loss is caught (without a host sync per step) and named by its step;
a checkpoint that cannot be written leaves the previous one in place; SIGINT/SIGTERM end
the current step, write a checkpoint and stop.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from localitylab.data.batching import batch_generator, batches_per_epoch, train_batches
from localitylab.data.permutation import permute_pixels, random_permutation
from localitylab.data.registry import DataInfo, DataOptions, ImageDataset, load_dataset
from localitylab.device import resolve_device
from localitylab.errors import UserError
from localitylab.io import check_folder, code_version, write_json, write_text
from localitylab.models.describe import model_summary
from localitylab.models.registry import ModelSpec, build_model, model_kind, spec_for_data
from localitylab.train import distributed
from localitylab.train.checkpoint import read_checkpoint, save_checkpoint, versions
from localitylab.train.config import RECIPE_KEYS, TrainConfig
from localitylab.train.progress import Reporter
from localitylab.train.stopping import RunStopped, StopRequests
from localitylab.train.tasks import make_task, sums_to_means

METRIC_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s", "images_per_s")


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    history: list[dict[str, Any]]

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


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
    return spec_for_data(config.model, info.img_size, info.in_chans, info.num_classes, config.pos_embed,
                         config.model_kw, config.drop_path)


@dataclass
class Position:
    """Where a run stands: the next epoch to train and, when stopped mid-epoch, the batch
    to go on from with the epoch's running sums so far."""

    epoch: int = 1
    batch: int = 0
    step: int = 0
    partial: dict[str, Any] | None = None


def train(config: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Train as `config` says: on one process, or as one rank of a torchrun job."""
    config.validate()
    ranks = distributed.from_environment(resolve_device(config.device))
    try:
        return _train(config, reporter if ranks.is_main else None, ranks)
    finally:
        ranks.close()


def _train(config: TrainConfig, reporter: Reporter | None, ranks: distributed.Distributed) -> TrainResult:
    reporter = reporter or Reporter()
    device = ranks.device
    distributed.check_batch_divides(config.batch_size, ranks.world_size)
    on_cuda = device.type == "cuda"
    use_amp = config.amp == "on" or (config.amp == "auto" and on_cuda)
    use_compile = config.compile == "on" or (config.compile == "auto" and on_cuda)
    run_dir = check_folder(config.run_dir())  # a file in the way fails now, not after an epoch
    ckpt_path = run_dir / "ckpt.pt"
    resumed = _checkpoint_to_resume(config, ckpt_path)
    if ranks.is_main:
        _remove_torn_writes(run_dir)

    # --- data, on the device as uint8 -----------------------------------------------------
    dataset = prepare_data(config)
    info = dataset.info
    train_x, train_y = dataset.train_images.to(device), dataset.train_labels.to(device)
    test_x, test_y = dataset.test_images.to(device), dataset.test_labels.to(device)
    permutation = info.permutation.to(device) if info.permutation is not None else None

    # --- model, task, optimiser, schedule ---------------------------------------------------
    seed_everything(config.seed)
    spec = model_spec_for(config, info)
    model = build_model(spec)
    init_report = _initial_weights(model, config, resumed, reporter)
    task = make_task(config, info)
    module = task.module(model).to(device)
    summary = model_summary(model, spec.in_chans, spec.img_size)
    if model_kind(config.model) == "convnet":
        # channels-last convolutions: faster on GPUs, and 1.19-1.27x on this CPU (benchmarks/RESULTS.md)
        module.to(memory_format=torch.channels_last)
        if ranks.enabled and on_cuda:  # batch statistics over the global batch, as on one process
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    optimizer, scheduler = _optimiser(module, config, len(train_x))
    steps_per_epoch = batches_per_epoch(len(train_x), config.batch_size)

    history: list[dict[str, Any]] = []
    position = Position()
    if resumed is not None:
        model.load_state_dict(resumed["model_state"])
        task.restore(module, resumed)
        optimizer.load_state_dict(resumed["optimizer_state"])
        history = list(resumed.get("history", []))
        position = _resume_position(resumed, ranks)
        scheduler.step_update(position.step)
        if position.epoch > config.epochs:
            reporter.message(f"{run_dir}: already trained for {config.epochs} epochs; nothing to do")
            return TrainResult(run_dir, ckpt_path, history)
        where = f"epoch {position.epoch}" + (f", batch {position.batch + 1}" if position.batch else "")
        reporter.message(f"resuming {run_dir} at {where}")

    forward: nn.Module = module
    if ranks.enabled:
        forward = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if on_cuda else None)
    if use_compile:
        forward = torch.compile(forward)

    def checkpoint(epoch_done: int, step: int, partial: dict[str, Any] | None = None) -> None:
        """Write ckpt.pt (rank 0), then the files derived from it; a failed write keeps the last one."""
        if ranks.is_main:
            payload = {
                "model_spec": spec.to_dict(), "model_state": model.state_dict(), "data": info.to_dict(),
                "config": config.to_dict(), "metrics": history[-1] if history else {}, "history": history,
                "epoch": epoch_done, "step": step, "optimizer_state": optimizer.state_dict(),
                "model_info": summary, "partial": partial, **task.checkpoint_extras(module),
            }
            _write_run_files(run_dir, ckpt_path, payload, history, {
                "model_spec": spec.to_dict(), "data": info.name, "config": config.to_dict(),
                "metrics": history[-1] if history else {}, "model_info": summary, "task": task.name,
                "permute_seed": info.permute_seed, "epochs_done": epoch_done, "command": config.command(),
                "init_from": init_report.to_dict() if init_report else None,
                "versions": versions(), **code_version(),
            })
        ranks.barrier()

    # The step of the first non-finite loss, kept on the device: checked only where the loop
    # synchronises anyway (progress reports, stop checks, the end of an epoch).
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def check_finite() -> None:
        bad = int(ranks.sum(first_bad_step.clamp(min=0)).item()) if ranks.enabled else int(first_bad_step)
        if bad > 0:
            epoch_of_bad = (bad - 1) // steps_per_epoch + 1
            raise UserError(
                f"training diverged: the loss was not finite at step {bad} (epoch {epoch_of_bad}); "
                f"the last good checkpoint ({ckpt_path}) is kept. Try a lower --lr."
            )

    report_every = max(1, steps_per_epoch // 20)
    step = position.step
    reporter.start(config.epochs, steps_per_epoch, position.epoch)
    try:
        with StopRequests() as stop:
            for epoch in range(position.epoch, config.epochs + 1):
                # --- one epoch ------------------------------------------------------------
                seed = epoch_seed(config.seed, epoch)
                module.train(not config.linear_probe)  # linear probing: frozen features, eval mode
                partial = position.partial if epoch == position.epoch else None
                first_batch = position.batch if epoch == position.epoch else 0
                loss_sum, correct, seen = _running_sums(partial, device)
                elapsed_before = partial["elapsed_s"] if partial else 0.0
                started = time.perf_counter()
                batches = train_batches(train_x, train_y, config.batch_size, seed, info.crop_padding, info.hflip,
                                        start=first_batch)
                for i, (images, labels) in enumerate(batches, start=first_batch):
                    seed_everything(step_seed(seed, i, ranks.rank))  # dropout, drop-path, mixup
                    if permutation is not None:
                        images = permute_pixels(images, permutation)
                    images, labels = ranks.shard(images), ranks.shard(labels)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                        loss, n_correct = task.loss(forward, info.normalise(images), labels,
                                                    batch_generator(device, seed, i, ranks.rank))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.clip_grad:
                        nn.utils.clip_grad_norm_(module.parameters(), config.clip_grad)
                    optimizer.step()
                    step += 1
                    scheduler.step_update(step)
                    # Accumulate on the device: no host synchronisation inside the step.
                    loss = loss.detach()
                    first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), step, first_bad_step)
                    loss_sum += loss * len(labels)
                    if n_correct is not None:
                        correct += n_correct
                    seen += len(labels)
                    reporting = (i + 1) % report_every == 0
                    reporter.step(epoch, i + 1, float(loss) if reporting else None)
                    # One process reads its flag every step; ranks agree at report points.
                    stopping = (reporting and ranks.any(stop.requested)) if ranks.enabled else stop.requested
                    if stopping:
                        check_finite()
                        state = {"epoch": epoch, "batch": i + 1, "loss_sum": ranks.sum(loss_sum.clone()),
                                 "correct": ranks.sum(correct.clone()), "seen": seen * ranks.world_size,
                                 "elapsed_s": elapsed_before + time.perf_counter() - started}
                        checkpoint(epoch - 1, step, state)
                        raise RunStopped(
                            f"stopped by {stop.signal.name if stop.signal else 'a signal'} after step {step} "
                            f"(epoch {epoch}, batch {i + 1} of {steps_per_epoch}); checkpoint written to {ckpt_path}. "
                            f"Continue with: {config.command()} --resume", stop.exit_code)
                check_finite()
                elapsed = elapsed_before + time.perf_counter() - started
                ranks.sum(loss_sum)
                ranks.sum(correct)
                seen_all = seen * ranks.world_size
                test = sums_to_means(ranks.sum_all(task.evaluate(module, info, test_x[ranks.rank::ranks.world_size],
                                                           test_y[ranks.rank::ranks.world_size],
                                                           config.eval_batch_size, use_amp)))
                row = {
                    "epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
                    "train_loss": float(loss_sum) / max(1, seen_all),
                    "train_acc": int(correct) / max(1, seen_all) if task.reports_accuracy else None,
                    "test_loss": test["loss"], "test_acc": test["accuracy"] if task.reports_accuracy else None,
                    "epoch_time_s": elapsed, "images_per_s": seen_all / max(elapsed, 1e-9),
                }
                history.append(row)
                checkpoint(epoch, step)
                reporter.epoch_end(row)
    finally:
        reporter.close()
    return TrainResult(run_dir, ckpt_path, history)


def step_seed(epoch_seed_: int, batch: int, rank: int) -> int:
    return (epoch_seed_ * 1_000_003 + batch * 101 + rank) % (2**31 - 1)


def _running_sums(partial: dict[str, Any] | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """An epoch's loss sum, correct count and images seen: zero, or restored mid-epoch.
    Under DDP the restored sums (already summed over ranks) go to rank 0 only."""
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    if partial is None:
        return loss_sum, correct, 0
    if partial["rank_share"]:
        loss_sum, correct = partial["loss_sum"].to(device), partial["correct"].to(device)
    return loss_sum, correct, int(partial["seen_rank"])  # every rank saw its equal share


def _resume_position(resumed: dict[str, Any], ranks: distributed.Distributed) -> Position:
    partial = resumed.get("partial")
    if not partial:
        return Position(epoch=int(resumed["epoch"]) + 1, step=int(resumed["step"]))
    # Sums were saved summed over ranks: rank 0 carries them, the others start from zero, so
    # that summing again at the end of the epoch counts them once.
    restored = dict(partial)
    restored["rank_share"] = 1 if ranks.is_main else 0
    restored["seen_rank"] = int(partial["seen"]) // ranks.world_size
    return Position(epoch=int(partial["epoch"]), batch=int(partial["batch"]), step=int(resumed["step"]),
                    partial=restored)


def _checkpoint_to_resume(config: TrainConfig, ckpt_path: Path) -> dict[str, Any] | None:
    if not ckpt_path.exists():
        return None
    if not config.resume:
        raise UserError(f"{ckpt_path} exists; pass --resume to continue that run, or choose another --out")
    resumed = read_checkpoint(ckpt_path)
    _check_same_recipe(resumed.get("config", {}), config, ckpt_path)
    return resumed


def _remove_torn_writes(run_dir: Path) -> None:
    """Temporaries a killed run left behind; the files they were meant to replace are whole."""
    for name in ("ckpt.pt", "metrics.csv", "run.json"):
        for stale in run_dir.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


def _initial_weights(model: nn.Module, config: TrainConfig, resumed: dict[str, Any] | None, reporter: Reporter):
    """--weights (timm: models) and --init-from; a resumed run takes its weights from its
    own checkpoint instead. Linear probing freezes all but the head either way."""
    from localitylab.train.init_from import freeze_all_but_head, init_from_checkpoint

    report = None
    if resumed is None and config.weights:
        from localitylab.models.timm_adapter import load_weights

        load_weights(model, config.weights)
    if resumed is None and config.init_from:
        report = init_from_checkpoint(model, config.init_from)
        reporter.message(report.summary())
    elif resumed is not None and config.init_from:
        from localitylab.train.init_from import InitReport

        report = InitReport(config.init_from)  # recorded already; see the first run.json
    if config.linear_probe:
        trainable = freeze_all_but_head(model)
        reporter.message(f"linear probe: training {', '.join(trainable)} only")
    return report


def _optimiser(module: nn.Module, config: TrainConfig, n_train: int):
    import timm.optim
    from timm.scheduler import CosineLRScheduler

    # timm's factory puts biases, norms, pos_embed and cls_token in a no-decay group and
    # skips frozen parameters (a linear probe's encoder, an MAE encoder's head). Fused AdamW
    # (one kernel for all parameters) on CUDA and on CPU: 1.02-1.08x on this CPU's nano steps.
    optimizer = timm.optim.create_optimizer_v2(module, opt="adamw", lr=config.lr, weight_decay=config.weight_decay,
                                               fused=True)
    steps_per_epoch = batches_per_epoch(n_train, config.batch_size)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=config.epochs * steps_per_epoch, lr_min=config.min_lr,
        warmup_t=int(config.warmup_epochs * steps_per_epoch), warmup_lr_init=1e-6, t_in_epochs=False,
    )
    return optimizer, scheduler


def _write_run_files(run_dir: Path, ckpt_path: Path, payload: dict[str, Any], history: list[dict[str, Any]],
                     run_info: dict[str, Any]) -> None:
    """The checkpoint first, then metrics.csv and run.json; each written to a temporary name
    and renamed, so a failure (a full disk) leaves every previous file whole."""
    try:
        save_checkpoint(ckpt_path, payload)
        write_metrics(run_dir / "metrics.csv", history)
        write_json(run_dir / "run.json", run_info)
    except OSError as err:
        kept = f"the previous checkpoint {ckpt_path} is intact" if ckpt_path.exists() else "no checkpoint was written"
        raise UserError(f"could not write the run files in {run_dir} ({err.strerror or err}); {kept}") from None


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
