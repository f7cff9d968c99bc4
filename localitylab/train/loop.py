"""The training loop, readable top to bottom. One loop for every task (classification,
MAE pre-training, diffusion) and for one process or many (torchrun + DDP).

    data on the device (uint8) -> per-step crop/flip -> [pixel permutation] -> normalise (the task's scale)
    -> this rank's shard -> task loss (bf16 autocast on CUDA) -> backward -> clip -> AdamW
    -> per-step warm-up + cosine -> evaluate each epoch -> checkpoint + metrics.csv
    (and, at the moments `--snapshots` names, the weights: localitylab.train.snapshots)

In code, in the order it runs: `_train` -> `_set_up` (data, seeded model, task, optimiser,
the resumed state) -> per epoch `_train_epoch` (`_step` per batch; `_stop` on a signal)
-> `_end_epoch` (`_test`, `_snapshot_if_due`, `_save`). `Training` holds what they share.

Reproducibility: batch i of epoch e draws its crops, flips, masks, noise and dropout from seeds
derived from (seed, e, i) alone. A run resumed from any checkpoint, whether written at the
end of an epoch or mid-epoch on SIGINT/SIGTERM, replays the remaining steps exactly as an
uninterrupted run would: bit-identical weights on CPU.

Faults: a non-finite loss is caught (without a host sync per step) and named by its step;
a checkpoint that cannot be written leaves the previous one in place; SIGINT/SIGTERM end
the current step, write a checkpoint and stop.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from localitylab.data.batching import batch_generator, batches_per_epoch, train_batches
from localitylab.data.permutation import permutation_for_setting, permute_pixels
from localitylab.data.registry import DataInfo, DataOptions, ImageDataset, load_dataset
from localitylab.device import resolve_device
from localitylab.errors import RunStopped, UserError
from localitylab.io import code_version, folder_lock
from localitylab.models.describe import model_summary
from localitylab.models.registry import ModelSpec, build_model, model_kind, spec_for_data
from localitylab.models.timm_adapter import load_weights
from localitylab.train import distributed
from localitylab.train.checkpoint import read_checkpoint, write_run
from localitylab.train.config import DATA_SET, FROM_DATA_SET, RESUMED, TrainConfig, describe_recipe, recipe_record
from localitylab.train.init_from import InitReport, freeze_all_but_head, init_from_checkpoint
from localitylab.train.progress import Reporter
from localitylab.train.snapshots import FOLDER as SNAPSHOTS, SnapshotWriter, parse_snapshots, snapshot_steps
from localitylab.train.state import TrainState
from localitylab.train.stopping import StopRequests
from localitylab.train.tasks import Task, make_task, sums_to_means
from localitylab.train.trackers import Tracker, check_tracker, make_tracker


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    history: list[dict[str, Any]]

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def train(config: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Train as `config` says: on one process, or as one rank of a torchrun job."""
    ranks = distributed.from_environment(resolve_device(config.device))
    try:
        check_tracker(config.log)
        # The process that writes the run folder holds it (a file in the way fails now, not
        # after an epoch); a second run on it stops at once.
        holding = folder_lock(config.run_dir(), config.command()) if ranks.is_main else contextlib.nullcontext()
        with holding:
            return _train(config, reporter if ranks.is_main else None, ranks)
    finally:
        ranks.close()


@dataclass
class RunData:
    """The run's images on the device, as uint8 (cropped, flipped and normalised per step)."""

    info: DataInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    permutation: torch.Tensor | None


@dataclass
class Training:
    """Everything the loop works with, built once by `_set_up`."""

    config: TrainConfig
    ranks: distributed.Distributed
    reporter: Reporter
    data: RunData
    model: nn.Module  # what the checkpoint and the snapshots keep (an MAE run: the encoder)
    task: Task
    module: nn.Module  # what the optimiser trains (the model, or the task's wrapper of it)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: TrainState
    described: dict[str, Any]  # what every checkpoint says of the run besides its weights and state
    snapshots: SnapshotWriter
    use_amp: bool
    steps_per_epoch: int
    forward: nn.Module | None = None  # the module under DDP and torch.compile, once the run goes on

    @property
    def checkpoint(self) -> Path:
        return self.config.run_dir() / "ckpt.pt"

    def result(self) -> TrainResult:
        return TrainResult(self.config.run_dir(), self.checkpoint, self.state.history)


