"""Networks: the four RAN variants (Tables 2-4), the "without RA" ablation and a
VoxelMorph-style U-Net, all built by :func:`build_model`."""

from __future__ import annotations

from typing import Any

from torch import nn

from ranreg.nn.aligner import LevelOutput, PlainAligner, ResidualAligner
from ranreg.nn.baselines import VoxelMorphUNet
from ranreg.nn.ran import RAN, RegistrationOutput
from ranreg.nn.variants import NO_RA_SUFFIX, VARIANTS, Variant, capturable_range, get_variant
from ranreg.registry import get_method, register_method

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
    if not isinstance(options.get("inverse_consistent", False), bool):
        raise ValueError(
            f"inverse_consistent must be true or false, got {options['inverse_consistent']!r}"
        )
    for key, top in (("heads", MAX_HEADS), ("in_channels", MAX_IN_CHANNELS)):
        if key not in options:
            continue
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise ValueError(f"{key} must be an integer from 1 to {top}, got {value!r}")


def _no_inverse_consistency(name: str, options: dict[str, Any]) -> None:
    if options.pop("inverse_consistent", False):
        raise ValueError(f"{name} has no inverse_consistent mode (a RAN option)")


def _ran(variant: str, aligner: str) -> Any:
    def build(ndim: int = 3, **options: Any) -> nn.Module:
        return RAN(variant, ndim=ndim, aligner=aligner, **options)

    return build


for _name in VARIANTS:  # Tables 2-4, and the same network with plain DDF heads
    register_method(_name, kind="network", summary=f"{_name} (Tables 2-4)", returns_levels=True)(
        _ran(_name, "ra")
    )
    register_method(
        _name + NO_RA_SUFFIX,
        kind="network",
        summary=f"{_name} without RA modules (the ablation)",
        returns_levels=True,
    )(_ran(_name, "plain"))


@register_method("VoxelMorph", kind="network", summary="VoxelMorph-style U-Net (ranreg's)")
def _voxelmorph(ndim: int = 3, **options: Any) -> nn.Module:
    options.pop("heads", None)  # no heads in a direct-regression U-Net
    _no_inverse_consistency("VoxelMorph", options)
    return VoxelMorphUNet(ndim=ndim, **options)


@register_method(
    "VoxelMorph-pkg", kind="network", summary="the voxelmorph package's network (extra: peers)"
)
def _voxelmorph_package(ndim: int = 3, **options: Any) -> nn.Module:
    from ranreg.nn.voxelmorph_peer import VxmPackageNet  # imports voxelmorph lazily

    options.pop("heads", None)
    _no_inverse_consistency("VoxelMorph-pkg", options)
    return VxmPackageNet(ndim=ndim, **options)


def build_model(name: str, ndim: int = 3, **options: Any) -> nn.Module:
    """Build a registration network by name (the registry's ``network`` methods).

    Names: ``RAN0``, ``RAN3``, ``RAN4``, ``RAN4+`` (the paper's variants), the same with
    ``-noRA`` (RA modules replaced by a plain per-level DDF head), ``VoxelMorph`` and
    ``VoxelMorph-pkg`` (the ``voxelmorph`` package's network, see
    :mod:`ranreg.nn.voxelmorph_peer`; raises :class:`ranreg.errors.RanregError` with an
    install hint when that package is missing).
    Matching ignores case. ``options`` go to the model (``heads``, ``in_channels``,
    ``inverse_consistent`` for RAN networks; VoxelMorph ignores ``heads``).

    Every model is called as ``model(moving, fixed)`` with (B, C, *S) tensors and returns
    the DDF (B, ndim, *S) in voxels, ``warped(x) = moving(x + ddf(x))``.
    """
    _check_options(options)
    if str(name).lower() not in {n.lower() for n in MODEL_NAMES}:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    return get_method(str(name)).build(ndim=ndim, **options)


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
