"""The Residual Aligner-based Network: siamese encoder/decoder + five aligner levels."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ranreg.nn.aligner import LevelOutput, PlainAligner, ResidualAligner
from ranreg.nn.blocks import resize
from ranreg.nn.decoder import Decoder
from ranreg.nn.encoder import Encoder
from ranreg.nn.padding import crop_to, pad_to_multiple, validate_pair
from ranreg.nn.variants import (
    DECODER_CHANNELS,
    DEFAULT_HEADS,
    MAX_SCALE,
    NO_RA_SUFFIX,
    Variant,
    get_variant,
)
from ranreg.spatial import integrate_velocity, resize_ddf


@dataclass
class RegistrationOutput:
    """Result of ``model(moving, fixed, return_levels=True)``.

    ``ddf`` is (B, d, *S) on the input grid in voxels. ``levels[k]`` holds level k's DDF,
    head logits/masks and confidence maps on its own grid (pooling size ``scales[k]``,
    cropped to ceil(S / p_k)), displacements in voxels of that grid.
    """

    ddf: torch.Tensor
    levels: list[LevelOutput] = field(default_factory=list)
    scales: tuple[int, ...] = ()


class RAN(nn.Module):
    """RAN0 / RAN3 / RAN4 / RAN4+ (Tables 2-4), for 2D (``ndim=2``) or 3D images.

    ``model(moving, fixed)`` takes (B, C, *S) tensors of any spatial size and returns the
    DDF (B, d, *S) in voxels of the fixed grid, with ``warped(x) = moving(x + ddf(x))``.
    The moving and fixed streams share one encoder and one decoder (siamese); they run as
    one batch of 2B so the weights are used once per step. Inputs are zero-padded at the
    high end of each axis to a multiple of 16 (at least 32) and the DDF cropped back.

    Args:
        variant: a name from :data:`ranreg.nn.variants.VARIANTS` or a ``Variant``.
        ndim: 2 or 3.
        heads: number of heads m of each RA module.
        aligner: ``"ra"`` (the paper) or ``"plain"`` (the "without RA" ablation).
        in_channels: image channels.
        inverse_consistent: not in the paper. The aligners run both ways, g(m, f) and
            g(f, m) (one batch of 2B: the siamese features serve both), and the DDF is the
            flow of the antisymmetric velocity v = (g(m, f) - g(f, m)) / 2 (scaling and
            squaring), so by construction f(a, a) = 0, f(b, a) is the inverse of f(a, b)
            up to the integration's error, and the map folds only where the integration
            is too coarse. ``return_levels`` gives the levels of the m -> f direction.
    """

    def __init__(
        self,
        variant: str | Variant = "RAN4+",
        ndim: int = 3,
        heads: int = DEFAULT_HEADS,
        aligner: str = "ra",
        in_channels: int = 1,
        inverse_consistent: bool = False,
    ) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        aligner_cls = {"ra": ResidualAligner, "plain": PlainAligner}.get(aligner)
        if aligner_cls is None:
            raise ValueError(f"aligner must be 'ra' or 'plain', got {aligner!r}")
        self.variant = get_variant(variant) if isinstance(variant, str) else variant
        self.ndim, self.heads, self.in_channels = ndim, heads, in_channels
        self.inverse_consistent = bool(inverse_consistent)
        self.encoder = Encoder(ndim, in_channels)
        self.decoder = Decoder(ndim, self.variant)
        self.aligners = nn.ModuleList(
            aligner_cls(ndim, DECODER_CHANNELS[k], self.variant.dilations[k], heads, k == 0)
            for k in range(len(DECODER_CHANNELS))
        )
        self.config = {
            "name": self.variant.name + ("" if aligner == "ra" else NO_RA_SUFFIX),
            "ndim": ndim,
            "heads": heads,
            "in_channels": in_channels,
        }
        if self.inverse_consistent:  # absent from configs of the paper's networks
            self.config["inverse_consistent"] = True

    def forward(
        self, moving: torch.Tensor, fixed: torch.Tensor, return_levels: bool = False
    ) -> torch.Tensor | RegistrationOutput:
        validate_pair(moving, fixed, self.ndim, self.in_channels)
        shape = tuple(fixed.shape[2:])
        b = fixed.shape[0]
        both = pad_to_multiple(torch.cat([moving, fixed], dim=0), MAX_SCALE, 2 * MAX_SCALE)
        features = self.decoder(self.encoder(both))

        levels: list[LevelOutput] = []
        ddf = logits = None
        for feat, aligner in zip(features, self.aligners, strict=True):
            grid = feat.shape[2:]
            if ddf is not None:  # Table 4 "upsample" rows: phi and theta to this level's grid
                ddf = resize_ddf(ddf, grid) if ddf.shape[2:] != grid else ddf
                logits = None if logits is None else resize(logits, grid)
            if self.inverse_consistent:  # m -> f in the first half, f -> m in the second
                out = aligner(feat, feat.roll(b, dims=0), ddf, logits)
            else:
                out = aligner(feat[:b], feat[b:], ddf, logits)
            ddf, logits = out.ddf, out.head_logits
            levels.append(out)

        result = crop_to(ddf, shape)
        if self.inverse_consistent:
            result = integrate_velocity(0.5 * (result[:b] - result[b:]).float())
            for level in levels:
                for name, value in vars(level).items():
                    if value is not None:
                        setattr(level, name, value[:b])
        if not return_levels:
            return result
        scales = self.variant.scales
        for level, p in zip(levels, scales, strict=True):
            level_shape = tuple(-(-n // p) for n in shape)
            for name, value in vars(level).items():
                if value is not None:
                    setattr(level, name, crop_to(value, level_shape))
        return RegistrationOutput(result, levels, scales)
