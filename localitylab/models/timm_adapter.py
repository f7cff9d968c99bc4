"""Any timm model as a localitylab model: `timm:NAME[.TAG]` with `model_kw`, `weights`
and `pretrained`.

Built untrained (to train it, or as the no-learning baseline), a timm model takes its image
size, channels and classes from the data set unless `model_kw` sets them, as training
does. With weights from elsewhere (`build_timm_pretrained`) it keeps the shapes those
weights were trained for, and they are loaded the way timm loads them: `pretrained`
through its pretrained configs and the Hugging Face hub (the hub's own cache, `HF_HOME`,
`HF_HUB_OFFLINE`), `weights FILE` through the same `load_pretrained` on a state dict read
from a local file (safetensors, or a torch file loaded with `weights_only=True`: nothing is
unpickled), so timm's checkpoint filters, position-embedding resampling and input-conv
adaptation apply to both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from localitylab.errors import UserError
from localitylab.models.spec import ModelSpec


def check_timm_name(name: str) -> None:
    """A UserError unless timm knows `name` (an architecture, with a pretrained tag if one is given)."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    if not timm.is_model(name):
        raise UserError(f"unknown timm model {name!r}{_similar_timm_names(name)}")
    architecture, tag = split_model_name_tag(name)
    if tag:
        try:
            get_pretrained_cfg(name)
        except RuntimeError:
            raise UserError(f"timm has no pretrained tag {tag!r} for {architecture}; tags: "
                            f"{pretrained_tags(architecture)}") from None


def _similar_timm_names(name: str) -> str:
    """'; did you mean: ...' with the timm names closest to `name` by edit distance (difflib's
    ratio: `vit_smal_patch16_224` -> vit_small_patch16_224), tags matched among the pretrained."""
    import difflib

    import timm

    names = timm.list_pretrained() if "." in name else timm.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.75)
    return f"; did you mean: {', '.join(close)}" if close else "; see timm.list_models()"


def pretrained_tags(architecture: str) -> str:
    import timm

    names = timm.list_pretrained(f"{architecture}.*")
    return ", ".join(n.split(".", 1)[1] for n in names) or "none (timm has no pretrained weights for it)"


def build_timm_model(spec: ModelSpec) -> nn.Module:
    import timm

    name = spec.name[len("timm:"):]
    check_timm_name(name)
    kwargs: dict[str, Any] = dict(in_chans=spec.in_chans, num_classes=spec.num_classes, img_size=spec.img_size)
    kwargs.update(spec.model_kw)
    try:
        try:
            return timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as err:
            # ConvNets take no img_size; only drop it if the user did not ask for it.
            if "img_size" not in str(err) or "img_size" in spec.model_kw:
                raise
            kwargs.pop("img_size")
            return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise UserError(f"timm:{name} cannot be built with {kwargs}: {err}") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file holding tensors only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"{path} is not a readable safetensors file: {err}") from None
    from localitylab.io import safe_torch_load

    data = safe_torch_load(path)
    for key in ("model_state", "state_dict", "model"):  # common wrappers
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"{path} holds no state dict of tensors")
    return data


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict into `model`; a shape or key mismatch is one UserError line naming
    the first tensor (in the model's order) that disagrees."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with other shapes, the first {k}: file {tuple(state[k].shape)}, "
                         f"model {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing (the first {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (the first {unexpected[0]})")
        raise UserError(f"weights in {path} do not fit the model: " + "; ".join(parts)
                        + "; the model is built from the data set's shapes and model_kw",
                        setting="model_kw")
    model.load_state_dict(state)


# --- weights trained elsewhere -----------------------------------------------------------------
PRETRAINED = "pretrained"  # `weights` value: timm's own source for the model (the hub, or a URL)


