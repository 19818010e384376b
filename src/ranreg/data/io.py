"""Reading and writing volumes with checks that name the offending file.

NIfTI (``.nii``, ``.nii.gz``) is read and written with nibabel; NRRD (``.nrrd``, ``.nhdr``),
MetaImage (``.mha``, ``.mhd``) and DICOM series (a folder) go through SimpleITK
(:mod:`ranreg.data.formats`, which also holds the output-format helpers). Every reader
returns a :class:`Volume`: the array indexed ``[i, j, k]`` and the RAS+ voxel-to-world
affine, whatever the format.

Every problem with a user's file (missing, truncated, unreadable, wrong number of
dimensions, vector or complex pixels, NaN/inf voxels, non-integer labels) raises
:class:`RanregError` whose message starts with the path, so the CLI can report it as one
``error:`` line. Writes are atomic: the volume goes to a hidden temporary file in the
target directory first and is moved into place with :func:`os.replace`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ranreg.atomic import atomic_file
from ranreg.data.formats import (
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    image_stem,
    image_suffix,
    output_format,
    output_name,
    read_itk_image,
    uses_simpleitk,
    write_itk_image,
)
from ranreg.errors import RanregError

__all__ = [
    "IMAGE_SUFFIXES",
    "Volume",
    "load_nifti",
    "load_image",
    "load_label",
    "load_label_volume",
    "save_nifti",
    "save_image",
    "nifti_stem",
    "image_stem",
    "output_format",
    "output_name",
    "spacing_from_affine",
]

_NIFTI_EXTS = NIFTI_SUFFIXES


@dataclass
class Volume:
    """A 3D volume with its voxel-to-world affine.

    ``spacing`` is the voxel size along each array axis (world units, normally mm),
    the column norms of ``affine[:3, :3]``.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


