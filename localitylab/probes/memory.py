"""What `localitylab.probe` needs besides the images for a model in memory: its default name,
the size it was built for, a DiT's input pipeline, and what the returned table records
(`table.attrs`)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch.nn as nn

from localitylab.data.registry import DataInfo

# What each metric suffix measures in (docs/probes.md); a metric with none of these is a
# count, a fraction of 1 or an accuracy as its name says.
UNITS = {"_px": "pixels of the model's input image", "_frac": "fraction of the image side (0-1)",
         "_ratio": "ratio (no unit)", "acc": "fraction correct (0-1)", "_deg": "degrees"}
HEAD_NA = "head = <NA>: the row is a mean over the layer's heads (or a value of the whole model or layer)"


def default_name(model: nn.Module) -> str:
    """A timm model's name (`timm:ARCHITECTURE`), else its class name."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return f"timm:{cfg['architecture']}"
    return type(model).__name__


def built_size(model: nn.Module) -> int | None:
    """The image side a timm model was built for when it differs from its data config's
    (e.g. `img_size=32`); None when they agree or the model does not say."""
    side = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if side is None:
        return None
    side = max(side) if isinstance(side, (tuple, list)) else int(side)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    configured = cfg.get("test_input_size") or cfg.get("input_size")
    return None if configured and max(configured[1:]) == side else int(side)


def dit_data(model: nn.Module) -> DataInfo | None:
    """A localitylab DiT's own input (its size and channels; a denoiser takes images on the
    diffusion scale, so no mean and std); None for any other model."""
    from localitylab.models.dit import DiffusionTransformer

    if not isinstance(model, DiffusionTransformer):
        return None
    chans = int(model.in_chans)
    return DataInfo("images in memory", int(model.img_size), chans, [], [0.5] * chans, [0.5] * chans)


def expects(model: nn.Module, target: Any) -> str:
    """What a model's prepared input is, in words (for the warning on [0, 1] floats)."""
    from localitylab.probes.inputs import short

    if hasattr(model, "run"):
        data = model.run.data
        return f"{data.in_chans}x{data.img_size}x{data.img_size} normalised with mean {short(data.mean)}, " \
               f"std {short(data.std)}"
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        from localitylab.models.preprocessing import Preprocessing

        pipeline = Preprocessing.of_model(model, img_size=built_size(model))
        return f"{'x'.join(map(str, pipeline.input_size))} normalised with mean {short(pipeline.mean)}, " \
               f"std {short(pipeline.std)} (timm's data config)"
    return "at the model's size and normalised as it was trained"


def table_attrs(target: Any, n_images: int) -> dict[str, Any]:
    """What a table from `localitylab.probe` records: how the images were prepared, how the
    intervals were made, the versions, the units and what head = <NA> means."""
    from localitylab.probes.measurements import CONFIDENCE, RESAMPLES
    from localitylab.probes.output import preprocessing_record
    from localitylab.train.checkpoint import versions

    preprocessing = ({"source": "prepared by the caller (float images fed as they are)"} if target.inputs_prepared
                     else preprocessing_record(target))
    if target.denoising is not None:
        preprocessing["denoiser"] = "images on the diffusion scale [-1, 1], noised to each level t of its schedule"
    return {"model": target.display_name, "n_images": n_images, "preprocessing": preprocessing,
            "interval": {"method": "percentile bootstrap over images", "level": CONFIDENCE, "resamples": RESAMPLES},
            "versions": versions(), "units": dict(UNITS), "head": HEAD_NA,
            "definitions": "docs/probes.md"}


@contextlib.contextmanager
def figures_to(figures: bool | str | Path | None) -> Iterator[tuple[Path | None, list]]:
    """(folder, figures): the folder the probes draw into (None: draw nothing) and, for
    `figures=True`, the list that receives the figures instead of files."""
    if figures is None or figures is False:
        yield None, []
        return
    if figures is True:
        import tempfile

        from localitylab.plotting import collecting_figures

        with tempfile.TemporaryDirectory() as scratch, collecting_figures() as drawn:
            yield Path(scratch), drawn
        return
    yield Path(figures), []
