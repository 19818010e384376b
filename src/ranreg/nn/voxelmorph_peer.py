"""VoxelMorph from the ``voxelmorph`` package, as a benchmark peer of RAN.

``voxelmorph`` 0.3.x is PyTorch only: ``import voxelmorph`` imports ``neurite`` (0.3.4 is
PyTorch only as well); there is no TensorFlow and no ``VXM_BACKEND`` switch any more, and
the ``voxelmorph.torch.networks.VxmDense`` of 0.2 is gone. Its registration network is
``voxelmorph.nn.models.VxmPairwise``: a ``neurite`` ``BasicUNet`` on the concatenated pair
plus a 3x3 "flow" conv whose weights start ~ N(0, 1e-5).

:class:`VxmPackageNet` builds it at the package defaults (``nb_features = (16,) * 5``, so
five 2x max-poolings, ReLU, linear upsampling, skip concatenation) except
``integration_steps=0``: the flow is the dense displacement field itself, no
scaling-and-squaring of a velocity field. That keeps it in the same direct-regression
family as RAN and :class:`ranreg.nn.baselines.VoxelMorphUNet` (the package default, 5 steps,
would make it the diffeomorphic variant). Note that these current package defaults are not
the classic "vm2" widths of the paper; :class:`~ranreg.nn.baselines.VoxelMorphUNet` has those.

Convention: VoxelMorph's ``SpatialTransformer`` adds the flow to an ``ij``-indexed grid of
voxel indices (channel ``i`` moves along array axis ``i``) and samples with
``align_corners=True``, i.e. ``warped(x) = moving(x + flow(x))`` in voxels -- exactly the
convention of :func:`ranreg.spatial.warp` (identical values with ``padding_mode="zeros"``,
VoxelMorph's padding), so the flow is returned unchanged.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from ranreg.errors import RanregError
from ranreg.nn.padding import crop_to, pad_to_multiple, validate_pair

#: Name under which :func:`ranreg.nn.build_model` builds :class:`VxmPackageNet`.
NAME = "VoxelMorph-pkg"
INSTALL_HINT = "pip install 'ranreg[peers]'  (or: pip install 'voxelmorph>=0.3.4,<0.4')"


def import_voxelmorph() -> ModuleType:
    """``import voxelmorph``, or a :class:`RanregError` with an install hint."""
    try:
        import voxelmorph
    except ImportError as exc:
        raise RanregError(
            f"model {NAME!r} needs the 'voxelmorph' package (PyTorch, >= 0.3.4), "
            f"which is not importable ({exc}); install it with: {INSTALL_HINT}"
        ) from exc
    if not hasattr(getattr(voxelmorph, "nn", None), "models"):
        version = getattr(voxelmorph, "__version__", "?")
        raise RanregError(
            f"model {NAME!r} needs voxelmorph >= 0.3.4 (PyTorch API voxelmorph.nn.models), "
            f"found version {version}; install it with: {INSTALL_HINT}"
        )
    return voxelmorph


class VxmPackageNet(nn.Module):
    """``voxelmorph.nn.models.VxmPairwise`` (package defaults, no integration) in ranreg's
    calling convention.

    ``model(moving, fixed)`` takes (B, C, *S) tensors of any size (zero-padded at the high
    end to a multiple of 2**levels = 32, the output cropped back) and returns the DDF
    (B, ndim, *S) in voxels, ``warped(x) = moving(x + ddf(x))``, channel ``i`` along axis
    ``i``. The package network is the submodule ``net``.
    """

    def __init__(self, ndim: int = 3, in_channels: int = 1) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        vxm = import_voxelmorph()
        self.ndim, self.in_channels = ndim, in_channels
        self.config = {"name": NAME, "ndim": ndim, "in_channels": in_channels}
        self.net = vxm.nn.models.VxmPairwise(
            ndim=ndim,
            source_channels=in_channels,
            target_channels=in_channels,
            integration_steps=0,
        )
        # each U-Net level halves the grid: sizes must divide by 2**levels
        self.multiple = 2 ** len(self.net.model.downsampling_features)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        validate_pair(moving, fixed, self.ndim, self.in_channels)
        shape = fixed.shape[2:]
        moving = pad_to_multiple(moving, self.multiple)
        fixed = pad_to_multiple(fixed, self.multiple)
        # with integration_steps=0 the "displacement" is the flow layer's output itself
        flow = self.net(moving, fixed, return_field_type="displacement")
        return crop_to(flow, shape)


__all__ = ["INSTALL_HINT", "NAME", "VxmPackageNet", "import_voxelmorph"]
