"""Where a probe's target comes from: a localitylab checkpoint (or its run folder), a registry
name (untrained), or `timm:NAME[.TAG]` untrained or with weights trained elsewhere; and the
seeded subset of the test split a probe measures.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from localitylab.data.registry import DataInfo, DataOptions, ImageDataset, load_dataset
from localitylab.device import resolve_device
from localitylab.errors import UserError
from localitylab.models.describe import describe_model
from localitylab.models.preprocessing import Preprocessing
from localitylab.models.registry import ModelSpec, build_model, default_pos_embed, spec_for_data
from localitylab.probes.target import ProbeTarget
from localitylab.train.checkpoint import load


def is_checkpoint_source(source: str) -> bool:
    path = Path(source).expanduser()
    return path.suffix == ".pt" or path.is_dir() or path.is_file()


def load_target(source: str, device: str = "auto", data: str | None = None, data_options: DataOptions | None = None,
                model_kw: dict[str, Any] | None = None, weights: str | None = None,
                pos_embed: str | None = None, seed: int = 0, pretrained: bool = False) -> tuple[ProbeTarget, ImageDataset]:
    """Resolve a model source and the data set to probe it on."""
    torch_device = resolve_device(device)
    options = data_options or DataOptions()
    if pretrained and weights:
        raise UserError("give pretrained or weights, not both: pretrained takes timm's own, weights a file",
                        settings=("pretrained", "weights"))
    if pretrained and not source.startswith("timm:"):
        raise UserError(f"pretrained applies to timm:NAME models (timm's own weights), not to {source}",
                        setting="pretrained")
    # A user's weights for a timm model they shaped (model_kw) are fed as that model takes them: below.
    if source.startswith("timm:") and (pretrained or (weights and not model_kw)):
        return load_timm_target(source, torch_device, data, options, model_kw, weights)
    if is_checkpoint_source(source):
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / "ckpt.pt"
        model = load(path, torch_device)
        run = model.run
        dataset_name = data or run.data.name
        dataset = load_dataset(dataset_name, run.data_options(dataset_name, options))
        _check_shapes(dataset, run.data)
        target = loaded_target(model, torch_device)
        if model_kw or weights:
            raise UserError("model_kw and weights apply to registry and timm: models, not to checkpoints",
                            settings=("model_kw", "weights"))
        return target, dataset

    # A registry name or timm:NAME, built here: shapes from the data set, as training does.
    dataset = load_dataset(data or "digits", options)
    info = dataset.info
    spec = spec_for_data(source, info.img_size, info.in_chans, info.num_classes, pos_embed or default_pos_embed(source) or "learn", model_kw)
    torch.manual_seed(seed)
    model = build_model(spec)
    if weights:
        from localitylab.models.timm_adapter import load_weights

        load_weights(model, weights)
    model = model.to(torch_device).eval()
    name = source + (" (untrained)" if not weights else f" ({Path(weights).name})")
    target = ProbeTarget(model, spec, info, describe_model(model), name, source, torch_device,
                         weights={"file": str(Path(weights).resolve())} if weights else {})
    _check_shapes(dataset, DataInfo(info.name, spec.img_size, spec.in_chans, info.class_names, info.mean, info.std))
    return target, dataset


def loaded_target(model: nn.Module, device: torch.device) -> ProbeTarget:
    """The target of a model `localitylab.load` returned (its `run` says what it is)."""
    run = model.run
    path = Path(run.path) if run.path is not None else None
    return ProbeTarget(model, run.spec, run.data, describe_model(model), run.display_name,
                       str(path) if path else run.spec.name, device, path.parent if path else None,
                       {"config": run.config, "metrics": run.metrics, "epoch": run.epoch, "versions": run.versions},
                       checkpoint_extras(path) if path else {})


def load_timm_target(source: str, device: torch.device, data: str | None, options: DataOptions,
                     model_kw: dict[str, Any] | None, weights: str | None) -> tuple[ProbeTarget, ImageDataset]:
    """A timm model with weights trained elsewhere (`weights` a file, or None for timm's
    pretrained weights), at the shapes they were trained for and fed by its own pipeline.
    `options.img_size` is the model's input size, given on purpose."""
    from localitylab.models.registry import parse_model_name
    from localitylab.models.timm_adapter import PRETRAINED, build_timm_pretrained

    parse_model_name(source)
    name = source[len("timm:"):]
    model_kw = dict(model_kw or {})
    img_size = options.img_size
    if "img_size" in model_kw:
        if img_size is not None and int(model_kw["img_size"]) != img_size:
            raise UserError(f"img_size {img_size} and model_kw's img_size={model_kw['img_size']} disagree",
                            settings=("img_size", "model_kw"))
        img_size = int(model_kw.pop("img_size"))
    model = build_timm_pretrained(name, weights or PRETRAINED, img_size, model_kw).to(device).eval()
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    architecture = cfg.get("architecture") or name.split(".")[0]
    if weights:
        display, described = f"timm:{architecture} ({Path(weights).name})", {"file": str(Path(weights).resolve())}
    else:
        tagged = f"{architecture}.{cfg['tag']}" if cfg.get("tag") else architecture
        display = f"timm:{tagged}"
        described = {"pretrained": tagged, "hf_hub_id": cfg.get("hf_hub_id"), "url": cfg.get("url") or None,
                     "license": cfg.get("license")}
    origin = f"{'weights file' if weights else 'pretrained_cfg'} of timm:{architecture}"
    preprocessing = Preprocessing.of_model(model, img_size, source=f"timm data config ({origin})"
                                           + (f", input size {img_size}" if img_size else ""))
    dataset = load_dataset(data or "digits", _decoding_options(data or "digits", options, preprocessing))
    info = DataInfo(dataset.info.name, preprocessing.img_size, preprocessing.input_size[0],
                    list(dataset.info.class_names), list(preprocessing.mean), list(preprocessing.std))
    spec = ModelSpec(display.split(" ")[0], preprocessing.img_size, preprocessing.input_size[0],
                     int(getattr(model, "num_classes", 0) or 0), None, model_kw)
    target = ProbeTarget(model, spec, info, describe_model(model), display, source, device,
                         preprocessing=preprocessing, weights=described)
    return target, dataset