def _train(config: TrainConfig, reporter: Reporter | None, ranks: distributed.Distributed) -> TrainResult:
    distributed.check_batch_divides(config.batch_size, ranks.world_size)
    run_dir = config.run_dir()
    config, resumed = _checkpoint_to_resume(config, run_dir / "ckpt.pt")
    if ranks.is_main:
        _remove_torn_writes(run_dir)
    run = _set_up(config, reporter or Reporter(), ranks, resumed)
    state, reporter = run.state, run.reporter
    if resumed is not None:
        if state.epoch >= config.epochs:
            reporter.message(f"{run_dir}: already trained for {config.epochs} epochs; nothing to do")
            return run.result()
        reporter.message(f"resuming {run_dir} at {state.where()}")
    run.forward = _forward(run.module, ranks, switched_on(config.compile, ranks.device))

    # --- the epochs: batch i of epoch e draws everything random from (seed, e, i) -----------
    tracker = make_tracker(config.log, run_dir, config.to_dict(), describe_recipe(run.described["recipe"], config.dataset)) \
        if ranks.is_main else Tracker()
    reporter.start(config.epochs, run.steps_per_epoch, state.epoch + 1)
    with StopRequests() as stop, contextlib.closing(reporter), contextlib.closing(tracker):
        if state.step == 0:
            _snapshot_if_due(run)  # the initialisation, before the first step
        while state.epoch < config.epochs:
            _train_epoch(run, stop, tracker)
            _end_epoch(run, tracker)
    return run.result()


def _set_up(config: TrainConfig, reporter: Reporter, ranks: distributed.Distributed,
            resumed: dict[str, Any] | None) -> Training:
    """Data on the device, model (seeded), task, optimiser and schedule, and where the run
    stands: at step 0, or where the resumed checkpoint left it."""
    device = ranks.device
    data = data_on_device(config, device)
    info = data.info
    seed_everything(config.seed)
    spec = model_spec_for(config, info)
    model = build_model(spec)
    init_report = _initial_weights(model, config, resumed, reporter)
    task = make_task(config, info)
    module = task.module(model).to(device)
    recipe = recipe_record(config, info.crop_padding, info.hflip)
    reporter.message(describe_recipe(recipe, config.dataset))  # once the model is built: the run will start
    described = {"model_spec": spec.to_dict(), "data": info.to_dict(), "config": config.to_dict(),
                 "model_info": model_summary(model, spec.in_chans, spec.img_size),
                 "init_from": init_report.to_dict() if init_report else None, "code_version": code_version(),
                 "recipe": recipe}
    module = _fast_layout(module, config, ranks)
    optimizer, scheduler = _optimiser(module, config, len(data.train_x), reporter)
    steps_per_epoch = batches_per_epoch(len(data.train_x), config.batch_size)
    state = TrainState(device)
    if resumed is not None:
        _restore(resumed, model, task, module, optimizer, state, ranks)
        scheduler.step_update(state.step)
    schedule = parse_snapshots(config.snapshots)
    snapshots = SnapshotWriter(config.run_dir(), snapshot_steps(schedule, steps_per_epoch, config.epochs),
                               steps_per_epoch, schedule, writes=ranks.is_main)
    snapshots.resume_at(state.step)
    return Training(config, ranks, reporter, data, model, task, module, optimizer, scheduler, state, described,
                    snapshots, switched_on(config.amp, device), steps_per_epoch)


