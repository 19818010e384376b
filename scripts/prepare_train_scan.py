"""Convert a CT DICOM series into a training scan for `data.train_scans` (issue 12).

Reads the series with ranreg's DICOM reader (`ranreg.data.formats.read_itk_image`: the
largest series, slice positions checked, orientation from the headers), resamples it to an
isotropic grid with SimpleITK (linear), reorients it to RAS voxel axes (as the shared label
maps), crops it to the body's bounding box plus a margin and writes int16 HU as NIfTI:

    python scripts/prepare_train_scan.py DICOM_DIR OUT.nii.gz [--spacing 3]

Used for data/train-scans/ (its README gives the source commits and checksums).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ranreg.atomic import atomic_file
from ranreg.data.formats import affine_from_itk, itk_geometry, read_itk_image
from ranreg.data.preprocess import largest_component
from ranreg.errors import RanregError


def read_series(folder: Path) -> sitk.Image:
    """The DICOM series in ``folder`` as a SimpleITK image (for its resampler)."""
    _, array, affine = read_itk_image(folder)
    origin, spacing, direction = itk_geometry(affine)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def isotropic(image: sitk.Image, spacing: float) -> sitk.Image:
    """``image`` resampled (linear) to ``spacing`` mm on its own axes, air outside."""
    extent = zip(image.GetSize(), image.GetSpacing(), strict=True)
    size = [round(n * s / spacing) for n, s in extent]
    return sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
        (spacing,) * 3, image.GetDirection(), -1000.0, sitk.sitkFloat32,
    )  # fmt: skip


def body_box(hu: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The bounding box of the largest connected region above -300 HU (the body, not the
    couch), grown by ``margin`` voxels."""
    body = largest_component(ndimage.binary_opening(hu > -300, iterations=2))
    box = ndimage.find_objects(body.astype(np.int8))[0]
    return tuple(
        slice(max(b.start - margin, 0), min(b.stop + margin, size))
        for b, size in zip(box, hu.shape, strict=True)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dicom", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--spacing", type=float, default=3.0)
    p.add_argument("--margin", type=int, default=3, help="voxels around the body")
    args = p.parse_args()
    try:
        image = isotropic(read_series(args.dicom), args.spacing)
    except RanregError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    # SimpleITK arrays are (z, y, x); nibabel wants (x, y, z) with an RAS affine
    array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    affine = affine_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    nii = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    hu = np.asarray(nii.dataobj, dtype=np.float32)
    box = body_box(hu, args.margin)
    out = nii.slicer[box]
    data = np.rint(np.asarray(out.dataobj)).clip(-1024, 3071).astype(np.int16)
    result = nib.Nifti1Image(data, out.affine)
    result.set_qform(out.affine, code=1)
    result.set_sform(out.affine, code=1)
    with atomic_file(args.out, suffix=".nii.gz") as tmp:  # whole or not at all
        nib.save(result, tmp)
    print(f"{args.out}: {data.shape} at {args.spacing} mm, HU {data.min()}..{data.max()}")


if __name__ == "__main__":
    main()
