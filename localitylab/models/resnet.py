"""ResNets with a CIFAR stem: a 3x3 convolution at stride 1 and no max-pool.

The ImageNet stem (7x7 stride 2 + max-pool) would shrink a 32x32 image to 8x8 before the
first block and an 8x8 digit to 2x2; small images need the full-resolution stem.
Built from timm's ResNet so the timm API (forward_features, forward_intermediates) holds.
"""

from __future__ import annotations

import torch.nn as nn

from localitylab.errors import UserError
from localitylab.models.registry import register_model
from localitylab.models.spec import ModelSpec

CONFIGS = {
    "n": dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128)),
    "18": dict(layers=(2, 2, 2, 2), channels=(64, 128, 256, 512)),
}


def build_cifar_resnet(spec: ModelSpec, depth: str) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    cfg = CONFIGS[depth]
    stem_width = cfg["channels"][0]
    kwargs = dict(
        block=BasicBlock,
        layers=list(cfg["layers"]),
        channels=tuple(cfg["channels"]),
        # timm's plain stem is always 64 wide; its 'deep' stem is 2 * stem_width wide, which
        # lets the first stage see `stem_width` channels. Its convolutions are replaced below.
        stem_type="deep",
        stem_width=stem_width // 2,
        in_chans=spec.in_chans,
        num_classes=spec.num_classes,
    )
    kwargs.update(spec.model_kw)
    try:
        model = ResNet(**kwargs)
    except TypeError as err:
        raise UserError(f"{spec.name}: {err}") from None
    except (ValueError, RuntimeError, AssertionError) as err:  # a model_kw value timm cannot build
        raise UserError(f"{spec.name} cannot be built with {dict(spec.model_kw)}: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    model.conv1 = nn.Conv2d(spec.in_chans, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    # Keep timm's feature metadata true to the new stem: every stage is 4x less reduced.
    for stage in model.feature_info:
        stage["reduction"] = max(1, stage["reduction"] // 4)
    return model


@register_model("resnet-n", kind="convnet", summary="ResNet, 4 stages of 1 basic block, 16-128 channels, CIFAR stem")
def _resnet_n(spec: ModelSpec) -> nn.Module:
    return build_cifar_resnet(spec, "n")


@register_model("resnet-18", kind="convnet", summary="ResNet-18 with a CIFAR stem (3x3 conv, stride 1, no max-pool)")
def _resnet_18(spec: ModelSpec) -> nn.Module:
    return build_cifar_resnet(spec, "18")
