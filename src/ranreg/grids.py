"""World-space voxel grids and the images that live on them.

A :class:`Grid` is a shape and a voxel-to-world (RAS+, mm) affine; :func:`as_volume` turns
what a user passes (a file, a ``Volume``, an ``(array, affine)`` pair) into a checked
volume; :func:`interpolation` and the samplers read an image at world points. Used by
:mod:`ranreg.transform` (saved mappings) and :mod:`ranreg.api`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

from ranreg.data.io import Volume, spacing_from_affine
from ranreg.errors import RanregError
from ranreg.geometry import apply_affine, sample

__all__ = ["INTERPOLATIONS", "Grid", "ImageLike", "as_volume", "interpolation", "read_grid"]

#: ``interp`` choices of :meth:`ranreg.transform.Transform.apply`; ``bspline`` is cubic B-spline.
INTERPOLATIONS = ("linear", "nearest", "bspline")

#: Points handled at once (slabs of whole planes of a grid), to bound memory.
_CHUNK = 1 << 20

ImageLike = Volume | str | os.PathLike[str] | tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True, eq=False)
class Grid:
    """A voxel grid in world space: ``shape`` (3 sizes) and its voxel-to-world ``affine``."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        affine = np.asarray(self.affine, dtype=np.float64)
        if len(shape) != 3 or min(shape) < 1:
            raise RanregError(f"a grid needs 3 positive sizes, got {self.shape}")
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise RanregError("a grid needs a finite 4x4 voxel-to-world affine")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise RanregError("a grid's voxel-to-world affine is singular")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "affine", affine)

    @classmethod
    def of(cls, volume: Volume) -> Grid:
        """The grid of a volume."""
        return cls(tuple(volume.shape[:3]), volume.affine)  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, data: Any, where: str = "grid") -> Grid:
        """A grid from ``{"shape": [3 ints], "affine": 4x4 list}``."""
        try:
            return cls(tuple(data["shape"]), np.asarray(data["affine"], dtype=np.float64))
        except (KeyError, TypeError, ValueError) as exc:
            raise RanregError(f"{where}: expected {{'shape': [..], 'affine': 4x4}}") from exc

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "affine": self.affine.tolist()}

    def same_as(self, other: Grid) -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=1e-6)

    def describe(self) -> str:
        """E.g. ``96x80x128 voxels of 4x4x4 mm``."""
        size = "x".join(f"{s:g}" for s in np.round(spacing_from_affine(self.affine), 3))
        return f"{'x'.join(str(s) for s in self.shape)} voxels of {size} mm"

    def slabs(self) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` ranges along axis 0 of about :data:`_CHUNK` points each."""
        rows = max(1, _CHUNK // (self.shape[1] * self.shape[2]))
        for start in range(0, self.shape[0], rows):
            yield start, min(start + rows, self.shape[0])

    def indices(self, start: int, stop: int) -> Tensor:
        """Voxel indices ``(3, stop - start, Y, Z)`` (float64) of the planes start..stop-1."""
        axes = [
            torch.arange(start, stop, dtype=torch.float64),
            torch.arange(self.shape[1], dtype=torch.float64),
            torch.arange(self.shape[2], dtype=torch.float64),
        ]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"))

    def points(self, start: int, stop: int) -> Tensor:
        """World points ``(3, stop - start, Y, Z)`` (float64) of the planes start..stop-1."""
        return apply_affine(self.affine, self.indices(start, stop))

    def inside(self, world: Tensor) -> Tensor:
        """Which world points ``(3, *T)`` lie within half a voxel of the grid."""
        vox = apply_affine(np.linalg.inv(self.affine), world)
        n = torch.tensor(self.shape, dtype=vox.dtype).view(3, *([1] * (vox.dim() - 1)))
        return ((vox >= -0.5) & (vox <= n - 0.5)).all(dim=0)


def read_grid(path: str | os.PathLike[str]) -> Grid:
    """The grid of an image: from the header alone for a NIfTI file, else through the
    image reader of :mod:`ranreg.data.io` (which names the file in any error)."""
    p = Path(path)
    if not (p.is_file() and p.name.lower().endswith((".nii", ".nii.gz"))):
        from ranreg.data.io import load_nifti

        return Grid.of(load_nifti(p))
    try:
        img = nib.load(str(p))
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine)
    except Exception as exc:  # nibabel raises many types for bad files
        raise RanregError(f"{p}: cannot read as NIfTI ({type(exc).__name__})") from None
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        raise RanregError(f"{p}: expected a 3D image, got shape {shape}")
    try:
        return Grid(shape[:3], affine)  # type: ignore[arg-type]
    except RanregError as exc:
        raise RanregError(f"{p}: {exc}") from None


def _as_grid(reference: Grid | Volume | str | os.PathLike[str]) -> Grid:
    if isinstance(reference, Grid):
        return reference
    if isinstance(reference, Volume):
        return Grid.of(reference)
    return read_grid(reference)


# ------------------------------------------------------------------------------ images
def _checked_array(array: Any, what: str, labels: bool) -> np.ndarray:
    arr = np.asarray(array)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3 or arr.size == 0:
        raise RanregError(f"{what}: expected a 3D array, got shape {np.shape(array)}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "fiu":
        raise RanregError(f"{what}: unsupported data type {arr.dtype}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise RanregError(f"{what}: contains NaN or infinite values")
    if labels and arr.dtype.kind == "f":
        if not np.array_equal(arr, np.round(arr)):
            raise RanregError(f"{what}: label map has non-integer values")
        arr = arr.astype(np.int32)
    if labels and arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise RanregError(f"{what}: label map has negative values")
    return arr


def as_volume(image: ImageLike, what: str = "image", *, labels: bool = False) -> Volume:
    """A :class:`Volume` from a file path, a ``Volume`` or an ``(array, affine)`` tuple.

    Files are read with :func:`ranreg.data.io.load_nifti` (float32) or, with ``labels``,
    :func:`~ranreg.data.io.load_label_volume` (integers kept). Arrays must be 3D and
    finite; label maps must hold non-negative whole numbers (floats become int32).
    """
    if isinstance(image, str | os.PathLike):
        from ranreg.data.io import load_label_volume, load_nifti

        return load_label_volume(image) if labels else load_nifti(image)
    if isinstance(image, Volume):
        name = str(image.path) if image.path is not None else what
        arr = _checked_array(image.array, name, labels)
        grid = Grid(arr.shape, image.affine)  # type: ignore[arg-type]
        return Volume(arr, grid.affine, spacing_from_affine(grid.affine), image.path)
    if isinstance(image, tuple) and len(image) == 2:
        arr = _checked_array(image[0], what, labels)
        try:
            grid = Grid(arr.shape, np.asarray(image[1], dtype=np.float64))  # type: ignore[arg-type]
        except (RanregError, ValueError) as exc:
            raise RanregError(f"{what}: {exc}") from None
        return Volume(arr, grid.affine, spacing_from_affine(grid.affine))
    raise RanregError(
        f"{what}: expected a file path, a Volume or an (array, affine) tuple, "
        f"got {type(image).__name__}"
    )


def interpolation(labels: bool, interp: str | None) -> str:
    """The interpolation to use: ``nearest`` for labels, else ``interp`` (default linear)."""
    if interp is not None and interp not in INTERPOLATIONS:
        raise RanregError(f"interp must be one of {', '.join(INTERPOLATIONS)}, got {interp!r}")
    if labels:
        if interp not in (None, "nearest"):
            raise RanregError(
                f"label maps are resampled with nearest neighbour (label-safe); "
                f"interp {interp!r} cannot be used with labels"
            )
        return "nearest"
    return interp or "linear"


def _outside(vox: Tensor, shape: Sequence[int]) -> np.ndarray:
    n = torch.tensor(tuple(shape), dtype=vox.dtype).view(3, *([1] * (vox.dim() - 1)))
    return ((vox < -0.5) | (vox > n - 0.5)).any(dim=0).numpy()


def _sampler(vol: Volume, mode: str, labels: bool) -> tuple[Callable[[Tensor], Any], np.dtype]:
    """A function from voxel coordinates ``(3, *T)`` of ``vol`` to its values there, and
    the output type. Outside (more than half a voxel off the grid): 0 for labels, the
    image minimum for images; within half a voxel: the border value."""
    arr = np.asarray(vol.array)
    fill = 0 if labels else arr.min()
    if mode == "nearest":
        dims = np.array(arr.shape).reshape(3, 1, 1, 1)

        def nearest(vox: Tensor) -> np.ndarray:
            v = vox.numpy()
            idx = np.clip(np.rint(v), 0, dims - 1).astype(np.intp)
            out = arr[idx[0], idx[1], idx[2]]
            out[_outside(vox, arr.shape)] = fill
            return out

        return nearest, arr.dtype
    dtype = np.dtype(np.float64 if arr.dtype == np.float64 else np.float32)
    if mode == "linear":
        src = torch.from_numpy(np.ascontiguousarray(arr, dtype=dtype))[None, None]
        return (lambda vox: sample(src, vox, "bilinear", float(fill)).numpy()), dtype
    from scipy import ndimage

    coeffs = ndimage.spline_filter(arr.astype(np.float64), order=3, mode="mirror")

    def bspline(vox: Tensor) -> np.ndarray:
        v = vox.numpy()
        out = ndimage.map_coordinates(
            coeffs, v.reshape(3, -1), order=3, mode="mirror", prefilter=False
        ).reshape(v.shape[1:])
        out[_outside(vox, arr.shape)] = fill
        return out.astype(dtype)

    return bspline, dtype


# ------------------------------------------------------------------------------ transform
