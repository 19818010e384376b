"""Images in NIfTI, NRRD, MetaImage and DICOM series read to the same array and RAS affine;
LPS <-> RAS checked against nibabel; outputs written in each format; bad files refused with
one error naming them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ranreg.cli import main
from ranreg.data.formats import (
    DDF_NAME,
    FormatWarning,
    affine_from_itk,
    image_stem,
    itk_geometry,
    output_format,
    output_name,
)
from ranreg.data.io import load_label_volume, load_nifti, save_image, save_nifti
from ranreg.errors import RanregError

sitk = pytest.importorskip("SimpleITK")

SHAPE = (12, 10, 8)  # i, j, k
SPACING = (0.8, 0.9, 2.5)  # anisotropic, mm
ORIGIN_LPS = (-40.25, 31.5, 12.75)
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
FOR_UID = "1.2.826.0.1.3680043.8.498.2"
UID_A = "1.2.826.0.1.3680043.8.498.10"
UID_B = "1.2.826.0.1.3680043.8.498.20"
LPS = np.diag([-1.0, -1.0, 1.0])


def direction_lps() -> np.ndarray:
    """An oblique proper rotation (det +1, so DICOM's slice normal is the third axis)."""
    return Rotation.from_rotvec([0.3, -0.2, 0.25]).as_matrix()


def expected_affine() -> np.ndarray:
    """The RAS+ affine of the test volume, written out by hand from its LPS geometry."""
    a = np.eye(4)
    a[:3, :3] = LPS @ direction_lps() @ np.diag(SPACING)
    a[:3, 3] = LPS @ np.asarray(ORIGIN_LPS)
    return a


def volume(seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """int16 'HU' values indexed [i, j, k], with a gradient so axis mix-ups show."""
    rng = np.random.default_rng(seed)
    i, j, k = np.indices(shape)
    return (rng.integers(-1000, 1000, size=shape) + 7 * i - 3 * j + 11 * k).astype(np.int16)


def sitk_image(array: np.ndarray, origin=ORIGIN_LPS) -> object:
    """The array as a SimpleITK image with the test geometry, set directly (not by ranreg)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    img.SetSpacing(SPACING)
    img.SetOrigin(origin)
    img.SetDirection(tuple(direction_lps().ravel()))
    return img


def write_dicom_series(folder: Path, image, series_uid: str, prefix: str = "im") -> Path:
    """One file per slice with the tags a scanner writes for the slice geometry."""
    folder.mkdir(parents=True, exist_ok=True)
    d = image.GetDirection()
    iop = "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    sx, sy, sz = image.GetSpacing()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetSize()[2]):
        piece = image[:, :, k : k + 1]
        ipp = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0010|0010": "Formats^Test",
            "0010|0020": "ranreg-formats",
            "0020|000d": STUDY_UID,
            "0020|000e": series_uid,
            "0020|0052": FOR_UID,
            "0020|0011": series_uid.rsplit(".", 1)[-1],
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in ipp),
            "0020|0037": iop,
            "0028|0030": f"{sy:.6f}\\{sx:.6f}",  # row spacing (along j), column spacing (i)
            "0018|0050": f"{sz:.6f}",
        }
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(piece)
    return folder


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """The same int16 volume as NIfTI (nibabel), NRRD, MHA, MHD and a DICOM series (SimpleITK)."""
    tmp = tmp_path_factory.mktemp("formats")
    arr = volume()
    img = sitk_image(arr)
    files = {"nifti": save_nifti(tmp / "vol.nii.gz", arr, expected_affine())}
    for name in ("vol.nrrd", "vol.nhdr", "vol.mha", "vol.mhd"):
        sitk.WriteImage(img, str(tmp / name), True)
        files[name.split(".")[1]] = tmp / name
    files["dicom"] = write_dicom_series(tmp / "dicom", img, UID_A)
    return files


# ------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("kind", ["nrrd", "nhdr", "mha", "mhd", "dicom"])
def test_every_format_reads_as_the_nifti(written: dict[str, Path], kind: str) -> None:
    ref = load_nifti(written["nifti"], dtype=None)
    np.testing.assert_allclose(ref.affine, expected_affine(), atol=1e-4)
    vol = load_nifti(written[kind], dtype=None)
    assert vol.path == written[kind] and vol.shape == SHAPE
    assert vol.array.dtype.kind in "iu"  # the stored integers (DICOM int16 too)
    np.testing.assert_array_equal(vol.array, volume())
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(vol.spacing, SPACING, atol=1e-4)
    default = load_nifti(written[kind])
    assert default.array.dtype == np.float32
    np.testing.assert_array_equal(default.array, volume().astype(np.float32))
    with pytest.raises(RanregError, match=r"negative"):  # the label checks apply too
        load_label_volume(written[kind])
    # a voxel's world position as ITK places it (LPS), independently of ranreg's formulas
    index = (3, 7, 5)
    p_lps = np.asarray(sitk_image(volume()).TransformIndexToPhysicalPoint(index))
    world = vol.affine[:3, :3] @ index + vol.affine[:3, 3]
    np.testing.assert_allclose(world, LPS @ p_lps, atol=1e-4)


def test_lps_ras_conversion_against_nibabel(tmp_path: Path) -> None:
    """An oblique, anisotropic NIfTI with a flipped axis, read by SimpleITK and re-written
    as NRRD/MHA: ranreg's affine from ITK's LPS geometry equals nibabel's."""
    aff = np.eye(4)
    aff[:3, :3] = Rotation.from_rotvec([0.2, -0.35, 0.15]).as_matrix() @ np.diag([-1.2, 0.7, 3.0])
    aff[:3, 3] = [30.5, -12.25, 80.0]
    arr = np.random.default_rng(3).normal(size=(9, 7, 6)).astype(np.float32)
    nii = save_nifti(tmp_path / "obl.nii.gz", arr, aff)
    nib_affine = nib.load(nii).affine
    np.testing.assert_allclose(nib_affine, aff, atol=1e-4)
    img = sitk.ReadImage(str(nii))
    np.testing.assert_allclose(
        affine_from_itk(img.GetOrigin(), img.GetSpacing(), img.GetDirection()),
        nib_affine,
        atol=1e-4,
    )
    origin, spacing, direction = itk_geometry(nib_affine)
    np.testing.assert_allclose(origin, img.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(spacing, img.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(direction, img.GetDirection(), atol=1e-5)
    for ext in (".nrrd", ".mha"):
        sitk.WriteImage(img, str(tmp_path / f"re{ext}"))
        vol = load_nifti(tmp_path / f"re{ext}")
        np.testing.assert_array_equal(vol.array, arr)
        np.testing.assert_allclose(vol.affine, nib_affine, atol=1e-4)


def test_labels_keep_their_integer_type_and_are_checked(tmp_path: Path) -> None:
    lab = (volume(1) % 5).astype(np.int8)
    lab[lab < 0] = 0
    sitk.WriteImage(sitk_image(lab), str(tmp_path / "lab.nrrd"))
    vol = load_label_volume(tmp_path / "lab.nrrd")
    assert vol.array.dtype == np.int8
    np.testing.assert_array_equal(vol.array, lab)
    np.testing.assert_allclose(vol.affine, expected_affine(), atol=1e-4)
    sitk.WriteImage(sitk_image(np.full(SHAPE, 1.5, np.float32)), str(tmp_path / "frac.mha"))
    with pytest.raises(RanregError, match=r"frac.mha.*non-integer"):
        load_label_volume(tmp_path / "frac.mha")
    sitk.WriteImage(sitk_image(np.full(SHAPE, -2, np.int16)), str(tmp_path / "neg.mha"))
    with pytest.raises(RanregError, match=r"neg.mha.*negative"):
        load_label_volume(tmp_path / "neg.mha")


def test_non_finite_and_dimensions(tmp_path: Path) -> None:
    arr = np.zeros(SHAPE, np.float32)
    arr[1, 2, 3] = np.nan
    sitk.WriteImage(sitk_image(arr), str(tmp_path / "nan.mha"))
    with pytest.raises(RanregError, match=r"nan.mha: 1 voxel"):
        load_nifti(tmp_path / "nan.mha")
    sitk.WriteImage(sitk.Image([6, 5], sitk.sitkFloat32), str(tmp_path / "flat.nrrd"))
    with pytest.raises(RanregError, match=r"flat.nrrd: expected a 3D volume"):
        load_nifti(tmp_path / "flat.nrrd")
    sitk.WriteImage(sitk.Image([6, 5, 4, 2], sitk.sitkFloat32), str(tmp_path / "four.nrrd"))
    with pytest.raises(RanregError, match=r"four.nrrd: expected a 3D volume"):
        load_nifti(tmp_path / "four.nrrd")
    sitk.WriteImage(sitk.Image([6, 5, 4, 1], sitk.sitkFloat32), str(tmp_path / "single.nrrd"))
    assert load_nifti(tmp_path / "single.nrrd").shape == (6, 5, 4)


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_rgb_and_complex_pixels_are_refused(tmp_path: Path, ext: str) -> None:
    rgb = tmp_path / f"rgb{ext}"
    sitk.WriteImage(sitk.Image([6, 5, 4], sitk.sitkVectorUInt8, 3), str(rgb))
    with pytest.raises(RanregError, match=rf"rgb{ext}: 3 components per pixel.*scalar"):
        load_nifti(rgb)
    with pytest.raises(RanregError, match=rf"rgb{ext}: 3 components"):
        load_label_volume(rgb)
    cplx = tmp_path / f"cplx{ext}"
    sitk.WriteImage(sitk.Image([6, 5, 4], sitk.sitkComplexFloat32), str(cplx))
    with pytest.raises(RanregError, match=rf"cplx{ext}: .*(complex|components)"):
        load_nifti(cplx)


def _one_error(path: Path, match: str) -> str:
    with pytest.raises(RanregError) as info:
        load_nifti(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert "\n" not in message and match in message, message
    return message


def test_corrupt_missing_and_wrong_inputs(written: dict[str, Path], tmp_path: Path) -> None:
    data = written["nrrd"].read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(data[: len(data) // 2])
    assert "expected" in _one_error(tmp_path / "cut.nrrd", "truncated or corrupt")  # bytes
    for ext in (".nrrd", ".mha"):  # uncompressed voxel data cut short
        sitk.WriteImage(sitk_image(volume()), str(tmp_path / f"raw{ext}"), False)
        data = (tmp_path / f"raw{ext}").read_bytes()
        (tmp_path / f"rawcut{ext}").write_bytes(data[: len(data) - 500])
        _one_error(tmp_path / f"rawcut{ext}", "truncated or corrupt")
    (tmp_path / "junk.nrrd").write_text("this is not an image\n")
    _one_error(tmp_path / "junk.nrrd", "cannot read as NRRD")
    (tmp_path / "junk.mha").write_bytes(b"\x00\x01garbage" * 10)
    _one_error(tmp_path / "junk.mha", "cannot read as MetaImage")
    _one_error(tmp_path / "missing.mha", "not found")
    (tmp_path / "empty").mkdir()
    _one_error(tmp_path / "empty", "without a DICOM series")
    notdicom = tmp_path / "notdicom"
    notdicom.mkdir()
    save_nifti(notdicom / "a.nii.gz", volume(), np.eye(4))
    assert "pass one of them" in _one_error(notdicom, "without a DICOM series")
    _one_error(written["dicom"] / "im000.dcm", "pass the folder")


def test_uneven_dicom_slices_are_refused(tmp_path: Path) -> None:
    folder = write_dicom_series(tmp_path / "gap", sitk_image(volume()), UID_A)
    (folder / "im004.dcm").unlink()  # a missing slice: the rest would be misplaced
    _one_error(folder, "regular grid")


def test_folder_with_two_series(tmp_path: Path) -> None:
    folder = write_dicom_series(tmp_path / "two", sitk_image(volume()), UID_A, "a")
    small = sitk_image(volume(5, (12, 10, 5)), origin=(0.0, 0.0, 0.0))
    write_dicom_series(folder, small, UID_B, "b")
    with pytest.warns(FormatWarning, match=rf"2 DICOM series; reading the largest, {UID_A}"):
        vol = load_nifti(folder, dtype=None)
    np.testing.assert_array_equal(vol.array, volume())
    np.testing.assert_allclose(vol.affine, expected_affine(), atol=1e-4)
    tie = write_dicom_series(tmp_path / "tie", sitk_image(volume()), UID_A, "a")
    write_dicom_series(tie, sitk_image(volume(6), origin=(0.0, 0.0, 0.0)), UID_B, "b")
    message = _one_error(tie, "same number of files")
    assert UID_A in message and UID_B in message


def test_missing_simpleitk_says_how_to_install(
    written: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import fails
    with pytest.raises(RanregError, match=r"vol.nrrd: .*pip install SimpleITK"):
        load_nifti(written["nrrd"])
    assert load_nifti(written["nifti"]).shape == SHAPE  # NIfTI needs no SimpleITK


# ------------------------------------------------------------------------------- writing
@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.float32, np.int8, np.uint8, np.int16, np.bool_])
def test_save_image_round_trip(tmp_path: Path, ext: str, dtype: type) -> None:
    arr = np.abs(volume()) % 100
    arr = (arr > 50) if dtype is np.bool_ else arr.astype(dtype)
    path = save_image(tmp_path / "sub" / f"out{ext}", arr, expected_affine())
    assert [p.name for p in path.parent.iterdir()] == [f"out{ext}"]  # no temporary file left
    vol = load_nifti(path, dtype=None)
    assert vol.array.dtype == (np.uint8 if dtype is np.bool_ else dtype)
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.affine, expected_affine(), atol=1e-4)
    if dtype is not np.float32:
        assert load_label_volume(path).array.dtype == vol.array.dtype
    save_image(path, np.zeros((3, 4, 5), np.float32), np.eye(4))  # replaces the file
    assert load_nifti(path).shape == (3, 4, 5)
    assert [p.name for p in path.parent.iterdir()] == [f"out{ext}"]


def test_save_image_geometry_read_by_simpleitk(tmp_path: Path) -> None:
    path = save_image(tmp_path / "w.nrrd", volume(), expected_affine())
    img = sitk.ReadImage(str(path))
    np.testing.assert_allclose(img.GetOrigin(), ORIGIN_LPS, atol=1e-4)
    np.testing.assert_allclose(img.GetSpacing(), SPACING, atol=1e-4)
    np.testing.assert_allclose(img.GetDirection(), direction_lps().ravel(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), volume())


def test_save_image_refuses_other_names(tmp_path: Path) -> None:
    for name in ("out.nhdr", "out.mhd", "out.png"):
        with pytest.raises((RanregError, ValueError), match=name):
            save_image(tmp_path / name, volume(), np.eye(4))
    assert not any(tmp_path.iterdir())


def test_output_format_and_names(written: dict[str, Path]) -> None:
    assert output_format(written["nifti"]) == ".nii.gz"
    assert output_format("scan.nii") == ".nii.gz"
    assert output_format(written["nrrd"]) == ".nrrd" == output_format("SCAN.NHDR")
    assert output_format(written["mhd"]) == ".mha" == output_format("scan.mha")
    assert output_format(written["dicom"]) == ".nii.gz"  # DICOM in, NIfTI out
    assert output_format(written["dicom"], "nrrd") == ".nrrd"
    assert output_format(written["nrrd"], ".NII") == ".nii"
    assert output_format(None) == ".nii.gz"
    with pytest.raises(RanregError, match=r"--format 'dcm'.*nii.gz, nii, nrrd, mha"):
        output_format(written["nrrd"], "dcm")
    assert output_name("warped", written["nrrd"]) == "warped.nrrd"
    assert output_name("warped_labels", written["mha"]) == "warped_labels.mha"
    assert output_name("jacobian", written["dicom"]) == "jacobian.nii.gz"
    assert output_name("warped", written["dicom"], "mha") == "warped.mha"
    assert DDF_NAME == "ddf.nii.gz"
    assert image_stem("a.b.nii.gz") == "a.b" and image_stem("x.NRRD") == "x"


# ------------------------------------------------------------------------ command line
def test_register_reads_every_format(
    written: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """NRRD fixed, DICOM moving, MetaImage labels: the identity model leaves Dice at 1."""
    lab = (np.abs(volume()) % 3).astype(np.uint8)
    sitk.WriteImage(sitk_image(lab), str(tmp_path / "lab.mha"))
    out = tmp_path / "out"
    argv = ["register", "--fixed", str(written["nrrd"]), "--moving", str(written["dicom"])]
    argv += ["--model", "identity", "--out", str(out), "--labels", "1", "2"]
    labels = str(tmp_path / "lab.mha")
    argv += ["--moving-labels", labels, "--fixed-labels", labels]
    assert main(argv) == 0, capfd.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mean_after"]["dice"] == pytest.approx(1.0)
    warped = next(p for p in out.iterdir() if p.name.startswith("warped."))
    np.testing.assert_allclose(load_nifti(warped).array, volume(), atol=0.5)
    capfd.readouterr()
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.mha").write_bytes(b"\x00\x01garbage" * 10)  # MetaIO prints on stderr
    for bad in (tmp_path / "empty", tmp_path / "junk.mha"):
        argv = ["register", "--fixed", str(written["nrrd"]), "--moving", str(bad)]
        assert main([*argv, "--model", "identity", "--out", str(tmp_path / "out2")]) == 2
        err = capfd.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(bad) in err, err
        assert not (tmp_path / "out2").exists()