def nifti_stem(path: str | os.PathLike[str]) -> str:
    """File name without ``.nii.gz`` / ``.nii`` (``"0001.nii.gz"`` -> ``"0001"``)."""
    name = Path(path).name
    for ext in _NIFTI_EXTS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each array axis: the column norms of the 3x3 part."""
    affine = np.asarray(affine, dtype=np.float64)
    norms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def _open(path: str | os.PathLike[str]) -> tuple[Path, nib.Nifti1Image]:
    p = Path(path)
    if not p.exists():
        raise RanregError(f"{p}: file not found")
    if p.is_dir():
        raise RanregError(f"{p}: is a directory, expected a NIfTI file (.nii or .nii.gz)")
    try:
        img = nib.load(str(p))
    except Exception as exc:  # nibabel raises many types for bad files
        hint = _formats_hint(p)
        raise RanregError(f"{p}: cannot read as NIfTI ({_describe(exc)}){hint}") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise RanregError(f"{p}: not a NIfTI file (read as {type(img).__name__}){_formats_hint(p)}")
    _check_header(p, img)
    return p, img


def max_voxels() -> int:
    """The largest image ranreg reads (voxels): ``RANREG_MAX_VOXELS``, default 600 million
    (a 512 x 512 x 2288 CT; about 2.4 GB as float32 before any processing)."""
    text = os.environ.get("RANREG_MAX_VOXELS", "600000000")
    try:
        return int(float(text))
    except ValueError:
        raise RanregError(f"RANREG_MAX_VOXELS={text!r} is not a number") from None


def _check_header(p: Path, img: nib.Nifti1Image) -> None:
    """What the header promises, checked before any voxel is read: a voxel type ranreg can
    use, a size below :func:`max_voxels` (a small gzip can expand to many GB), and a voxel
    size when the file has no sform/qform (nibabel would silently assume 1 mm)."""
    dtype = np.dtype(img.get_data_dtype())
    if dtype.names is not None or dtype.kind in "cVOSU":
        raise RanregError(
            f"{p}: unsupported voxel type {dtype} (RGB, complex and structured voxels are not "
            "images ranreg can register; convert to one scalar channel)"
        )
    voxels = int(np.prod([int(n) for n in img.shape], dtype=np.int64))
    if voxels > max_voxels():
        raise RanregError(
            f"{p}: {voxels:,} voxels ({'x'.join(str(n) for n in img.shape)}) is above the "
            f"limit of {max_voxels():,}; set RANREG_MAX_VOXELS to raise it"
        )
    header = img.header
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        # nibabel replaces zero voxel sizes by 1 on loading: read what the file says
        with nib.openers.ImageOpener(p) as fobj:
            raw = type(header).from_fileobj(fobj, check=False)
        zooms = [float(z) for z in raw["pixdim"][1:4]]
        if not all(np.isfinite(z) and z > 0 for z in zooms):
            raise RanregError(
                f"{p}: no sform/qform and voxel size {zooms}: the voxel size is unknown"
            )


def _formats_hint(p: Path) -> str:
    """For names that are not NIfTI: the formats ranreg reads."""
    if image_suffix(p) in _NIFTI_EXTS:
        return ""
    return (
        "; ranreg reads NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) "
        "and DICOM series (a folder)"
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_data(p: Path, img: nib.Nifti1Image) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated gzip, short file, bad scaling ...
        raise RanregError(
            f"{p}: cannot read voxel data, file truncated or corrupt ({_describe(exc)})"
        ) from exc


def _check_affine(p: Path, affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise RanregError(f"{p}: invalid affine (non-finite values)")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise RanregError(f"{p}: invalid affine (singular voxel-to-world matrix)")
    return affine


def _squeeze_to_3d(p: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) < 3:
        raise RanregError(f"{p}: expected a 3D volume, got shape {tuple(shape)}")
    extra = shape[3:]
    if any(s != 1 for s in extra):
        raise RanregError(
            f"{p}: expected a 3D volume, got a {len(shape)}D volume of shape {tuple(shape)}"
        )
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def load_nifti(
    path: str | os.PathLike[str],
    *,
    dtype: np.dtype | type | None = np.float32,
    check_finite: bool = True,
) -> Volume:
    """Load a 3D image: NIfTI with nibabel, other formats through SimpleITK.

    NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) and DICOM series (a folder
    holding one series) are read by :func:`ranreg.data.formats.read_itk_image` (SimpleITK
    imported lazily; its absence is a :class:`RanregError` saying ``pip install
    SimpleITK``), with the same :class:`Volume` as for NIfTI: array indexed ``[i, j, k]``,
    RAS+ affine from ITK's LPS geometry (direction cosines honoured). A 4D (or 5D) image
    whose extra dimensions all have size 1 is squeezed to 3D; anything else that is not 3D
    is an error, and so are vector, RGB and complex pixel types. The array is cast to
    ``dtype`` (``None`` keeps the stored type after NIfTI intensity scaling or DICOM
    rescaling). With ``check_finite`` (the default) NaN or infinite voxels are an error.
    """
    if uses_simpleitk(path):
        p, data, raw_affine = read_itk_image(path)
        affine = _check_affine(p, raw_affine)
    else:
        p, img = _open(path)
        shape3 = _squeeze_to_3d(p, img.shape)
        affine = _check_affine(p, img.affine)
        data = _read_data(p, img).reshape(shape3)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    if check_finite and data.dtype.kind in "fc":
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise RanregError(f"{p}: {bad} voxel(s) are NaN or infinite")
    return Volume(array=data, affine=affine, spacing=spacing_from_affine(affine), path=p)


#: :func:`load_nifti` under a name that says it reads every supported format.
load_image = load_nifti


def _one_hot_to_labels(p: Path, data: np.ndarray) -> np.ndarray:
    """(X, Y, Z, C) one-hot (DeepReg style) -> integer map, channel c -> label c + 1."""
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise RanregError(f"{p}: label map contains NaN or infinite values")
    binary = (data == 0) | (data == 1)
    if not np.all(binary) or np.any(data.sum(axis=-1) > 1):
        raise RanregError(
            f"{p}: expected a 3D label map, got shape {tuple(data.shape)} that is not one-hot"
        )
    labels = np.argmax(data, axis=-1).astype(np.int16) + 1
    labels[data.max(axis=-1) == 0] = 0
    return labels


def load_label_volume(path: str | os.PathLike[str]) -> Volume:
    """Load an integer label map as a :class:`Volume` (any format :func:`load_nifti` reads).

    Integer files keep their stored integer type (int8 stays int8). Float files
    must hold whole numbers and are converted to int32. Negative labels are an
    error. A 4D one-hot NIfTI file (the DeepReg layout, one channel per organ) is
    turned into an integer map with channel ``c`` as label ``c + 1``.
    """
    if uses_simpleitk(path):
        p, raw, raw_affine = read_itk_image(path)
        affine = _check_affine(p, raw_affine)
        data = _integer_labels(p, raw)
    else:
        p, img = _open(path)
        affine = _check_affine(p, img.affine)
        shape = tuple(int(s) for s in img.shape)
        if len(shape) == 4 and shape[3] > 1:
            data = _one_hot_to_labels(p, np.asarray(_read_data(p, img)))
        else:
            shape3 = _squeeze_to_3d(p, shape)
            data = _integer_labels(p, np.asarray(_read_data(p, img)).reshape(shape3))
    if data.dtype.kind == "i" and data.size and int(data.min()) < 0:
        raise RanregError(f"{p}: label map has negative values (min {int(data.min())})")
    return Volume(array=data, affine=affine, spacing=spacing_from_affine(affine), path=p)


def _integer_labels(p: Path, data: np.ndarray) -> np.ndarray:
    """A 3D label array as integers: bool -> uint8, whole-number floats -> int32."""
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise RanregError(f"{p}: label map contains NaN or infinite values")
        if not np.array_equal(data, np.round(data)):
            raise RanregError(f"{p}: label map has non-integer values")
        return data.astype(np.int32)
    if data.dtype.kind not in "iu":
        raise RanregError(f"{p}: unsupported label data type {data.dtype}")
    return data


def load_label(path: str | os.PathLike[str]) -> np.ndarray:
    """Load an integer label map (see :func:`load_label_volume`) and return its array."""
    return load_label_volume(path).array


def _nifti_ext(p: Path) -> str:
    for ext in _NIFTI_EXTS:
        if p.name.endswith(ext):
            return ext
    raise RanregError(f"{p}: output file name must end with .nii.gz or .nii")


def _storable(array: np.ndarray) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if arr.dtype == np.float64:
        return arr.astype(np.float32)
    if arr.dtype in (np.int64, np.uint64):
        if arr.size == 0:
            return arr.astype(np.int32)
        lo, hi = int(arr.min()), int(arr.max())
        info = np.iinfo(np.int32)
        if lo < info.min or hi > info.max:
            raise ValueError(f"integer values {lo}..{hi} do not fit in int32")
        return arr.astype(np.int32)
    return arr


def save_nifti(
    path: str | os.PathLike[str],
    array: np.ndarray,
    affine: np.ndarray,
) -> Path:
    """Write ``array`` with ``affine`` to ``path`` (.nii.gz compressed, .nii plain).

    bool is stored as uint8, float64 as float32 and int64 as int32. The write is
    atomic: a temporary file in the same directory is renamed onto ``path``.
    Missing parent directories are created.
    """
    p = Path(path)
    ext = _nifti_ext(p)
    arr = _storable(array)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_file(p, ext) as tmp:
        nib.save(img, str(tmp))
    return p


def save_image(
    path: str | os.PathLike[str],
    array: np.ndarray,
    affine: np.ndarray,
) -> Path:
    """Write a 3D ``array`` (indexed ``[i, j, k]``) with its RAS+ ``affine`` in the format
    its name says: ``.nii.gz`` / ``.nii`` with :func:`save_nifti`, ``.nrrd`` / ``.mha``
    through SimpleITK (LPS origin, spacing and direction; compressed voxel data).

    As for :func:`save_nifti`: bool is stored as uint8, float64 as float32, int64 as int32,
    other integer types (label maps) are kept; the write is atomic (temporary file in the
    same folder, renamed onto ``path``) and missing parent folders are created. Pick the
    name with :func:`ranreg.data.formats.output_name`. Any other ending (including the
    two-file ``.nhdr`` and ``.mhd``) is a :class:`RanregError`.
    """
    p = Path(path)
    ext = image_suffix(p)
    if ext in _NIFTI_EXTS:
        return save_nifti(p, array, affine)
    if ext in (".nrrd", ".mha"):
        return write_itk_image(p, _storable(array), affine)
    raise RanregError(f"{p}: output file name must end with .nii.gz, .nii, .nrrd or .mha")