def _train_epoch(run: Training, stop: StopRequests, tracker: Tracker) -> None:
    """The rest of the epoch in progress (all of it, unless the run resumes mid-epoch)."""
    config, state, ranks, info = run.config, run.state, run.ranks, run.data.info
    seed = epoch_seed(config.seed, state.epoch + 1)
    run.module.train(not config.linear_probe)  # linear probing: frozen features, eval mode
    state.start_epoch()
    report_every = max(1, run.steps_per_epoch // 20)
    batches = train_batches(run.data.train_x, run.data.train_y, config.batch_size, seed, info.crop_padding, info.hflip,
                            start=state.batch)
    for i, (images, labels) in enumerate(batches, start=state.batch):
        loss = _step(run, images, labels, seed, i)
        if state.batch < run.steps_per_epoch:  # an epoch's last step: kept after its evaluation
            _snapshot_if_due(run)
        reporting = state.batch % report_every == 0
        shown = float(loss.detach()) if reporting else None
        run.reporter.step(state.epoch + 1, state.batch, shown)
        if reporting:
            tracker.step(state.step, {"train_loss": shown, "lr": run.optimizer.param_groups[0]["lr"]})
        # One process reads its flag every step; ranks agree at report points.
        if (reporting and ranks.any(stop.requested)) if ranks.enabled else stop.requested:
            _stop(run, stop)


def _step(run: Training, images: torch.Tensor, labels: torch.Tensor, seed: int, i: int) -> torch.Tensor:
    """One optimiser step on batch i of the epoch seeded `seed`; its loss (on the device)."""
    config, state, ranks, device = run.config, run.state, run.ranks, run.ranks.device
    seed_step(step_seed(seed, i, ranks.rank), device)  # dropout, drop-path, mixup
    if run.data.permutation is not None:
        images = permute_pixels(images, run.data.permutation)
    images, labels = ranks.shard(images), ranks.shard(labels)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.use_amp):
        loss, correct = run.task.loss(run.forward, run.task.inputs(run.data.info, images), labels,
                                      batch_generator(device, seed, i, ranks.rank))
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.clip_grad:
        nn.utils.clip_grad_norm_(run.module.parameters(), config.clip_grad)
    run.optimizer.step()
    state.step += 1
    run.scheduler.step_update(state.step)
    state.add(loss, correct, len(labels))
    return loss


def _stop(run: Training, stop: StopRequests) -> None:
    """SIGINT/SIGTERM: the step in progress is done; write a mid-epoch checkpoint and stop."""
    state = run.state
    state.check_finite(run.ranks, run.steps_per_epoch, run.checkpoint)
    _save(run)
    raise RunStopped(
        f"stopped by {stop.signal.name if stop.signal else 'a signal'} after step {state.step} "
        f"(epoch {state.epoch + 1}, batch {state.batch} of {run.steps_per_epoch}); checkpoint written to "
        f"{run.checkpoint}. The same settings with resume=True continue the run.", stop.exit_code)


def _end_epoch(run: Training, tracker: Tracker) -> None:
    """The epoch's figures and test evaluation, its snapshot if one is due, the checkpoint."""
    state = run.state
    state.check_finite(run.ranks, run.steps_per_epoch, run.checkpoint)
    row = state.finish_epoch(run.ranks, run.task.reports_accuracy)
    test = _test(run)
    state.history.append({**row, "lr": run.optimizer.param_groups[0]["lr"], **test})
    _snapshot_if_due(run, test)
    _save(run)
    run.reporter.epoch_end(state.history[-1])
    tracker.epoch(state.history[-1])


def _test(run: Training) -> dict[str, Any]:
    """test_loss and test_acc (None for tasks without accuracy) over the test split, every rank its share."""
    ranks, data = run.ranks, run.data
    sums = run.task.evaluate(run.module, data.info, data.test_x[ranks.rank::ranks.world_size],
                             data.test_y[ranks.rank::ranks.world_size], run.config.eval_batch_size, run.use_amp)
    test = sums_to_means(ranks.sum_all(sums))
    return {"test_loss": test["loss"], "test_acc": test["accuracy"] if run.task.reports_accuracy else None}


def _snapshot_if_due(run: Training, test: dict[str, Any] | None = None) -> None:
    """Keep the weights if the schedule has this step, with its test figures (evaluated here
    unless given; evaluation draws nothing from the global generators, so training is unchanged)."""
    if run.snapshots.due(run.state.step):
        run.snapshots.write(run.model.state_dict(), run.state.step, test or _test(run))


def _save(run: Training) -> None:
    """Write ckpt.pt and the files derived from it (rank 0; every rank takes part, since the
    running sums are added over ranks); a failed write keeps the last checkpoint."""
    payload = {**run.described, "model_state": run.model.state_dict(), "optimizer_state": run.optimizer.state_dict(),
               **run.task.checkpoint_extras(run.module), **run.state.state_dict(run.ranks),
               "snapshots": run.snapshots.listed()}
    if run.ranks.is_main:
        write_run(run.config.run_dir(), payload)
    run.ranks.barrier()


