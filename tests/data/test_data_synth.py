"""Synthetic CT images from label maps and the ``ranreg data synth`` command."""

from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ranreg.cli import main
from ranreg.data import (
    ORGAN_HU,
    labels_to_image,
    load_label_volume,
    load_nifti,
    subject_rng,
    synthesize_dataset,
)
from ranreg.data.synth_images import body_mask, sample_organ_hu, smooth_field
from ranreg.errors import RanregError


def _block_labels(shape=(64, 56, 40)) -> np.ndarray:
    """Every label 1..13 as a 5x5x5 cube, packed near the centre of the volume."""
    lab = np.zeros(shape, dtype=np.int8)
    cx, cy, cz = (n // 2 for n in shape)
    for k, value in enumerate(range(1, 14)):
        i, j = divmod(k, 4)
        x0, y0, z0 = cx - 11 + 6 * i, cy - 11 + 6 * j, cz - 6 + 3 * (k % 3)
        lab[x0 : x0 + 5, y0 : y0 + 5, z0 : z0 + 5] = value
    return lab


def _interior_means(img: np.ndarray, lab: np.ndarray, values=range(1, 14)) -> dict[int, float]:
    means = {}
    for v in values:
        inside = ndimage.binary_erosion(lab == v)
        if inside.any():
            means[v] = float(img[inside].mean())
    return means


def _write_labels(folder: Path, names, affine: np.ndarray) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    maps = {}
    for k, name in enumerate(names):
        lab = np.roll(_block_labels((48, 44, 24)), 2 * k, axis=0)
        nib.save(nib.Nifti1Image(lab, affine), str(folder / f"{name}.nii.gz"))
        maps[name] = lab
    return maps


def _affine() -> np.ndarray:
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-190.0, -150.0, 40.0]
    return aff


# ------------------------------------------------------------- labels_to_image


def test_labels_to_image_is_deterministic():
    lab = _block_labels()
    a = labels_to_image(lab, np.random.default_rng(5))
    b = labels_to_image(lab, np.random.default_rng(5))
    c = labels_to_image(lab, np.random.default_rng(6))
    assert a.dtype == np.float32 and a.shape == lab.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= -1024 and a.max() <= 3071


def test_organ_means_follow_the_table():
    lab = _block_labels()
    table = np.array([np.nan] + [ORGAN_HU[k].mean for k in range(1, 14)])
    flat = dict(texture=0.0, bias_mult=0.0, bias_add=0.0, blur_mm=0.0, noise_sd=4.0)
    img = labels_to_image(lab, np.random.default_rng(0), organ_hu=table, **flat)
    means = _interior_means(img, lab)
    for value, mean in means.items():
        assert abs(mean - ORGAN_HU[value].mean) < 3.0, (value, mean)
    # the order of the measured means is the designed order of the table
    order = sorted(means, key=lambda v: (ORGAN_HU[v].mean, means[v]))
    assert order == sorted(means, key=means.get)


def test_sampled_organ_hu_keeps_design_order():
    hu = sample_organ_hu(np.random.default_rng(0), jitter=0.0)
    assert np.isnan(hu[0])
    by_table = sorted(range(1, 14), key=lambda v: ORGAN_HU[v].mean)
    assert all(hu[a] <= hu[b] + 1e-9 for a, b in zip(by_table, by_table[1:], strict=False))
    for seed in range(20):  # with jitter, the clear contrasts survive every draw
        hu = sample_organ_hu(np.random.default_rng(seed))
        assert min(hu[8], hu[2], hu[3]) > max(hu[6], hu[11], hu[5]) > max(hu[4], hu[7])
        assert hu[9] > hu[6] and hu[10] > hu[11]


def test_body_air_and_tissue():
    lab = _block_labels()
    rng = np.random.default_rng(1)
    body, fat = body_mask(lab, (2.0, 2.0, 2.0), rng)
    organs = lab > 0
    assert body[organs].all() and not fat[organs].any()
    assert body.sum() > 1.5 * organs.sum() and not body.all()
    img = labels_to_image(lab, np.random.default_rng(1))
    assert img[~body].mean() < -950  # air (with noise)
    tissue = img[body & ~fat & ~ndimage.binary_dilation(organs, iterations=2)]
    assert 0.0 <= np.median(tissue) <= 60.0
    assert np.median(img[fat]) < -50


def test_smooth_field_statistics_and_subject_rng():
    f = smooth_field((64, 48, 80), (2.0, 2.0, 2.0), 10.0, np.random.default_rng(0))
    assert f.dtype == np.float32 and f.shape == (64, 48, 80)
    assert 0.7 < f.std() < 1.3 and abs(f.mean()) < 0.3
    # neighbouring voxels are strongly correlated (smooth)
    assert np.corrcoef(f[:-1].ravel(), f[1:].ravel())[0, 1] > 0.9
    expected = np.random.default_rng([3, zlib.crc32(b"0001")]).random()
    assert subject_rng(3, "0001").random() == expected


