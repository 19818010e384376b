"""Real scans in training (``data.train_scans``, ``pairs.scans``): fitted to the subjects'
grid, drawn at the configured share, never one of the validation scans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from torch.utils.data import DataLoader

from ranreg.config import parse_config
from ranreg.errors import RanregError
from ranreg.train_data import StepSamples, SubjectData, fit_to_shape, load_train_scans
from tests.helpers import shapes_config, write_nifti


def ct_scan(path: Path) -> Path:
    """A 40^3 CT at 4 mm: air, an off-centre soft-tissue ellipsoid (40 HU), a bone (700)."""
    grid = np.indices((40, 40, 40), dtype=np.float32)
    centre = np.array([14.0, 22.0, 20.0])[:, None, None, None]
    radii = np.array([10.0, 8.0, 14.0])[:, None, None, None]
    hu = np.full((40, 40, 40), -1000.0, dtype=np.float32)
    hu[(((grid - centre) / radii) ** 2).sum(axis=0) <= 1] = 40.0
    hu[12:16, 20:24, 18:22] = 700.0
    return write_nifti(path, hu, np.diag([4.0, 4.0, 4.0, 1.0]))


def config_3d(scan: Path, share: float, val_scans: list[str] | None = None) -> dict:
    raw = shapes_config(steps=(4, 0), size=(16, 16, 16))
    raw["model"]["ndim"] = 3
    raw["data"]["train_scans"] = [str(scan)]
    if val_scans:
        raw["data"]["val_scans"] = val_scans
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0]["pairs"] = {"scans": share, "styles": {"image": 1.0}, "noise": 0.01}
    return raw


def subjects(count: int = 3) -> list[SubjectData]:
    rng = np.random.default_rng(3)
    return [
        SubjectData(f"s{i}", rng.random((16, 16, 16), dtype=np.float32), None, (8.0, 8.0, 8.0))
        for i in range(count)
    ]


def test_fit_to_shape_centres_the_body_and_keeps_its_values() -> None:
    image = np.zeros((30, 20, 12), dtype=np.float32)
    image[2:8, 3:9, 1:5] = 0.7  # body in a corner, centre (4.5, 5.5, 2.5)
    out = fit_to_shape(image, (10, 16, 20))  # crops x, pads z
    assert out.shape == (10, 16, 20)
    np.testing.assert_allclose(ndimage.center_of_mass(out > 0.05), (4.5, 7.5, 9.5), atol=0.5)
    assert out.sum() == pytest.approx(image.sum())  # the body fits: nothing lost, nothing added
    assert set(np.unique(out)) == {0.0, np.float32(0.7)}


def test_train_scans_are_windowed_and_fitted_to_the_subjects_grid(tmp_path: Path) -> None:
    cfg = parse_config(config_3d(ct_scan(tmp_path / "ct.nii.gz"), 1.0))
    (scan,) = load_train_scans(cfg, subjects()[0])
    assert scan.image.shape == (16, 16, 16) and scan.label is None
    assert scan.spacing == (8.0, 8.0, 8.0)
    # the training window [-100, 300]: air 0, soft tissue 0.35, bone clipped to 1
    assert scan.image.min() == 0.0 and scan.image.max() == pytest.approx(1.0)
    assert np.median(scan.image[scan.image > 0.05]) == pytest.approx(0.35, abs=0.02)
    # the ellipsoid (20 x 16 x 28 voxels at 4 mm: 10 x 8 x 14 at 8 mm) sits in the centre
    np.testing.assert_allclose(ndimage.center_of_mass(scan.image > 0.05), (7.5,) * 3, atol=0.6)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_the_scan_share_picks_scans_and_a_zero_share_keeps_the_random_streams(
    tmp_path: Path, share: float
) -> None:
    cfg = parse_config(config_3d(ct_scan(tmp_path / "ct.nii.gz"), share))
    subs = subjects()
    scans = load_train_scans(cfg, subs[0])
    with_scans = StepSamples(cfg, 0, subs, rank=0, scans=scans)
    without = StepSamples(cfg, 0, subs, rank=0)
    for index in range(6):
        a, b = with_scans[index], without[index]
        moving = a["moving"][0].numpy()
        if share == 0.0:
            for key in a:
                np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
        else:
            # the scan under noise (sd 0.01; augment is off, so no axis permutation or
            # flip), far from every subject
            assert np.abs(moving - scans[0].image).mean() < 0.02
            assert all(np.abs(moving - s.image).mean() > 0.2 for s in subs)


def test_scan_options_are_checked(tmp_path: Path) -> None:
    scan = ct_scan(tmp_path / "ct.nii.gz")
    raw = config_3d(scan, 0.5)
    del raw["data"]["train_scans"]
    with pytest.raises(RanregError, match="pairs.scans: needs data.train_scans"):
        parse_config(raw)
    with pytest.raises(RanregError, match="also in val_scans"):
        parse_config(config_3d(scan, 0.5, val_scans=[str(scan)]))
    with pytest.raises(RanregError, match="file not found"):
        parse_config(config_3d(tmp_path / "missing.nii.gz", 0.5))
    with pytest.raises(RanregError, match=r"pairs.scans.*share in \[0, 1\]"):
        parse_config(config_3d(scan, 1.5))


def test_scans_batch_with_labelled_subjects(tmp_path: Path) -> None:
    """A scan has no labels; in a batch with labelled subjects it gets empty maps."""
    cfg = parse_config(config_3d(ct_scan(tmp_path / "ct.nii.gz"), 0.5))
    subs = subjects(4)
    for i, s in enumerate(subs):
        s.label = np.zeros((16, 16, 16), dtype=np.int64)
        s.label[4:12, 4:12, 2 + i : 10 + i] = 1
        s.tissues = s.label
    samples = StepSamples(cfg, 0, subs, rank=0, scans=load_train_scans(cfg, subs[0]))
    kinds = set()
    for batch in DataLoader(samples, batch_size=2):
        for moving, label in zip(batch["moving"], batch["moving_label"], strict=True):
            from_scan = np.abs(moving[0].numpy() - samples.scans[0].image).mean() < 0.02
            kinds.add(from_scan)
            assert (label.sum() == 0) == from_scan
    assert kinds == {True, False}