def _restore(resumed: dict[str, Any], model: nn.Module, task: Task, module: nn.Module,
             optimizer: torch.optim.Optimizer, state: TrainState, ranks: distributed.Distributed) -> None:
    """Everything a checkpoint holds for resuming: weights, the task's own part (an MAE
    decoder), the optimizer and the TrainState."""
    model.load_state_dict(resumed["model_state"])
    task.restore(module, resumed)
    optimizer.load_state_dict(resumed["optimizer_state"])
    state.load_state_dict(resumed, ranks)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**31 - 1)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def seed_step(seed: int, device: torch.device) -> None:
    """`seed_everything` for one step, seeding only the generators the step draws from: on a
    CPU, torch's CPU generator (what torch.manual_seed seeds for it) and numpy's.
    torch.manual_seed also seeds every accelerator torch knows of, 0.35 ms a call here, 1-4%
    of a nano model's step at batch 32 (benchmarks/RESULTS.md)."""
    if device.type != "cpu":
        seed_everything(seed)
        return
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed)


def data_options(config: TrainConfig) -> DataOptions:
    """How a run's data set is read: its files, size, flips and crop (None: the data set's
    default), the cache, and the hf: columns."""
    return DataOptions(data_dir=Path(config.data_dir) if config.data_dir else None, download=config.download,
                       img_size=config.img_size, seed=config.seed, hflip=config.hflip, crop_padding=config.crop_padding,
                       cache=config.cache, image_column=config.image_column, label_column=config.label_column)


def data_on_device(config: TrainConfig, device: torch.device) -> RunData:
    dataset = prepare_data(config)
    info = dataset.info
    return RunData(info, dataset.train_images.to(device), dataset.train_labels.to(device),
                   dataset.test_images.to(device), dataset.test_labels.to(device),
                   info.permutation.to(device) if info.permutation is not None else None)


def prepare_data(config: TrainConfig) -> ImageDataset:
    dataset = load_dataset(config.dataset, data_options(config))
    setting = config.pixel_permutation_setting()
    if setting is not None:  # `global` (a full shuffle) or `swaps-T-d` (the PiT paper's swap experiment)
        size = dataset.info.img_size
        dataset.info.permutation = permutation_for_setting(setting, size, size, config.permute_pixels)
        dataset.info.permute_seed = config.permute_pixels
        dataset.info.permute_setting = setting
    return dataset


def model_spec_for(config: TrainConfig, info: DataInfo) -> ModelSpec:
    return spec_for_data(config.model, info.img_size, info.in_chans, info.num_classes, config.pos_embed,
                         config.model_kw, config.drop_path, config.pos_embed_std)


def step_seed(epoch_seed_: int, batch: int, rank: int) -> int:
    return (epoch_seed_ * 1_000_003 + batch * 101 + rank) % (2**31 - 1)


def switched_on(setting: str, device: torch.device) -> bool:
    """`amp` and `compile`: on, off, or auto (on CUDA)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def _fast_layout(module: nn.Module, config: TrainConfig, ranks: distributed.Distributed) -> nn.Module:
    if model_kind(config.model) == "convnet":
        # channels-last convolutions: faster on GPUs, and 1.19-1.27x on this CPU (benchmarks/RESULTS.md)
        module.to(memory_format=torch.channels_last)
        if ranks.enabled and ranks.device.type == "cuda":  # batch statistics over the global batch, as on one process
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def _forward(module: nn.Module, ranks: distributed.Distributed, use_compile: bool) -> nn.Module:
    """What the step calls: the module, under DDP across ranks, compiled with `compile`."""
    forward = module
    if ranks.enabled:
        on_cuda = ranks.device.type == "cuda"
        forward = nn.parallel.DistributedDataParallel(module, device_ids=[ranks.device.index] if on_cuda else None)
    if use_compile:
        forward = torch.compile(forward)
    return forward


def _checkpoint_to_resume(config: TrainConfig, ckpt_path: Path) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The config to run with and the checkpoint to resume, if any. A resumed run keeps the
    values it was trained with where the user left a setting to the data set's default (the
    default may have changed since, as batch size and warm-up on digits did)."""
    if not ckpt_path.exists():
        return config, None
    if not config.resume:
        raise UserError(f"{ckpt_path} exists; pass resume to continue that run, or choose another out",
                        settings=("resume", "out"))
    resumed = read_checkpoint(ckpt_path)
    saved = resumed.get("config", {})
    kept = {name: saved[name] for name in FROM_DATA_SET
            if (config.recipe_from or {}).get(name) == DATA_SET and saved.get(name) is not None}
    if kept:
        sources = {**(config.recipe_from or {}), **{name: RESUMED for name in kept}}
        config = TrainConfig(**{**config.to_dict(), **kept, "recipe_from": sources})
    _check_same_run(saved, config, ckpt_path)
    return config, resumed