def build_timm_pretrained(name: str, weights: str | Path, img_size: int | None = None,
                          model_kw: dict[str, Any] | None = None) -> nn.Module:
    """timm model `name` (`arch` or `arch.tag`) with weights trained elsewhere, at the shapes
    they were trained for: `weights` is PRETRAINED (timm's pretrained config: the Hugging Face
    hub through its local cache, or the config's URL) or a local file. `img_size` overrides
    the input size (timm resamples the position embedding); `model_kw` goes to the model.

    Any failure to get or fit the weights is one UserError line."""
    import timm

    check_timm_name(name)
    kwargs: dict[str, Any] = dict(model_kw or {})
    if img_size is not None:
        kwargs["img_size"] = img_size
    overlay: dict[str, Any] = {}
    if weights != PRETRAINED:
        state = read_state_dict(weights)
        overlay["state_dict"] = state  # timm's load_pretrained takes a state dict as its source
        classes = file_num_classes(name, state)
        if classes is not None and "num_classes" not in kwargs:
            kwargs["num_classes"] = classes
            overlay["num_classes"] = classes  # the file's head is the model's: load it, strictly
    else:
        _check_has_pretrained(name)
        from localitylab.network import hub_offline

        hub_offline()  # one connection attempt: unreachable, the hub's cache only (no retries)
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay or None, **kwargs)
    except _loading_errors() as err:
        raise UserError(_weights_error(name, weights, err)) from err


def _loading_errors() -> tuple[type[BaseException], ...]:
    """What getting and fitting weights raises: a missing cache entry or network (OSError,
    the hub's errors), tensors that do not fit (RuntimeError), a config timm refuses."""
    errors: tuple[type[BaseException], ...] = (OSError, RuntimeError, ValueError, KeyError, TypeError)
    try:
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        errors += (HfHubHTTPError, OfflineModeIsEnabled)
    except ImportError:
        pass
    return errors


def _check_has_pretrained(name: str) -> None:
    from timm.models import get_pretrained_cfg, split_model_name_tag

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        architecture = split_model_name_tag(name)[0]
        raise UserError(f"timm has no pretrained weights for {name}; pretrained tags of {architecture}: "
                        f"{pretrained_tags(architecture)}")


def file_num_classes(name: str, state: dict[str, torch.Tensor]) -> int | None:
    """How many classes the classifier in a state dict has (0 for a file without one, such as
    a self-supervised encoder's), by the classifier name in timm's pretrained config; None
    when the config names none."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    classifiers = cfg.classifier if cfg is not None else None
    if not classifiers:
        return None
    first = classifiers if isinstance(classifiers, str) else classifiers[0]
    weight = state.get(f"{first}.weight")
    return int(weight.shape[0]) if weight is not None else 0


def _weights_error(name: str, weights: str | Path, err: Exception) -> str:
    """One line for a failure of timm's loading: a missing network or cache entry, a file whose
    tensors do not fit, or anything else timm raised."""
    text = " ".join(str(err).split())
    where = "pretrained weights" if weights == PRETRAINED else f"weights in {weights}"
    try:
        from huggingface_hub import constants
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:  # timm falls back to URLs without huggingface_hub
        LocalEntryNotFoundError = OfflineModeIsEnabled = HfHubHTTPError = ()  # noqa: N806
        constants = None
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        from localitylab.network import hub_offline, why_offline

        cache = getattr(constants, "HF_HUB_CACHE", "the hub cache")
        why = why_offline() if hub_offline() else "the hub could not be reached"
        return (f"timm:{name}: {where} are not in the local hub cache ({cache}) and {why}; "
                f"download them once with network, or give them as a file (safetensors or state dict)")
    if isinstance(err, HfHubHTTPError):
        return f"timm:{name}: the hub refused the {where}: {text[:300]}"
    if isinstance(err, OSError):
        return f"timm:{name}: {where} could not be fetched: {text[:300]}"
    if isinstance(err, RuntimeError) and "state_dict" in text:
        return f"{where} do not fit timm:{name}: {_load_mismatch(text)}"
    return f"timm:{name}: {where} could not be loaded: {type(err).__name__}: {text[:300]}"


def _load_mismatch(text: str) -> str:
    """A one-line summary of torch's load_state_dict error (missing, unexpected, other shapes)."""
    import re

    parts = []
    shapes = re.findall(r"size mismatch for ([\w.]+): copying a param with shape torch.Size\((\[[^\]]*\])\) "
                        r"from checkpoint, the shape in current model is torch.Size\((\[[^\]]*\])\)", text)
    if shapes:
        key, got, want = shapes[0]
        parts.append(f"{len(shapes)} with other shapes (e.g. {key}: file {got}, model {want})")
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*?)\.(?: Unexpected|$| size)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*?)\.(?: size|$| Missing)")):
        found = re.search(pattern, text)
        if found:
            keys = re.findall(r'"([^"]+)"', found.group(1))
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
    return "; ".join(parts) or text[:300]