def test_labels_to_image_rejects_bad_input():
    with pytest.raises(ValueError):
        labels_to_image(np.zeros((4, 4), np.int8), np.random.default_rng(0))
    with pytest.raises(ValueError):
        labels_to_image(np.zeros((4, 4, 4), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError):
        labels_to_image(-np.ones((4, 4, 4), np.int8), np.random.default_rng(0))
    # a map without organs still gives a body in air
    img = labels_to_image(np.zeros((20, 20, 20), np.int8), np.random.default_rng(0))
    assert img.min() < -900 and img.max() > -200


def test_real_anatomy(shared_dir):
    path = shared_dir / "data" / "abdomen-ct-labels" / "0001.nii.gz"
    if not path.exists():
        pytest.skip("shared abdomen labels not present")
    lab = load_label_volume(path).array[::2, ::2, ::2]  # 4 mm keeps the test fast
    img = labels_to_image(lab, np.random.default_rng(0), spacing=(4.0, 4.0, 4.0))
    m = _interior_means(img, lab, (1, 2, 3, 4, 6, 7, 8, 10, 11))
    assert min(m[2], m[3], m[8], m[10]) > max(m[6], m[11]) + 20  # enhanced vessels, kidneys
    assert min(m[1], m[6], m[11]) > max(m[4], m[7]) + 20  # parenchyma vs fluid
    assert img[0, 0, :].mean() < -900  # air in the field-of-view corner


# ---------------------------------------------------------------------- CLI


def test_synth_cli_writes_dataset(tmp_path, capsys):
    labels_dir = tmp_path / "labels_in"
    maps = _write_labels(labels_dir, ["0002", "0001"], _affine())
    out = tmp_path / "synth"
    rc = main(["data", "synth", "--labels", str(labels_dir), "--out", str(out), "--seed", "3"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "wrote 2 subject(s)" in captured.out and "0001, 0002" in captured.out
    assert "synth" in captured.err  # tqdm progress bar on stderr
    assert sorted(p.name for p in out.iterdir()) == ["images", "labels", "synth.json"]
    for name, lab in maps.items():
        img = load_nifti(out / "images" / f"{name}.nii.gz")
        lab_out = load_label_volume(out / "labels" / f"{name}.nii.gz")
        assert img.shape == lab.shape
        np.testing.assert_allclose(img.affine, _affine())
        assert lab_out.array.dtype == np.int8
        np.testing.assert_array_equal(lab_out.array, lab)
        np.testing.assert_allclose(lab_out.affine, _affine())
        assert (out / "labels" / f"{name}.nii.gz").read_bytes() == (
            labels_dir / f"{name}.nii.gz"
        ).read_bytes()
        assert nib.load(str(out / "images" / f"{name}.nii.gz")).get_data_dtype() == np.int16
        assert img.array.min() < -900 and img.array.max() > 100
    # images are labels_to_image with the subject's generator, rounded to int16
    expected = labels_to_image(maps["0001"], subject_rng(3, "0001"), spacing=(2.0, 2.0, 2.0))
    got = load_nifti(out / "images" / "0001.nii.gz").array
    np.testing.assert_array_equal(got, np.rint(expected))
    # the same seed reproduces the images
    again = synthesize_dataset(labels_dir, tmp_path / "again", seed=3, progress=False)
    assert [p.name for p, _ in again] == ["0001.nii.gz", "0002.nii.gz"]
    for name in maps:
        a = load_nifti(out / "images" / f"{name}.nii.gz").array
        b = load_nifti(tmp_path / "again" / "images" / f"{name}.nii.gz").array
        np.testing.assert_array_equal(a, b)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs


def test_synth_cli_refuses_non_empty_output(tmp_path, capsys):
    labels_dir = tmp_path / "labels_in"
    _write_labels(labels_dir, ["a", "b"], _affine())
    out = tmp_path / "out"
    argv = ["data", "synth", "--labels", str(labels_dir), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert main([*argv, "--seed", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(out) in err[0]
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before
    # an existing empty folder is fine
    (tmp_path / "empty").mkdir()
    assert main(["data", "synth", "--labels", str(labels_dir), "--out", str(tmp_path / "empty"),
                 "--no-progress"]) == 0  # fmt: skip


def test_synth_cli_missing_or_empty_labels(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["data", "synth", "--labels", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nope" in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["data", "synth", "--labels", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "no *.nii.gz" in capsys.readouterr().err
    assert not out.exists()
    assert main(["data", "synth", "--labels", str(tmp_path)]) == 2  # --out missing
    assert capsys.readouterr().err.startswith("error:")


def test_synth_failure_leaves_nothing_behind(tmp_path):
    labels_dir = tmp_path / "labels_in"
    _write_labels(labels_dir, ["a"], _affine())
    (labels_dir / "b.nii.gz").write_bytes(b"\x1f\x8b broken")
    out = tmp_path / "out"
    # what a run killed earlier left (its process is gone): removed by the next run
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (tmp_path / f".out.{gone}.k1ll3d.tmp" / "images").mkdir(parents=True)
    with pytest.raises(RanregError, match="b.nii.gz"):
        synthesize_dataset(labels_dir, out, progress=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels_in"]
