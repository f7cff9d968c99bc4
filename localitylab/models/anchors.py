"""Where a feature location of a model's layer sits on the input image (docs/probes.md, Geometry).

The pixel anchor of location i of a feature map is the centre of its receptive field, given
by the convolution arithmetic of every layer up to it (Araujo et al. 2019, "Computing
receptive fields of convolutional neural networks"): with input pixel j at j + 0.5, a
convolution or pooling of kernel k, stride s, left padding p and dilation d maps
(start, step) to (start + ((k - 1) d / 2 - p) step, s step), and location i sits at
start + i step. After 3x3 stride-2 padding-1 convolutions location i sits at i s + 0.5, not
at (i + 0.5) s; a patchify stem (k = s, p = 0) puts it at (i + 0.5) s.

`ConvArithmetic` records, during one forward pass, the spatial size every convolution and
pooling module receives and returns, and propagates (start, step) from the image's size in
the order the modules run. A branch that reaches a size already reached (a ResNet's
downsampling shortcut) agrees with the main path in standard networks and is not counted
twice. A feature map of a size no recorded operation produced has no anchor (None); callers
fall back to the evenly stretched grid and say so.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch.nn as nn

SPATIAL_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass(frozen=True)
class GridAnchor:
    """Location (i, j) of a feature map sits at (start[0] + i step[0], start[1] + j step[1]) pixels."""

    start: tuple[float, float]
    step: tuple[float, float]

    def centre(self, row: int, col: int) -> tuple[float, float]:
        return self.start[0] + row * self.step[0], self.start[1] + col * self.step[1]

    def nearest(self, y: float, x: float, grid_h: int, grid_w: int) -> tuple[int, int]:
        """The location whose anchor is nearest the pixel coordinates (y, x), inside the grid."""
        row = min(max(round((y - self.start[0]) / self.step[0]), 0), grid_h - 1)
        col = min(max(round((x - self.start[1]) / self.step[1]), 0), grid_w - 1)
        return int(row), int(col)


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def _left_padding(module: nn.Module, size_in: int, size_out: int, kernel: int, stride: int, dilation: int,
                  axis: int) -> int:
    """The padding before the first pixel along one axis, as the module really pads."""
    padding = getattr(module, "padding", 0)
    dynamic = type(module).__name__.endswith("Same")  # timm's Conv2dSame / MaxPool2dSame: TF 'same', at run time
    if dynamic or padding == "same":
        total = max((size_out - 1) * stride + (kernel - 1) * dilation + 1 - size_in, 0)
        return total // 2
    if padding == "valid":
        return 0
    return _pair(padding)[axis]


class ConvArithmetic:
    """Records the spatial operations of forward passes; `anchor(h, w)` afterwards."""

    def __init__(self, image_size: tuple[int, int]) -> None:
        self.anchors: dict[tuple[int, int], GridAnchor] = {tuple(image_size): GridAnchor((0.5, 0.5), (1.0, 1.0))}

    def record(self, module: nn.Module, size_in: tuple[int, int], size_out: tuple[int, int]) -> None:
        if size_out in self.anchors or size_in not in self.anchors:
            return  # a second branch to a size already reached, or an input this arithmetic never saw
        kernel, stride = _pair(module.kernel_size), _pair(module.stride)
        dilation = _pair(getattr(module, "dilation", 1))
        source = self.anchors[size_in]
        start, step = [], []
        for axis in (0, 1):
            left = _left_padding(module, size_in[axis], size_out[axis], kernel[axis], stride[axis], dilation[axis], axis)
            start.append(source.start[axis] + ((kernel[axis] - 1) * dilation[axis] / 2 - left) * source.step[axis])
            step.append(source.step[axis] * stride[axis])
        self.anchors[size_out] = GridAnchor((start[0], start[1]), (step[0], step[1]))

    def anchor(self, grid_h: int, grid_w: int) -> GridAnchor | None:
        return self.anchors.get((int(grid_h), int(grid_w)))


@contextlib.contextmanager
def conv_arithmetic(model: nn.Module, image_size: tuple[int, int]) -> Iterator[ConvArithmetic]:
    """While active, forward passes of `model` record its convolution arithmetic."""
    arithmetic = ConvArithmetic(image_size)

    def hook(module: nn.Module, args: tuple, output) -> None:
        if args and hasattr(args[0], "shape") and hasattr(output, "shape") and args[0].dim() == 4 and output.dim() == 4:
            arithmetic.record(module, tuple(args[0].shape[-2:]), tuple(output.shape[-2:]))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, SPATIAL_MODULES)]
    try:
        yield arithmetic
    finally:
        for handle in handles:
            handle.remove()
