"""The siamese decoder of Table 3, configured by a :class:`~ranreg.nn.variants.Variant`."""

from __future__ import annotations

import torch
from torch import nn

from ranreg.nn.blocks import ResidualBlock, conv, resize
from ranreg.nn.variants import (
    DECODER_CHANNELS,
    ENCODER_FEATURE_CHANNELS,
    MAX_SCALE,
    Variant,
)


class Decoder(nn.Module):
    """Five residual blocks producing F_0..F_3 and F_4 (= s9, see ``variants``).

    Block k (k = 0..4) runs at pooling size ``variant.scales[k]``; its inputs (the previous
    output ``F`` and the skips named in ``variant.inputs[k]``) are brought to that scale by
    linear interpolation (Table 3's ``upsample`` rows) and concatenated. With
    ``variant.skip_channels`` set, each skip first passes a 1x1 conv to that many channels.
    """

    def __init__(self, ndim: int, variant: Variant) -> None:
        super().__init__()
        self.variant = variant
        used = sorted({name for names in variant.inputs for name in names if name != "F"})
        if variant.skip_channels is None:
            self.reduce = nn.ModuleDict()
            skip_ch = {name: ENCODER_FEATURE_CHANNELS[name] for name in used}
        else:
            self.reduce = nn.ModuleDict(
                {
                    name: conv(ndim, ENCODER_FEATURE_CHANNELS[name], variant.skip_channels, 1)
                    for name in used
                }
            )
            skip_ch = {name: variant.skip_channels for name in used}

        blocks = []
        prev = 0
        for k, names in enumerate(variant.inputs):
            cin = sum(prev if name == "F" else skip_ch[name] for name in names)
            if cin != variant.c_list[k]:  # the table's own caption checks our reading
                raise AssertionError(
                    f"{variant.name} decoder block {k + 1}: {cin} input channels, "
                    f"Table 3 says c_{k} = {variant.c_list[k]}"
                )
            blocks.append(ResidualBlock(ndim, cin, DECODER_CHANNELS[k]))
            prev = DECODER_CHANNELS[k]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, feats: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Return [F_0, F_1, F_2, F_3, F_4] at the variant's scales."""
        full = feats["s1"].shape[2:]
        skips = {
            name: (self.reduce[name](feats[name]) if name in self.reduce else feats[name])
            for name in {n for names in self.variant.inputs for n in names if n != "F"}
        }
        out: list[torch.Tensor] = []
        prev: torch.Tensor | None = None
        for k, (names, block) in enumerate(zip(self.variant.inputs, self.blocks, strict=True)):
            p = self.variant.scales[k]
            size = tuple(n // p for n in full)
            parts = [resize(prev if name == "F" else skips[name], size) for name in names]
            prev = block(torch.cat(parts, dim=1))
            out.append(prev)
        return out


def check_divisible(shape: torch.Size | tuple[int, ...]) -> None:
    """Inputs reaching the encoder must be multiples of the coarsest pooling size."""
    if any(n % MAX_SCALE for n in shape):
        raise ValueError(f"spatial shape {tuple(shape)} is not a multiple of {MAX_SCALE}")