def _remove_torn_writes(run_dir: Path) -> None:
    """Temporaries a killed run left behind; the files they were meant to replace are whole."""
    for name in ("ckpt.pt", "metrics.csv", "run.json"):
        for stale in run_dir.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    for stale in (run_dir / SNAPSHOTS).glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def _initial_weights(model: nn.Module, config: TrainConfig, resumed: dict[str, Any] | None, reporter: Reporter):
    """`weights` (timm: models) and `init_from`; a resumed run takes its weights from its
    own checkpoint instead. Linear probing freezes all but the head either way."""
    report = None
    if resumed is None and config.weights:
        load_weights(model, config.weights)
    if resumed is None and config.init_from:
        report = init_from_checkpoint(model, config.init_from)
        reporter.message(report.summary())
    elif resumed is not None and config.init_from:
        report = InitReport(config.init_from)  # recorded already; see the first run.json
    if config.linear_probe:
        trainable = freeze_all_but_head(model)
        reporter.message(f"linear probe: training {', '.join(trainable)} only")
    return report


def _optimiser(module: nn.Module, config: TrainConfig, n_train: int, reporter=None):
    import logging

    import timm.optim
    from timm.scheduler import CosineLRScheduler

    # timm's factory puts biases, norms, pos_embed and cls_token in a no-decay group and
    # skips frozen parameters (a linear probe's encoder, an MAE encoder's head). Fused AdamW
    # (one kernel for all parameters) on CUDA and on CPU: 1.02-1.08x on this CPU's nano steps.
    optimizer = timm.optim.create_optimizer_v2(module, opt="adamw", lr=config.lr, weight_decay=config.weight_decay,
                                               fused=True)
    steps_per_epoch = batches_per_epoch(n_train, config.batch_size)
    total = config.epochs * steps_per_epoch
    warmup = warmup_steps(config.warmup_epochs, steps_per_epoch, total)
    if warmup != int(config.warmup_epochs * steps_per_epoch) and reporter is not None:
        reporter.message(f"warm-up of {config.warmup_epochs:g} epochs is at least as long as the run "
                         f"({config.epochs} epoch{'' if config.epochs == 1 else 's'}): shortened to {warmup} of its {total} steps (a fifth)")
    timm_logger = logging.getLogger("timm.scheduler.cosine_lr")
    level = timm_logger.level
    timm_logger.setLevel(logging.ERROR)  # "no effect" for a one-step run: said above where it matters
    try:
        scheduler = CosineLRScheduler(optimizer, t_initial=total, lr_min=config.min_lr, warmup_t=warmup,
                                      warmup_lr_init=1e-6, t_in_epochs=False)
    finally:
        timm_logger.setLevel(level)
    return optimizer, scheduler


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total: int) -> int:
    """The warm-up in steps: as asked, unless that is the whole run or more (a run that is all
    warm-up never reaches its learning rate): then a fifth of the run."""
    asked = int(warmup_epochs * steps_per_epoch)
    return asked if asked < total else total // 5


def _check_same_run(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    """A resumed run must agree on every setting that defines it. Compared as run.json holds
    them (a tuple and a list of the same values agree)."""
    for key, value in config.defining().items():
        if key in saved and _plain(saved[key]) != _plain(value):
            raise UserError(
                f"cannot resume {path}: {key} was {saved[key]!r}, now {value!r}; "
                f"re-run with the same settings or choose another out", setting="out"
            )


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
