"""Image formats other than NIfTI, read and written through SimpleITK.

NIfTI (``.nii``, ``.nii.gz``) is read with nibabel (:mod:`ranreg.data.io`). NRRD (``.nrrd``,
``.nhdr``), MetaImage (``.mha``, ``.mhd``) and DICOM series (a folder holding one series)
are read here with SimpleITK, which is imported only when such a file is met (it is slow to
import). Every reader gives what nibabel gives for a NIfTI file:

* the voxel array indexed ``[i, j, k]`` in ITK's index order, which is nibabel's (the
  transpose of ``SimpleITK.GetArrayFromImage``), in the stored pixel type;
* the voxel-to-world affine in RAS+ millimetres built from ITK's origin, spacing and
  direction cosines. ITK's physical space is LPS, so the first two rows of ITK's
  ``[direction @ diag(spacing) | origin]`` are negated (:func:`affine_from_itk`;
  :func:`itk_geometry` is the inverse used when writing).

Every problem with a file (missing, unreadable, truncated, not 3D, vector/RGB or complex
pixels, DICOM slices off a regular grid) raises one :class:`~ranreg.errors.RanregError`
whose message starts with the path and holds no line break.

Outputs (:func:`output_format`, :func:`output_name`): in the fixed image's format unless a
format is asked for; DICOM inputs give NIfTI outputs. The displacement field stays
``ddf.nii.gz`` whatever the format: a NIfTI DISPVECT field is what ITK, ANTs, SimpleITK and
3D Slicer read as a displacement field (``ranreg.outputs.save_ddf``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ranreg.atomic import atomic_file
from ranreg.data.sitk_runtime import QuietITK, import_simpleitk, itk_reason
from ranreg.errors import RanregError

__all__ = [
    "NIFTI_SUFFIXES",
    "ITK_SUFFIXES",
    "IMAGE_SUFFIXES",
    "DICOM_FILE_SUFFIXES",
    "OUTPUT_FORMATS",
    "DEFAULT_OUTPUT_SUFFIX",
    "DDF_NAME",
    "FormatWarning",
    "image_format",
    "image_suffix",
    "image_stem",
    "is_image_file",
    "uses_simpleitk",
    "import_simpleitk",
    "read_itk_image",
    "write_itk_image",
    "affine_from_itk",
    "itk_geometry",
    "output_format",
    "output_name",
]

#: NIfTI file name endings (read with nibabel).
NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: File name endings read through SimpleITK -> (format name, ITK ImageIO).
ITK_SUFFIXES = {
    ".nrrd": ("NRRD", "NrrdImageIO"),
    ".nhdr": ("NRRD", "NrrdImageIO"),
    ".mha": ("MetaImage", "MetaImageIO"),
    ".mhd": ("MetaImage", "MetaImageIO"),
}
#: Every image file name ending ranreg reads (DICOM series are folders).
IMAGE_SUFFIXES = (*NIFTI_SUFFIXES, *ITK_SUFFIXES)
#: Values of ``--format``: the output formats (single files, written atomically).
OUTPUT_FORMATS = ("nii.gz", "nii", "nrrd", "mha")
#: Output suffix when the input format gives none (NIfTI and DICOM inputs).
DEFAULT_OUTPUT_SUFFIX = ".nii.gz"
#: The displacement field is always NIfTI (DISPVECT), whatever the output format.
DDF_NAME = "ddf.nii.gz"

#: Single DICOM files: refused with a hint to pass the folder holding the series.
DICOM_FILE_SUFFIXES = (".dcm", ".dicom", ".ima")
_WRITERS = {".nrrd": "NrrdImageIO", ".mha": "MetaImageIO"}
_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)
_SUPPORTED = (
    "a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd) file, "
    "or a folder holding one DICOM series"
)


class FormatWarning(UserWarning):
    """A file was read, but not exactly as given (e.g. one DICOM series of several)."""


# ------------------------------------------------------------------------------- names
def image_suffix(path: str | os.PathLike[str]) -> str:
    """The lower-case file name ending that decides the format (``".nii.gz"``, ``".nrrd"``)."""
    name = Path(path).name.lower()
    for ext in IMAGE_SUFFIXES:
        if name.endswith(ext):
            return ext
    return Path(name).suffix


def image_stem(path: str | os.PathLike[str]) -> str:
    """File name without its image ending (``"0001.nii.gz"`` and ``"0001.nrrd"`` -> ``"0001"``)."""
    name = Path(path).name
    for ext in IMAGE_SUFFIXES:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a (non-hidden) file with one of :data:`IMAGE_SUFFIXES`."""
    p = Path(path)
    return p.is_file() and not p.name.startswith(".") and image_suffix(p) in IMAGE_SUFFIXES


