"""Convert a CT DICOM series into a training scan for `data.train_scans` (issue 12).

Reads the series with SimpleITK (orientation from the DICOM headers), resamples it to an
isotropic grid (linear), reorients it to RAS voxel axes (as the shared label maps), crops
it to the body's bounding box plus a margin and writes int16 HU as NIfTI:

    python scripts/prepare_train_scan.py DICOM_DIR OUT.nii.gz [--spacing 3]

Used for data/train-scans/ (its README gives the source commits and checksums).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage


def read_series(folder: Path) -> sitk.Image:
    """The largest DICOM series in ``folder``."""
    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise SystemExit(f"error: {folder}: no DICOM series found")
    files = max((reader.GetGDCMSeriesFileNames(str(folder), i) for i in ids), key=len)
    reader.SetFileNames(files)
    return reader.Execute()


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
    labels, n = ndimage.label(ndimage.binary_opening(hu > -300, iterations=2))
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=range(1, n + 1))
    box = ndimage.find_objects((labels == 1 + int(np.argmax(sizes))).astype(np.int8))[0]
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
    image = isotropic(read_series(args.dicom), args.spacing)
    # SimpleITK arrays are (z, y, x) in LPS; nibabel wants (x, y, z) with an RAS affine
    array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * args.spacing
    affine[:3, 3] = image.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS world
    nii = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    hu = np.asarray(nii.dataobj, dtype=np.float32)
    box = body_box(hu, args.margin)
    out = nii.slicer[box]
    data = np.rint(np.asarray(out.dataobj)).clip(-1024, 3071).astype(np.int16)
    result = nib.Nifti1Image(data, out.affine)
    result.set_qform(out.affine, code=1)
    result.set_sform(out.affine, code=1)
    nib.save(result, args.out)
    print(f"{args.out}: {data.shape} at {args.spacing} mm, HU {data.min()}..{data.max()}")


if __name__ == "__main__":
    main()
