"""Networks: the four RAN variants (Tables 2-4), the "without RA" ablation and a
VoxelMorph-style U-Net, all built by :func:`build_model`."""

from __future__ import annotations

from typing import Any

from torch import nn

from ranreg.nn.aligner import LevelOutput, PlainAligner, ResidualAligner
from ranreg.nn.baselines import VoxelMorphUNet
from ranreg.nn.ran import RAN, RegistrationOutput
from ranreg.nn.variants import VARIANTS, Variant, capturable_range, get_variant

#: Suffix that turns a RAN variant name into its "without RA" ablation.
NO_RA_SUFFIX = "-noRA"

MODEL_NAMES: tuple[str, ...] = (
    *VARIANTS,
    *(name + NO_RA_SUFFIX for name in VARIANTS),
    "VoxelMorph",
    "VoxelMorph-pkg",  # the voxelmorph package's network, needs the optional extra "peers"
)


#: upper bounds on constructor options read from files (model configs, training configs):
#: a crafted file asking for 10^7 heads must fail here, not while allocating the weights
MAX_HEADS = 64
MAX_IN_CHANNELS = 16


def _check_options(options: dict[str, Any]) -> None:
    for key, top in (("heads", MAX_HEADS), ("in_channels", MAX_IN_CHANNELS)):
        if key not in options:
            continue
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise ValueError(f"{key} must be an integer from 1 to {top}, got {value!r}")


def build_model(name: str, ndim: int = 3, **options: Any) -> nn.Module:
    """Build a registration network by name, in the style of torchvision builders.

    Names: ``RAN0``, ``RAN3``, ``RAN4``, ``RAN4+`` (the paper's variants), the same with
    ``-noRA`` (RA modules replaced by a plain per-level DDF head), ``VoxelMorph`` and
    ``VoxelMorph-pkg`` (the ``voxelmorph`` package's network, see
    :mod:`ranreg.nn.voxelmorph_peer`; raises :class:`ranreg.errors.RanregError` with an
    install hint when that package is missing).
    Matching ignores case. ``options`` go to the model (``heads``, ``in_channels``;
    VoxelMorph ignores ``heads``).

    Every model is called as ``model(moving, fixed)`` with (B, C, *S) tensors and returns
    the DDF (B, ndim, *S) in voxels, ``warped(x) = moving(x + ddf(x))``.
    """
    _check_options(options)
    lookup = {n.lower(): n for n in MODEL_NAMES}
    canonical = lookup.get(str(name).lower())
    if canonical is None:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    if canonical == "VoxelMorph":
        options.pop("heads", None)  # no heads in a direct-regression U-Net
        return VoxelMorphUNet(ndim=ndim, **options)
    if canonical == "VoxelMorph-pkg":
        from ranreg.nn.voxelmorph_peer import VxmPackageNet  # imports voxelmorph lazily

        options.pop("heads", None)
        return VxmPackageNet(ndim=ndim, **options)
    if canonical.endswith(NO_RA_SUFFIX):
        return RAN(canonical[: -len(NO_RA_SUFFIX)], ndim=ndim, aligner="plain", **options)
    return RAN(canonical, ndim=ndim, **options)


__all__ = [
    "MODEL_NAMES",
    "RAN",
    "LevelOutput",
    "PlainAligner",
    "RegistrationOutput",
    "ResidualAligner",
    "Variant",
    "VoxelMorphUNet",
    "build_model",
    "capturable_range",
    "get_variant",
]
