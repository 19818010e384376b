"""The siamese encoder of Table 2."""

from __future__ import annotations

import torch
from torch import nn

from ranreg.nn.blocks import ResidualBlock, avg_pool
from ranreg.nn.variants import ENCODER_BLOCKS


class Encoder(nn.Module):
    """Four residual blocks (Table 2 rows 1-4 of each group), each followed by x2 pooling.

    Returns the skip features ``s1``..``s4`` (scales 1, 2, 4, 8) and ``s4d``, the last
    block's output after its downsample row (scale 16).
    """

    def __init__(self, ndim: int, in_channels: int = 1) -> None:
        super().__init__()
        blocks = []
        cin = in_channels
        for cout, _scale in ENCODER_BLOCKS:
            blocks.append(ResidualBlock(ndim, cin, cout))
            cin = cout
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            s = block(x)
            feats[f"s{i + 1}"] = s
            x = avg_pool(s)
        feats["s4d"] = x
        return feats
