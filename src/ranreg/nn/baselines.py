"""Comparison networks for ablations: a direct-regression U-Net in the VoxelMorph style."""

from __future__ import annotations

import torch
from torch import nn

from ranreg.nn.blocks import act, conv
from ranreg.nn.padding import crop_to, pad_to_multiple, validate_pair

#: Encoder and decoder widths of VoxelMorph's default ("vm2") U-Net.
VXM_ENCODER = (16, 32, 32, 32)
VXM_DECODER = (32, 32, 32, 32)
VXM_REFINE = (32, 16, 16)


def _conv_act(ndim: int, cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(conv(ndim, cin, cout), act())


class VoxelMorphUNet(nn.Module):
    """Direct DDF regression from the concatenated pair, in the style of VoxelMorph.

    A 4-level U-Net (conv + LeakyReLU, max pooling, nearest upsampling, skip
    concatenation) whose last 3x3 conv outputs the d-channel DDF; that conv starts with
    weights ~ N(0, 1e-5) so training begins near the identity. Same call and output
    convention as :class:`ranreg.nn.ran.RAN`.
    """

    def __init__(self, ndim: int = 3, in_channels: int = 1) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        self.ndim, self.in_channels = ndim, in_channels
        self.config = {"name": "VoxelMorph", "ndim": ndim, "in_channels": in_channels}
        chans = [2 * in_channels, *VXM_ENCODER]
        self.down = nn.ModuleList(
            _conv_act(ndim, a, b) for a, b in zip(chans[:-1], chans[1:], strict=True)
        )
        up, cin = [], VXM_ENCODER[-1]
        for cout, skip in zip(VXM_DECODER, reversed(VXM_ENCODER), strict=True):
            up.append(_conv_act(ndim, cin, cout))
            cin = cout + skip
        self.up = nn.ModuleList(up)
        refine = []
        for cout in VXM_REFINE:
            refine.append(_conv_act(ndim, cin, cout))
            cin = cout
        self.refine = nn.Sequential(*refine)
        self.flow = conv(ndim, cin, ndim)
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)
        self._pool = {2: nn.MaxPool2d(2), 3: nn.MaxPool3d(2)}[ndim]

    def forward(
        self, moving: torch.Tensor, fixed: torch.Tensor, return_levels: bool = False
    ) -> torch.Tensor:
        validate_pair(moving, fixed, self.ndim, self.in_channels)
        shape = fixed.shape[2:]
        x = pad_to_multiple(torch.cat([moving, fixed], dim=1), 2 ** len(VXM_ENCODER))
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self._pool(x)
        for block in self.up:
            x = nn.functional.interpolate(block(x), scale_factor=2, mode="nearest")
            x = torch.cat([x, skips.pop()], dim=1)
        return crop_to(self.flow(self.refine(x)), shape)