def image_format(path: str | os.PathLike[str]) -> str:
    """``"nifti"``, ``"nrrd"``, ``"metaimage"``, ``"dicom"`` (a folder), ``"dicom-file"``
    (one file of a series, refused on reading) or ``"unknown"``."""
    if Path(path).is_dir():
        return "dicom"
    ext = image_suffix(path)
    if ext in NIFTI_SUFFIXES:
        return "nifti"
    if ext in DICOM_FILE_SUFFIXES:
        return "dicom-file"
    if ext in ITK_SUFFIXES:
        return ITK_SUFFIXES[ext][0].lower()
    return "unknown"


def uses_simpleitk(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` goes to :func:`read_itk_image` (NRRD, MetaImage, DICOM), not nibabel."""
    return image_format(path) in ("nrrd", "metaimage", "dicom", "dicom-file")


def output_format(input_path: str | os.PathLike[str] | None, requested: str | None = None) -> str:
    """The suffix of image outputs: ``".nii.gz"``, ``".nii"``, ``".nrrd"`` or ``".mha"``.

    ``requested`` (the value of a ``--format`` option: one of :data:`OUTPUT_FORMATS`, a
    leading dot allowed) wins; otherwise the format of ``input_path`` (for ``ranreg
    register``: the fixed image, whose grid the outputs are on): NRRD (``.nrrd``/``.nhdr``)
    -> ``.nrrd``, MetaImage (``.mha``/``.mhd``) -> ``.mha`` (single files, so that they
    can be written atomically), NIfTI (``.nii`` too), a DICOM folder or anything else ->
    ``.nii.gz``. This covers the warped image, the warped labels and the Jacobian; the
    displacement field stays :data:`DDF_NAME` (``ddf.nii.gz``) in every case, because a
    NIfTI DISPVECT field is what ITK-based tools read as a displacement field. An unknown
    ``requested`` is a :class:`RanregError` listing the choices.
    """
    if requested is not None and str(requested).strip():
        fmt = str(requested).strip().lower().lstrip(".")
        if fmt not in OUTPUT_FORMATS:
            raise RanregError(
                f"--format {requested!r}: unknown output format; choose one of "
                + ", ".join(OUTPUT_FORMATS)
            )
        return f".{fmt}"
    if input_path is None:
        return DEFAULT_OUTPUT_SUFFIX
    kind = image_format(input_path)
    return {"nrrd": ".nrrd", "metaimage": ".mha"}.get(kind, DEFAULT_OUTPUT_SUFFIX)


def output_name(stem: str, like_path: str | os.PathLike[str] | None, fmt: str | None = None) -> str:
    """``stem`` with the suffix of :func:`output_format` (``("warped", "f.nrrd")`` ->
    ``"warped.nrrd"``; ``("warped", "dicom_folder/")`` -> ``"warped.nii.gz"``)."""
    return f"{stem}{output_format(like_path, fmt)}"


# ---------------------------------------------------------------------------- geometry
def affine_from_itk(
    origin: Any, spacing: Any, direction: Any, ndim: int | None = None
) -> np.ndarray:
    """RAS+ voxel-to-world 4x4 affine from ITK's (LPS) origin, spacing and direction.

    ``direction`` is ITK's row-major direction matrix (flat, as SimpleITK returns it, or
    square); for images of more than 3 dimensions the leading 3x3 block is used.
    """
    origin = np.asarray(origin, dtype=np.float64).ravel()
    spacing = np.asarray(spacing, dtype=np.float64).ravel()
    d = np.asarray(direction, dtype=np.float64)
    n = int(ndim or round(np.sqrt(d.size)))
    d = d.reshape(n, n)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = _LPS @ d @ np.diag(spacing[:3])
    affine[:3, 3] = _LPS @ origin[:3]
    return affine


def itk_geometry(
    affine: np.ndarray,
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """ITK's (LPS) origin, spacing and flat row-major direction for a RAS+ 4x4 affine."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got {affine!r}")
    lps = _LPS @ affine[:3, :3]
    spacing = np.sqrt((lps**2).sum(axis=0))
    if np.any(spacing <= 0) or abs(np.linalg.det(lps)) < 1e-12:
        raise ValueError("affine has a singular voxel-to-world matrix")
    direction = lps / spacing
    origin = _LPS @ affine[:3, 3]
    return (
        tuple(float(v) for v in origin),
        tuple(float(v) for v in spacing),
        tuple(float(v) for v in direction.ravel()),
    )


# ----------------------------------------------------------------------------- reading
def read_itk_image(path: str | os.PathLike[str]) -> tuple[Path, np.ndarray, np.ndarray]:
    """Read an NRRD or MetaImage file or a DICOM series folder through SimpleITK.

    Returns ``(path, array, affine)``: the 3D array indexed ``[i, j, k]`` in the stored
    pixel type (after DICOM rescaling), and the RAS+ voxel-to-world affine. Images with
    more than 3 dimensions whose extra ones have size 1 are squeezed to 3D. A folder must
    hold one DICOM series (files directly in it); with several, the one with the most
    files is read and a :class:`FormatWarning` names the others; two largest series of the
    same size are an error listing their UIDs. A series whose slice positions do not lie on
    the regular grid of the volume read (missing or unevenly spaced slices, several slices
    per position) is an error rather than a wrongly placed volume.
    """
    p = Path(path)
    if not p.exists():
        raise RanregError(f"{p}: file not found")
    if p.is_file() and image_suffix(p) in DICOM_FILE_SUFFIXES:
        raise RanregError(
            f"{p}: is one file of a DICOM series; pass the folder that holds the whole series"
        )
    sitk = import_simpleitk(p)
    with QuietITK(sitk):
        image = _read_dicom_folder(sitk, p) if p.is_dir() else _read_file(sitk, p)
    return p, *_to_array_affine(sitk, p, image)


def _read_file(sitk: ModuleType, p: Path) -> Any:
    ext = image_suffix(p)
    if ext not in ITK_SUFFIXES:
        raise RanregError(f"{p}: unknown image format; expected {_SUPPORTED}")
    fmt, io_name = ITK_SUFFIXES[ext]
    reader = sitk.ImageFileReader()
    reader.SetImageIO(io_name)
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise RanregError(f"{p}: cannot read as {fmt} ({itk_reason(exc)})") from exc
    _check_header(
        sitk,
        p,
        reader.GetPixelID(),
        reader.GetNumberOfComponents(),
        tuple(int(s) for s in reader.GetSize()),
    )
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise RanregError(
            f"{p}: cannot read voxel data, file truncated or corrupt ({itk_reason(exc)})"
        ) from exc


def _pixel_name(sitk: ModuleType, pixel_id: int) -> str:
    try:
        return str(sitk.GetPixelIDValueAsString(pixel_id))
    except Exception:  # pragma: no cover - only for unknown ids
        return str(pixel_id)


def _check_header(
    sitk: ModuleType, p: Path, pixel_id: int, components: int, size: tuple[int, ...]
) -> None:
    complex_ids = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}
    if pixel_id in complex_ids:
        raise RanregError(
            f"{p}: complex pixel type ({_pixel_name(sitk, pixel_id)}) is not supported; "
            "ranreg needs a real-valued scalar image"
        )
    if components != 1:
        raise RanregError(
            f"{p}: {components} components per pixel ({_pixel_name(sitk, pixel_id)}: a vector, "
            "RGB or multi-channel image); ranreg needs a scalar grey-level image"
        )
    if len(size) < 3:
        raise RanregError(f"{p}: expected a 3D volume, got a {len(size)}D image of size {size}")
    if any(s != 1 for s in size[3:]):
        raise RanregError(f"{p}: expected a 3D volume, got a {len(size)}D volume of shape {size}")


def _to_array_affine(sitk: ModuleType, p: Path, image: Any) -> tuple[np.ndarray, np.ndarray]:
    size = tuple(int(s) for s in image.GetSize())
    _check_header(sitk, p, image.GetPixelID(), image.GetNumberOfComponentsPerPixel(), size)
    data = sitk.GetArrayFromImage(image)  # [..., k, j, i]
    data = np.ascontiguousarray(data.reshape(size[:3][::-1]).transpose(2, 1, 0))
    affine = affine_from_itk(
        image.GetOrigin(), image.GetSpacing(), image.GetDirection(), image.GetDimension()
    )
    return data, affine


def _read_dicom_folder(sitk: ModuleType, p: Path) -> Any:
    series_reader = sitk.ImageSeriesReader
    try:
        uids = list(series_reader.GetGDCMSeriesIDs(str(p)))
        series = {uid: list(series_reader.GetGDCMSeriesFileNames(str(p), uid)) for uid in uids}
    except RuntimeError as exc:
        raise RanregError(f"{p}: cannot list DICOM series ({itk_reason(exc)})") from exc
    if not series:
        hint = ""
        if any(image_suffix(f) in IMAGE_SUFFIXES for f in p.iterdir() if f.is_file()):
            hint = " (it holds image files: pass one of them)"
        raise RanregError(
            f"{p}: is a directory without a DICOM series{hint}; expected {_SUPPORTED}"
        )
    uid = _choose_series(p, series)
    files = series[uid]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise RanregError(
            f"{p}: cannot read DICOM series {_shown(uid)} ({len(files)} files; {itk_reason(exc)})"
        ) from exc
    _check_slice_positions(p, reader, image, len(files))
    return image


def _shown(uid: str) -> str:
    """A series UID as printed (DICOM pads odd-length UIDs with a NUL byte)."""
    return uid.rstrip("\x00 ")


def _choose_series(p: Path, series: dict[str, list[str]]) -> str:
    """The UID of the series with the most files (several: a warning; a tie: an error)."""
    ranked = sorted(series.items(), key=lambda kv: len(kv[1]), reverse=True)
    if len(ranked) == 1:
        return ranked[0][0]
    listing = ", ".join(f"{_shown(uid)} ({len(files)} files)" for uid, files in ranked)
    if len(ranked[0][1]) == len(ranked[1][1]):
        raise RanregError(
            f"{p}: holds {len(ranked)} DICOM series and the largest have the same number of "
            f"files; put the series to register in a folder of its own (series: {listing})"
        )
    uid = ranked[0][0]
    warnings.warn(
        f"{p}: holds {len(ranked)} DICOM series; reading the largest, {_shown(uid)}, and "
        f"ignoring the others (series: {listing})",
        FormatWarning,
        stacklevel=5,  # the caller of load_nifti / load_label_volume
    )
    return uid


def _check_slice_positions(p: Path, reader: Any, image: Any, n_files: int) -> None:
    """Every slice's ImagePositionPatient must sit where the volume puts slice k."""
    size = image.GetSize()
    if n_files < 2 or size[2] != n_files:
        return
    key = "0020|0032"
    positions = []
    for k in range(n_files):
        if not reader.HasMetaDataKey(k, key):
            return
        try:
            positions.append([float(v) for v in reader.GetMetaData(k, key).split("\\")[:3]])
        except ValueError:
            return
    found = np.asarray(positions, dtype=np.float64)
    if found.shape != (n_files, 3) or not np.all(np.isfinite(found)):
        return
    expected = np.asarray(
        [image.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(n_files)], dtype=np.float64
    )
    dist = np.sqrt(((found - expected) ** 2).sum(axis=1))
    spacing = image.GetSpacing()
    tol = max(0.01, 0.1 * float(spacing[2]))
    worst = int(np.argmax(dist))
    if dist[worst] > tol:
        steps = np.sqrt((np.diff(found, axis=0) ** 2).sum(axis=1))
        raise RanregError(
            f"{p}: the DICOM slices do not lie on a regular grid (missing or unevenly spaced "
            f"slices, gantry tilt or several slices per position: distances between "
            f"neighbouring slices {steps.min():.3g} to {steps.max():.3g} mm; slice {worst} is "
            f"{dist[worst]:.3g} mm off); resample the series to a regular volume first"
        )


# ----------------------------------------------------------------------------- writing
def write_itk_image(path: str | os.PathLike[str], array: np.ndarray, affine: np.ndarray) -> Path:
    """Write a 3D array (indexed ``[i, j, k]``) with its RAS+ affine as ``.nrrd`` or ``.mha``.

    The pixel type is kept (integer label maps stay integer; bool is stored as uint8);
    origin, spacing and direction are ITK's LPS ones (:func:`itk_geometry`); the voxel data
    are compressed. The write is atomic: a hidden temporary file in the same folder is
    renamed onto ``path``; missing parent folders are created. Detached-header formats
    (``.nhdr``, ``.mhd``) are refused, as they are two files.
    """
    p = Path(path)
    ext = image_suffix(p)
    if ext not in _WRITERS:
        raise ValueError(
            f"{p}: SimpleITK outputs must end with .nrrd or .mha (single files), got {ext!r}"
        )
    arr = np.asarray(array)
    if arr.ndim != 3:
        raise ValueError(f"{p}: expected a 3D array, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    origin, spacing, direction = itk_geometry(affine)
    sitk = import_simpleitk(p)
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)), isVector=False)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    writer = sitk.ImageFileWriter()
    writer.SetImageIO(_WRITERS[ext])
    writer.SetUseCompression(True)
    with atomic_file(p, ext) as tmp:
        writer.SetFileName(str(tmp))
        try:
            writer.Execute(image)
        except RuntimeError as exc:
            raise OSError(f"{p}: cannot write ({itk_reason(exc)})") from exc
    return p
