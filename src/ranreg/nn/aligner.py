"""The Residual Aligner (RA) module of Table 4, and the plain per-level head of the
"without RA" ablation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ranreg.nn.blocks import act, conv, instance_norm
from ranreg.nn.variants import RA_ATTR_HIDDEN, RA_DDF_HIDDEN, RA_FUSE_CHANNELS, RA_MATCH_CHANNELS
from ranreg.spatial import compose_ddf, warp


@dataclass
class LevelOutput:
    """What one aligner level produced, on its own grid (displacements in its voxels).

    ``head_logits`` is theta_k; ``head_masks`` = softmax over heads of theta_k (the paper's
    multi-head mask); ``confidence`` is vartheta'_k (new estimate) and
    ``confidence_prev`` is theta'_{k-1} (previous DDF), ``None`` where not defined.
    """

    ddf: torch.Tensor
    head_logits: torch.Tensor | None = None
    head_masks: torch.Tensor | None = None
    confidence: torch.Tensor | None = None
    confidence_prev: torch.Tensor | None = None


class _ConfidenceHead(nn.Sequential):
    """Table 4 ``conv,norm,act`` -> 1 channel: a confidence map."""

    def __init__(self, ndim: int, cin: int) -> None:
        super().__init__(conv(ndim, cin, 1), instance_norm(ndim, 1), act())


class _MatchingPath(nn.Sequential):
    """Table 4 ``conv,act,conv,act`` 2C -> 18 -> 18 with the level's dilation r_k."""

    def __init__(self, ndim: int, feat_channels: int, dilation: int) -> None:
        super().__init__(
            conv(ndim, 2 * feat_channels, RA_MATCH_CHANNELS, 3, dilation),
            act(),
            conv(ndim, RA_MATCH_CHANNELS, RA_MATCH_CHANNELS, 3, dilation),
            act(),
        )


def _per_component(x: torch.Tensor, heads: int, ndim: int) -> torch.Tensor:
    """(B, m*d, *S) head-major -> (B*d, m, *S): the table's ``reshape`` that treats the d
    displacement components separately, with the m heads as channels."""
    b, spatial = x.shape[0], x.shape[2:]
    return x.reshape(b, heads, ndim, *spatial).transpose(1, 2).reshape(b * ndim, heads, *spatial)


def _repeat_components(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B, C, *S) -> (B*d, C, *S), matching the batch order of :func:`_per_component`."""
    return x.repeat_interleave(ndim, dim=0)


class ResidualAligner(nn.Module):
    """One RA module (Table 4, level k), for features with ``feat_channels`` per stream.

    Level 0 (``first=True``) sees only the features; later levels also take the previous
    DDF phi_{k-1} and head logits theta_{k-1}, already resampled to this level's grid.
    """

    def __init__(
        self, ndim: int, feat_channels: int, dilation: int, heads: int, first: bool
    ) -> None:
        super().__init__()
        self.ndim, self.heads, self.first = ndim, heads, first
        m, d = heads, ndim
        self.match = _MatchingPath(ndim, feat_channels, dilation)  # -> m_k
        self.ddf_heads = nn.Sequential(  # -> varphi_k, the multi-head DDF (m*d channels)
            conv(ndim, RA_MATCH_CHANNELS, RA_DDF_HIDDEN), act(), conv(ndim, RA_DDF_HIDDEN, m * d)
        )
        self.attributes = nn.Sequential(  # -> vartheta_k, head attributes (m channels)
            conv(ndim, RA_MATCH_CHANNELS, RA_ATTR_HIDDEN), act(), conv(ndim, RA_ATTR_HIDDEN, m)
        )
        # Table 4 prints 18 input channels for the confidence convs, but their inputs
        # (vartheta_k, theta_{k-1}) have m channels; m is the consistent reading.
        self.confidence = _ConfidenceHead(ndim, m)  # -> vartheta'_k
        self.logits = conv(ndim, m if first else 2 * m, m, 1)  # -> theta_k
        self.fuse_new = conv(ndim, m, RA_FUSE_CHANNELS)  # -> df_k
        if first:
            self.out = conv(ndim, RA_FUSE_CHANNELS, 1)  # -> phi_0
        else:
            self.confidence_prev = _ConfidenceHead(ndim, m)  # -> theta'_{k-1}
            self.fuse_prev = conv(ndim, m, RA_FUSE_CHANNELS)  # -> dp_k
            self.out = conv(ndim, 2 * RA_FUSE_CHANNELS, 1)  # -> phi_k

    def forward(
        self,
        feat_moving: torch.Tensor,
        feat_fixed: torch.Tensor,
        ddf_prev: torch.Tensor | None = None,
        logits_prev: torch.Tensor | None = None,
    ) -> LevelOutput:
        m, d = self.heads, self.ndim
        b, spatial = feat_fixed.shape[0], feat_fixed.shape[2:]
        if not self.first:
            feat_moving = warp(feat_moving, ddf_prev)
        mk = self.match(torch.cat([feat_moving, feat_fixed], dim=1))
        varphi = self.ddf_heads(mk)
        vartheta = self.attributes(mk)
        conf = self.confidence(vartheta)
        theta = self.logits(vartheta if self.first else torch.cat([vartheta, logits_prev], 1))
        masks = torch.softmax(theta, dim=1)

        # df_k: each head's DDF weighted by its mask, then a conv over heads per component
        weighted = varphi.reshape(b, m, d, *spatial) * masks.unsqueeze(2)
        df = self.fuse_new(_per_component(weighted.reshape(b, m * d, *spatial), m, d))
        fused = _repeat_components(conf, d) * df
        conf_prev = None
        if not self.first:
            # dp_k: the tensor product softmax(theta_k) (x) phi_{k-1}, then the same kind of conv
            outer = masks.unsqueeze(2) * ddf_prev.unsqueeze(1)
            dp = self.fuse_prev(_per_component(outer.reshape(b, m * d, *spatial), m, d))
            conf_prev = self.confidence_prev(logits_prev)
            fused = torch.cat([fused, _repeat_components(conf_prev, d) * dp], dim=1)
        ddf = self.out(fused).reshape(b, d, *spatial)
        return LevelOutput(ddf, theta, masks, conf, conf_prev)


class PlainAligner(nn.Module):
    """The ablation "without RA": the same matching path, then a plain DDF head.

    The head regresses a residual field psi_k that is composed with the previous DDF as in
    the supplement's Eq. (6): phi_k = psi_k + phi_{k-1}(x + psi_k(x)) in our convention.
    """

    def __init__(
        self, ndim: int, feat_channels: int, dilation: int, heads: int, first: bool
    ) -> None:
        super().__init__()
        del heads  # no heads in the plain head; accepted for a uniform constructor
        self.first = first
        self.match = _MatchingPath(ndim, feat_channels, dilation)
        self.head = nn.Sequential(
            conv(ndim, RA_MATCH_CHANNELS, RA_DDF_HIDDEN), act(), conv(ndim, RA_DDF_HIDDEN, ndim)
        )

    def forward(
        self,
        feat_moving: torch.Tensor,
        feat_fixed: torch.Tensor,
        ddf_prev: torch.Tensor | None = None,
        logits_prev: torch.Tensor | None = None,
    ) -> LevelOutput:
        if not self.first:
            feat_moving = warp(feat_moving, ddf_prev)
        psi = self.head(self.match(torch.cat([feat_moving, feat_fixed], dim=1)))
        return LevelOutput(psi if self.first else compose_ddf(ddf_prev, psi))
