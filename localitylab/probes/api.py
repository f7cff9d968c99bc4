"""`localitylab.probe`: a probe on a model in memory, the way researchers work in notebooks.

    import localitylab, timm
    model = timm.create_model("vit_base_patch16_224.augreg_in21k", pretrained=True)
    table = localitylab.probe("attention-distance", model, uint8_images)   # a tidy DataFrame

The model is any `nn.Module` the probes can read (a timm model, a fine-tuned ViT of your
own, a model `localitylab.load` returned, a DiT); the images are uint8 at any size and in
any common layout (localitylab/probes/inputs.py), prepared by the model's own pipeline at
the size it takes, or floats already prepared. The same `Probe.run`
as the command line and the studies does the work; nothing is written unless `figures`
names a folder.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from localitylab.data.registry import DataInfo
from localitylab.errors import UserError
from localitylab.models.describe import describe_model
from localitylab.models.preprocessing import Preprocessing
from localitylab.models.registry import ModelSpec
from localitylab.probes.inputs import check_prepared, collect, fit_to_model
from localitylab.probes.memory import built_size, default_name, dit_data, expects, figures_to, table_attrs
from localitylab.probes.base import parse_probe_settings
from localitylab.probes.registry import get_probe, probe_fields, probe_names
from localitylab.probes.sources import loaded_target
from localitylab.probes.target import Denoising, ProbeTarget, check_timesteps
from localitylab.progress import make_progress

# preprocessing= values besides a Preprocessing or a DataInfo
AUTO, TIMM, PREPARED = "auto", "timm", "prepared"


def probe(name: str, model: nn.Module, images: Any, labels: torch.Tensor | np.ndarray | None = None,
          *, preprocessing: str | Preprocessing | DataInfo = AUTO, model_name: str | None = None,
          figures: bool | str | Path | None = None, options: Mapping[str, Any] | None = None,
          layout: str | None = None, progress: bool = True, **settings: Any) -> pd.DataFrame | tuple[pd.DataFrame, list]:
    """Run probe `name` ('all' for every probe) on `model` and return its tidy table.

    images: uint8 or float images as (N, C, H, W), (N, H, W, C) or (N, H, W), a list of
        arrays or PIL images of any sizes, a torch Dataset or DataLoader (items `image` or
        `(image, label)`); uint8 images at another size than the model takes are resized with
        its own interpolation (a warning says so); floats are the model's input as they are.
        `layout='NCHW'|'NHWC'` settles a shape where either end could be the channels.
    labels: (N,) class indices, for the probes that measure accuracy (`permutation`); a
        Dataset's or DataLoader's own labels when None.
    preprocessing: how uint8 images become the model's input —
        'auto': a `localitylab.load` model's own (its data set's normalisation and
                permutation); a timm model's own (`'timm'`, at the size it was built for);
                a DiT in memory is fed as a denoiser; float images: 'prepared';
        'timm': timm's data config for the model (`resolve_model_data_config`), resized
                and normalised as `create_transform` would;
        'prepared': the images are the model's input already;
        a `Preprocessing` (another data config) or a `DataInfo` (normalise only).
    progress: False hides the progress bars (shown in a terminal or a notebook).
    figures: True returns `(table, [matplotlib figures])`; a folder draws the probe's figures
        into it; None draws nothing.
    settings: the probe settings as keywords (localitylab/probes/settings.py: `batch_size`,
        `seed`, `timesteps` (a denoiser's noise levels; None: its defaults), `n_images` (the
        first n of `images`; all by default) and every probe's own options, e.g.
        `query="4,4"`); `options` is the same as a dict.

    The model runs in eval mode on its own device and is left as it was found; the
    table's `model` column is `model_name` (default: the timm name, the run's name, else the
    class name); `table.attrs` records the preprocessing, intervals, versions and units.
    """
    names = probe_names() if name == "all" else [name]
    probes = [get_probe(n) for n in names]
    refused = [f.name for f in probe_fields(probes) if not f.in_memory and f.name in settings]
    if refused:
        raise UserError(f"{refused[0]} does not apply to a model in memory: it runs where it is", setting=refused[0])
    run = parse_probe_settings(probes, {**dict(options or {}), **settings})
    images, labels = collect(images, labels, layout)
    if labels is None and any(p.needs_labels for p in probes):
        needing = ", ".join(p.name for p in probes if p.needs_labels)
        raise UserError(f"{needing} measures accuracy: pass labels=(N,) class indices")
    if labels is None:
        labels = torch.zeros(len(images), dtype=torch.long)
    if run.settings.n_images is not None:
        images, labels = images[:run.settings.n_images], labels[:run.settings.n_images]
    target = memory_target(model, images, preprocessing, model_name)
    check_timesteps(target, run.settings.timesteps)
    if target.inputs_prepared:
        images = check_prepared(images, expects(model, target))
    else:
        images = fit_to_model(target, images)
    tables, bars = [], make_progress(progress)
    with _eval_mode(model), figures_to(figures) as (folder, drawn), bars.task("probes", len(probes)) as task:
        for one, parsed in zip(probes, run.options):
            result = one.run(target, images, labels, parsed, settings=run.settings, progress=bars)
            task.advance()
            if folder is not None:
                one.plot([result.table], folder)
                if result.applies:
                    one.figures(target, result.drawing, folder)
            tables.append(result.table)
    table = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
    table.attrs.update(table_attrs(target, len(images)))
    return (table, drawn) if figures is True else table


def describe_keywords() -> None:
    """Give `probe` a signature and docstring listing every probe setting as a keyword (the
    registered probes' options included), for help() and editors; any probe registered later
    is still read at call time."""
    import inspect

    fixed = [p for p in inspect.signature(probe, follow_wrapped=False).parameters.values()
             if p.kind != inspect.Parameter.VAR_KEYWORD] if not hasattr(probe, "__fixed__") else probe.__fixed__
    probe.__fixed__ = fixed
    fields = [f for f in probe_fields() if f.in_memory]
    probe.__signature__ = inspect.Signature(
        fixed + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default) for f in fields],
        return_annotation=pd.DataFrame)
    probe.__doc__ = probe.__doc__.split("\n\n    Keywords:")[0] + "\n\n    Keywords:\n" + "\n".join(
        f"        {f.name} (default {f.default!r}): {f.help}" for f in fields)


def memory_target(model: nn.Module, images: torch.Tensor, preprocessing: str | Preprocessing | DataInfo = AUTO,
                  model_name: str | None = None) -> ProbeTarget:
    """A ProbeTarget for a model in memory fed with `images` (their dtype and size say what
    'auto' means)."""
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch nn.Module, got {type(model).__name__}")
    device = _device_of(model)
    floats = images[0].is_floating_point()
    if hasattr(model, "run") and preprocessing in (AUTO, None):
        target = loaded_target(model, device)
        target.inputs_prepared = floats
        if model_name:
            target.display_name = model_name
        return target
    dit = dit_data(model)
    if preprocessing == AUTO:
        if floats:
            preprocessing = PREPARED
        elif isinstance(getattr(model, "pretrained_cfg", None), dict):
            preprocessing = TIMM
        elif dit is not None:
            preprocessing = dit
        else:
            raise UserError(f"{type(model).__name__} has no input pipeline of its own (no timm pretrained_cfg): "
                            "pass preprocessing= a Preprocessing or a DataInfo, or images already prepared")
    display = model_name or default_name(model)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    chans, height, width = images[0].shape
    pipeline: Preprocessing | None = None
    prepared = False
    if preprocessing == PREPARED:
        if not floats:
            raise UserError("preprocessing='prepared' takes float images, the model's input; these are "
                            f"{images.dtype}")
        data = DataInfo("images in memory", int(max(height, width)), int(chans), [], [0.0] * chans, [1.0] * chans)
        prepared = True
    else:
        if images[0].dtype != torch.uint8:
            raise UserError(f"images to prepare must be uint8 (N, C, H, W), got {images[0].dtype}; pass "
                            "preprocessing='prepared' for images that are already the model's input")
        if preprocessing == TIMM:
            built = built_size(model)
            pipeline = Preprocessing.of_model(model, img_size=built, source=f"timm data config of {display}" + (
                f" + img_size {built} (the size it was built for)" if built else ""))
        elif isinstance(preprocessing, Preprocessing):
            pipeline = preprocessing
        elif isinstance(preprocessing, DataInfo):
            data = preprocessing
        else:
            raise UserError(f"preprocessing must be 'auto', 'timm', 'prepared', a Preprocessing or a DataInfo, "
                            f"got {preprocessing!r}")
        if pipeline is not None:
            data = DataInfo("images in memory", pipeline.img_size, pipeline.input_size[0], [], list(pipeline.mean),
                            list(pipeline.std))
    spec = ModelSpec(model_name or type(model).__name__, data.img_size, data.in_chans, num_classes)
    return ProbeTarget(model, spec, data, describe_model(model), display, "in memory", device,
                       preprocessing=pipeline, inputs_prepared=prepared,
                       weights={"in_memory": type(model).__name__}, denoising=_denoising_in_memory(model))


def _denoising_in_memory(model: nn.Module) -> Denoising | None:
    """A localitylab DiT in memory is fed as a denoiser (the default schedule, as an untrained
    `dit-*/P` is); any other model as a classifier."""
    from localitylab.models.dit import DiffusionTransformer

    if not isinstance(model, DiffusionTransformer):
        return None
    from localitylab.diffusion.objective import DiffusionObjective

    return Denoising(DiffusionObjective())


def _device_of(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode while probing (no dropout, no drop-path); each module's own mode restored after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.train(training)
