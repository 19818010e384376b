"""Where and how a network runs: device, precision (bf16 autocast), memory layout.

Everything outside the network (resampling, warping, Jacobians, optimisation) stays in
float32/64; these settings only change the forward pass.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ranreg.errors import RanregError
from ranreg.nn.blocks import channels_last_format
from ranreg.options import PRECISIONS
from ranreg.registry import returns_levels as declares_levels

__all__ = [
    "fast_bf16",
    "resolve_precision",
    "resolve_device",
    "synchronize",
    "is_neural",
    "default_channels_last",
    "run_network",
]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available) as a torch device."""
    text = "auto" if device is None else str(device)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise RanregError(
            f"--device {text!r}: not a device (use cpu, cuda, cuda:N or auto)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RanregError(f"--device {text}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise RanregError(f"--device {text}: only cpu and cuda are supported")
    return dev


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_neural(model: torch.nn.Module) -> bool:
    """True for a network with weights (not the identity or a classical peer)."""
    return any(True for _ in model.parameters())


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 arithmetic is native here: CPUs with AVX512-BF16 or AMX (oneDNN's
    check), CUDA GPUs with bf16 support (Ampere and later)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where :func:`fast_bf16`, else ``fp32``; others unchanged."""
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


def default_channels_last(device: torch.device, precision: str) -> bool:
    """Channels-last by default on the CPU (oneDNN's fast layout, fp32 and bf16 alike) and
    for bf16 on GPUs; plain layout for fp32 on GPUs, where cuDNN prefers it for 3D."""
    return device.type == "cpu" or precision == "bf16"


def run_network(
    model: torch.nn.Module,
    moving: Tensor,
    fixed: Tensor,
    *,
    precision: str = "fp32",
    channels_last: bool | None = None,
    return_levels: bool = False,
) -> tuple[Tensor, Any]:
    """One forward pass: ``(float32 contiguous DDF, per-level output or None)``.

    ``precision="bf16"`` runs the network under ``torch.autocast`` with bfloat16
    (convolutions in bf16, reductions and resampling as autocast keeps them); it is fast
    where the hardware has bf16 units (CPUs with AVX512-BF16 or AMX, recent GPUs) and
    warns elsewhere, where it is emulated and many times slower than fp32. With
    ``channels_last`` (default :func:`default_channels_last`) the weights and inputs use the
    channels-last memory layout; the model is converted in place. Models without weights
    (identity, classical peers) always run as they are.
    """
    if precision not in PRECISIONS:
        raise RanregError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    precision = resolve_precision(precision, fixed.device)
    neural = is_neural(model)
    if neural and precision == "bf16" and not fast_bf16(fixed.device):
        # AVX2-only CPUs: bf16 3D convolutions fall back to a reference kernel
        # (aten::slow_conv3d), >15x slower than fp32 for RAN3 (docs/registration.md)
        warnings.warn(
            "bf16 is emulated on this device (no AVX512-BF16, AMX or bf16 GPU): the network "
            "runs much slower than in fp32; --precision auto picks fp32 here",
            stacklevel=2,
        )
    if channels_last is None:
        channels_last = default_channels_last(fixed.device, precision)
    if neural and channels_last:
        fmt = channels_last_format(fixed.dim())
        model.to(memory_format=fmt)
        moving, fixed = moving.to(memory_format=fmt), fixed.to(memory_format=fmt)
    autocast = torch.autocast(
        fixed.device.type, dtype=torch.bfloat16, enabled=neural and precision == "bf16"
    )
    levels = None
    with torch.no_grad(), autocast:
        if return_levels and declares_levels(model):
            out = model(moving, fixed, return_levels=True)
            ddf, levels = (out.ddf, out) if hasattr(out, "ddf") else (out, None)
        else:
            ddf = model(moving, fixed)
    return ddf.float().contiguous(), levels
