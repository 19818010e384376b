"""Building blocks shared by the encoder, decoder and RA modules, for d = 2 and d = 3."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: LeakyReLU slope of the authors' release.
NEGATIVE_SLOPE = 0.2


def conv(ndim: int, cin: int, cout: int, kernel: int = 3, dilation: int = 1) -> nn.Module:
    """A d-dimensional convolution with 'same' padding (odd kernels) and a bias."""
    cls = {2: Conv2d, 3: Conv3d}[ndim]
    return cls(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation)


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Float32 on the CPU outside autocast, where oneDNN is built in and enabled."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
    )


class _OneDNNForward:
    """Runs a float32 CPU convolution's forward pass through oneDNN.

    ATen sends a batch-1 float32 convolution with N*C*D*H <= 20480 (every 3D level at or
    below 32^3 with 18 channels) to its reference kernel (``slow_conv3d``), a heuristic
    tuned for 2D; oneDNN is ~7x faster there (1x18x32^3, 3^3 kernel, 2-core EPYC, AVX2).
    The weights, the result (to rounding) and the backward pass (ATen's) are unchanged.
    """

    def _conv_forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self.padding_mode == "zeros" and _use_onednn(x, weight):
            return torch.mkldnn_convolution(
                x, weight, bias, self.padding, self.stride, self.dilation, self.groups
            )
        return super()._conv_forward(x, weight, bias)  # type: ignore[misc]


class Conv2d(_OneDNNForward, nn.Conv2d):
    """``nn.Conv2d`` with the oneDNN forward of :class:`_OneDNNForward`."""


class Conv3d(_OneDNNForward, nn.Conv3d):
    """``nn.Conv3d`` with the oneDNN forward of :class:`_OneDNNForward`."""


class InstanceNorm(nn.GroupNorm):
    """Instance normalisation without learnt affine parameters, for any d.

    A ``GroupNorm`` with one group per channel: the same statistics as ``InstanceNorm*d``
    (per sample and channel, biased variance, eps 1e-5) and no parameters or buffers, so
    checkpoints are unchanged; unlike ``InstanceNorm*d`` it keeps the channels-last layout
    on the CPU instead of copying every activation. It also runs in its input's dtype
    under autocast (the kernels accumulate in float32), so a bf16 network does not
    convert every activation to float32 and back around each norm.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _REDUCED and torch.is_grad_enabled() and x.requires_grad:
            # ATen's group-norm backward in bf16 is ~2.3x slower than this one (channels-last,
            # 2x16x48x32x64 on AVX512-BF16): it was a quarter of a bf16 training step
            return _ReducedInstanceNorm.apply(x, self.eps)
        with torch.autocast(x.device.type, enabled=False):
            return nn.functional.group_norm(x, self.num_groups, None, None, self.eps)


_REDUCED = (torch.bfloat16, torch.float16)


class _ReducedInstanceNorm(torch.autograd.Function):
    """Instance normalisation of a bf16/fp16 tensor with float32 statistics and gradient.

    Saves the normalised output ``y`` and ``1/std``; the gradient is the textbook
    ``dx = (dy - mean(dy) - y * mean(dy * y)) / std`` over each sample's channel.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, eps: float) -> torch.Tensor:
        dims = tuple(range(2, x.dim()))
        xf = x.float()
        var, mean = torch.var_mean(xf, dim=dims, keepdim=True, correction=0)
        rstd = torch.rsqrt(var + eps)
        y = ((xf - mean) * rstd).to(x.dtype)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, None]:
        y, rstd = ctx.saved_tensors
        dims = tuple(range(2, y.dim()))
        dyf, yf = dy.float(), y.float()
        centred = dyf - dyf.mean(dims, keepdim=True)
        dx = rstd * (centred - yf * (dyf * yf).mean(dims, keepdim=True))
        return dx.to(dy.dtype), None


def instance_norm(ndim: int, channels: int) -> nn.Module:
    """Instance normalisation without learnt affine parameters (:class:`InstanceNorm`)."""
    del ndim  # one module for any number of spatial dimensions
    return InstanceNorm(channels)


def channels_last_format(dim: int) -> torch.memory_format | None:
    """The channels-last memory format of a ``dim``-dimensional tensor (4: 2D images,
    5: 3D volumes), or ``None`` where there is none (other tensors keep their layout)."""
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(dim)


def act() -> nn.Module:
    return nn.LeakyReLU(NEGATIVE_SLOPE)


class ConvNormAct(nn.Sequential):
    """``conv, norm, act`` (one table row); ``activation=False`` gives ``conv, norm``."""

    def __init__(
        self, ndim: int, cin: int, cout: int, dilation: int = 1, activation: bool = True
    ) -> None:
        layers = [conv(ndim, cin, cout, 3, dilation), instance_norm(ndim, cout)]
        if activation:
            layers.append(act())
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """The four-row block of Tables 2 and 3.

    ============  ====  ========  ==========
    layer(s)      ker   dilation  out
    ============  ====  ========  ==========
    conv,norm,act 3     1         r
    conv,norm,act 3     1         f
    conv,norm     3     3         f
    act           -     -         act(f + r)
    ============  ====  ========  ==========
    """

    def __init__(self, ndim: int, cin: int, cout: int) -> None:
        super().__init__()
        self.conv_r = ConvNormAct(ndim, cin, cout)
        self.conv_f1 = ConvNormAct(ndim, cout, cout)
        self.conv_f2 = ConvNormAct(ndim, cout, cout, dilation=3, activation=False)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.conv_r(x)
        return self.act(self.conv_f2(self.conv_f1(r)) + r)


def avg_pool(x: torch.Tensor) -> torch.Tensor:
    """The tables' ``downsample`` row: x2 average pooling."""
    pool = {4: nn.functional.avg_pool2d, 5: nn.functional.avg_pool3d}[x.dim()]
    return pool(x, 2)


def resize(x: torch.Tensor, size: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The tables' ``upsample`` row for features and logits: linear interpolation.

    ``align_corners=False`` keeps the cell geometry of average pooling (a coarse voxel
    is the mean of the fine voxels it covers). A no-op when the size already matches.
    """
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = {4: "bilinear", 5: "trilinear"}[x.dim()]
    return nn.functional.interpolate(x, size=tuple(size), mode=mode, align_corners=False)