def _decoding_options(dataset_name: str, options: DataOptions, preprocessing: Preprocessing) -> DataOptions:
    """The data set is read for the model's pipeline: a data set of image files is decoded at
    the pipeline's resize side (its shorter side to floor(size / crop_pct), centre-cropped to a
    square), where the pipeline then takes its centre crop; a data set of fixed size is read as
    it is and resized by the pipeline."""

    size = preprocessing.scale_size if dataset_name.startswith("folder:") else None
    return dataclasses.replace(options, img_size=size)


# Checkpoint keys copied into ProbeTarget.extras when present.
EXTRA_KEYS = ("mae_options", "mae_state", "diffusion_options")


def checkpoint_extras(path: Path) -> dict[str, Any]:
    """The EXTRA_KEYS entries of a checkpoint that `load` has already validated.

    Memory-mapped, so the model weights and optimizer state are not read a second time;
    the (small) entries kept are copied off the mapping.
    """
    from localitylab.io import safe_torch_load

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, ValueError, OSError):  # a legacy (non-zip) file cannot be mapped
        data = safe_torch_load(path)

    def detach(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, dict):
            return {k: detach(v) for k, v in value.items()}
        return value

    return {key: detach(data[key]) for key in EXTRA_KEYS if key in data}


def _check_shapes(dataset: ImageDataset, expected: DataInfo) -> None:
    got = tuple(dataset.test_images.shape[1:])
    want = (expected.in_chans, expected.img_size, expected.img_size)
    if got != want:
        raise UserError(f"data set {dataset.name} has images of shape {got}; the model takes {want}")


def select_images(dataset: ImageDataset, n_images: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of the test split (all of it when it is smaller); the count is
    checked with the probe settings (ProbeSettings.n_images)."""
    images, labels = dataset.test_images, dataset.test_labels
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n_images]
    return images[order], labels[order]
