"""NIfTI I/O, preprocessing, dataset discovery, pairing and the pair dataset."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ranreg.data import (
    ABDOMEN_ORGANS,
    PairDataset,
    Subject,
    crop_arrays,
    crop_offsets,
    discover_splits,
    discover_subjects,
    largest_component,
    load_label,
    load_label_volume,
    load_nifti,
    load_subject,
    network_intensity,
    ordered_pairs,
    preprocess_pair,
    preprocess_subject,
    resample,
    save_nifti,
    select_labels,
    split_subjects,
    window_normalize,
)
from ranreg.errors import RanregError


def _affine() -> np.ndarray:
    """Rotation about z by 30 degrees, anisotropic voxels, translation and an x flip."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-1.5, 2.0, 2.5])
    aff[:3, 3] = [10.0, -20.5, 33.0]
    return aff


def _write(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _labels(shape=(16, 12, 20), seed=0) -> np.ndarray:
    """Blocky label map with a few organs (values 1..13)."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, dtype=np.int8)
    for value in (1, 2, 4, 6, 8, 11):
        lo = [int(rng.integers(0, n - 3)) for n in shape]
        lab[lo[0] : lo[0] + 4, lo[1] : lo[1] + 4, lo[2] : lo[2] + 4] = value
    return lab


def _subject_files(folder: Path, names, shape=(16, 12, 20), labels=True, seed=0):
    rng = np.random.default_rng(seed)
    for k, name in enumerate(names):
        img = rng.uniform(-300, 500, size=shape).astype(np.float32)
        _write(folder / "images" / f"{name}.nii.gz", img)
        if labels:
            _write(folder / "labels" / f"{name}.nii.gz", _labels(shape, seed + k))


# ---------------------------------------------------------------------------- io


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_save_load_round_trip_keeps_affine_and_values(tmp_path, ext):
    aff = _affine()
    arr = np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32)
    path = save_nifti(tmp_path / f"img{ext}", arr, aff)
    vol = load_nifti(path)
    assert vol.array.dtype == np.float32 and vol.shape == (5, 6, 7)
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-4)
    np.testing.assert_allclose(vol.spacing, (1.5, 2.0, 2.5), atol=1e-5)
    assert vol.path == path
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"img{ext}"]  # no temp file left


def test_save_overwrites_atomically_and_labels_keep_dtype(tmp_path):
    path = tmp_path / "sub" / "lab.nii.gz"
    save_nifti(path, np.zeros((3, 3, 3), np.int8), np.eye(4))
    lab = _labels((6, 5, 5))
    save_nifti(path, lab, _affine())
    vol = load_label_volume(path)
    assert vol.array.dtype == np.int8
    np.testing.assert_array_equal(vol.array, lab)
    np.testing.assert_allclose(vol.affine, _affine(), atol=1e-4)
    # int64 and bool arrays are stored as int32 / uint8
    save_nifti(tmp_path / "i64.nii.gz", lab.astype(np.int64), np.eye(4))
    assert load_label(tmp_path / "i64.nii.gz").dtype == np.int32
    assert [p.name for p in path.parent.iterdir()] == ["lab.nii.gz"]


def test_missing_file(tmp_path):
    with pytest.raises(RanregError, match="nope.nii.gz.*not found"):
        load_nifti(tmp_path / "nope.nii.gz")
    with pytest.raises(RanregError, match="nope.nii.gz"):
        load_label(tmp_path / "nope.nii.gz")


def test_truncated_and_garbage_files(tmp_path):
    good = _write(tmp_path / "good.nii.gz", np.ones((20, 20, 20), np.float32))
    data = good.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(RanregError, match="truncated.nii.gz"):
        load_nifti(bad)
    # header intact but voxel data cut short (uncompressed)
    raw = tmp_path / "short.nii"
    raw.write_bytes(gzip.decompress(data)[:1000])
    with pytest.raises(RanregError, match="short.nii"):
        load_nifti(raw)
    junk = tmp_path / "junk.nii.gz"
    junk.write_text("this is not an image")
    with pytest.raises(RanregError, match="junk.nii.gz"):
        load_nifti(junk)
    with pytest.raises(RanregError, match="directory"):
        load_nifti(tmp_path)


def test_not_nifti_format(tmp_path):
    path = tmp_path / "vol.mgz"
    nib.save(nib.MGHImage(np.ones((4, 4, 4), np.float32), np.eye(4)), str(path))
    with pytest.raises(RanregError, match=r"vol.mgz.*not a NIfTI"):
        load_nifti(path)


def test_dimensions(tmp_path):
    four = _write(tmp_path / "four.nii.gz", np.ones((4, 5, 6, 3), np.float32))
    with pytest.raises(RanregError, match=r"four.nii.gz.*3D"):
        load_nifti(four)
    two = _write(tmp_path / "two.nii.gz", np.ones((4, 5), np.float32))
    with pytest.raises(RanregError, match=r"two.nii.gz.*3D"):
        load_nifti(two)
    single = _write(tmp_path / "single.nii.gz", np.ones((4, 5, 6, 1), np.float32))
    assert load_nifti(single).shape == (4, 5, 6)
    assert load_label(single).shape == (4, 5, 6)


def test_nan_voxels(tmp_path):
    arr = np.zeros((4, 4, 4), np.float32)
    arr[1, 2, 3] = np.nan
    arr[0, 0, 0] = np.inf
    path = _write(tmp_path / "nan.nii.gz", arr)
    with pytest.raises(RanregError, match=r"nan.nii.gz: 2 voxel"):
        load_nifti(path)
    assert np.isnan(load_nifti(path, check_finite=False).array[1, 2, 3])
    with pytest.raises(RanregError, match="nan.nii.gz"):
        load_label(path)


def test_label_checks(tmp_path):
    frac = _write(tmp_path / "frac.nii.gz", np.full((3, 3, 3), 1.5, np.float32))
    with pytest.raises(RanregError, match=r"frac.nii.gz.*non-integer"):
        load_label(frac)
    whole = _write(tmp_path / "whole.nii.gz", np.full((3, 3, 3), 2.0, np.float32))
    lab = load_label(whole)
    assert lab.dtype.kind == "i" and np.all(lab == 2)
    neg = _write(tmp_path / "neg.nii.gz", np.full((3, 3, 3), -1, np.int16))
    with pytest.raises(RanregError, match=r"neg.nii.gz.*negative"):
        load_label(neg)


def test_one_hot_labels_are_converted(tmp_path):
    lab = _labels((6, 5, 7))
    onehot = np.stack([(lab == k) for k in range(1, 14)], axis=-1).astype(np.uint8)
    path = _write(tmp_path / "onehot.nii.gz", onehot)
    np.testing.assert_array_equal(load_label(path), lab)
    with pytest.raises(RanregError, match="onehot.nii.gz"):
        load_nifti(path)  # images must be 3D


# -------------------------------------------------------------------- preprocess


def test_window_normalize_values():
    hu = np.array([-1000.0, -100.0, 0.0, 100.0, 300.0, 2000.0])
    out = window_normalize(hu)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.25, 0.5, 1.0, 1.0], atol=1e-7)
    np.testing.assert_allclose(window_normalize(hu, -1000, 1000), [0, 0.45, 0.5, 0.55, 0.65, 1])
    with pytest.raises(ValueError):
        window_normalize(hu, 10, 10)


def test_network_intensity_rule_numpy_and_torch():

    ct = np.array([-1000.0, -100.0, 100.0, 300.0, 2000.0], dtype=np.float32)
    mr = np.array([0.0, 250.0, 500.0, 1000.0], dtype=np.float32)
    for wrap in (np.asarray, torch.from_numpy):
        as_np = lambda t: np.asarray(t, dtype=np.float64)  # noqa: E731
        # CT through the window with or without ct_only
        for ct_only in (True, False):
            got = network_intensity(wrap(ct), (-100, 300), ct_only)
            np.testing.assert_allclose(as_np(got), [0, 0, 0.5, 1, 1], atol=1e-7)
        # an MR: min-max when the window is for CT only, clipped by the window otherwise
        np.testing.assert_allclose(
            as_np(network_intensity(wrap(mr), (-100, 300), True)), [0, 0.25, 0.5, 1], atol=1e-7
        )
        np.testing.assert_allclose(
            as_np(network_intensity(wrap(mr), (-100, 300), False)), [0.25, 0.875, 1, 1], atol=1e-7
        )
        np.testing.assert_allclose(
            as_np(network_intensity(wrap(mr), None, False)), [0, 0.25, 0.5, 1], atol=1e-7
        )
        # the raw minimum decides CT when the array is a crop that misses the air
        crop = wrap(ct[1:4].copy())
        np.testing.assert_allclose(
            as_np(network_intensity(crop, (-100, 300), True, -1000.0)), [0, 0.5, 1], atol=1e-7
        )
        np.testing.assert_allclose(
            as_np(network_intensity(crop, (-100, 300), True)), [0, 0.5, 1], atol=1e-7
        )  # min-max of [-100, 300]: same
        assert not as_np(network_intensity(wrap(np.full(3, 7.0)), None, False)).any()


def test_resample_shape_affine_and_values():
    aff = _affine()
    shape = (20, 16, 24)
    idx = np.indices(shape).reshape(3, -1)
    world = (aff[:3, :3] @ idx + aff[:3, 3:]).reshape(3, *shape)
    image = world[0].astype(np.float32)  # linear in world x: resampled exactly
    out = resample(image, 0.5, order=1, affine=aff)
    assert out.array.shape == (10, 8, 12) and out.array.dtype == np.float32
    np.testing.assert_allclose(out.spacing, (3.0, 4.0, 5.0))
    new_idx = np.indices(out.array.shape).reshape(3, -1)
    new_world = (out.affine[:3, :3] @ new_idx + out.affine[:3, 3:]).reshape(3, *out.array.shape)
    np.testing.assert_allclose(out.array, new_world[0], atol=1e-3)
    # identity affine by default; per-axis factors
    out2 = resample(image, (0.5, 1.0, 0.25))
    assert out2.array.shape == (10, 16, 6)
    np.testing.assert_allclose(out2.spacing, (2.0, 1.0, 4.0))


def test_resample_labels_nearest_keeps_values_and_dtype():
    lab = _labels((20, 16, 24))
    out = resample(lab, 0.5, order=0).array
    assert out.shape == (10, 8, 12) and out.dtype == np.int8
    assert set(np.unique(out)) <= set(np.unique(lab))
    assert resample(lab, 1.0, order=0).array.dtype == np.int8


def test_select_labels_keeps_original_values():
    lab = np.arange(14, dtype=np.int8).reshape(1, 2, 7)
    out = select_labels(lab)
    assert out.dtype == np.int8
    expected = [v if v in ABDOMEN_ORGANS else 0 for v in range(14)]
    np.testing.assert_array_equal(out.ravel(), expected)
    np.testing.assert_array_equal(select_labels(lab, keep=None), lab)
    np.testing.assert_array_equal(
        select_labels(lab, keep=(4,)).ravel(), [4 * (v == 4) for v in range(14)]
    )


def test_largest_component_keeps_the_biggest_6_connected_blob():
    mask = np.zeros((6, 6, 6), dtype=bool)
    mask[0:2, 0:2, 0:2] = True  # 8 voxels
    mask[3:6, 3:6, 3:5] = True  # 18 voxels
    mask[2, 2, 2] = True  # touches the first blob only at corners: its own component
    body = largest_component(mask)
    assert body.sum() == 18 and body[3:6, 3:6, 3:5].all()
    assert not largest_component(np.zeros((3, 3), dtype=bool)).any()


def test_preprocess_subject_and_pair():
    rng = np.random.default_rng(0)
    img = rng.uniform(-500, 600, size=(16, 12, 20)).astype(np.float32)
    lab = _labels((16, 12, 20))
    out, out_lab = preprocess_subject(img, lab)
    assert out.shape == out_lab.shape == (8, 6, 10)
    assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0
    assert set(np.unique(out_lab)) <= {0, *ABDOMEN_ORGANS}
    assert 4 not in out_lab
    pair = preprocess_pair(img, img, lab, None, factor=None)
    assert pair["moving"].shape == (16, 12, 20) and pair["fixed_label"] is None
    with pytest.raises(RanregError, match="differs"):
        preprocess_subject(img, lab[:-1])


# ---------------------------------------------------------------------- datasets


def test_discover_deepreg_split_layout(tmp_path):
    _subject_files(tmp_path / "train", ["b", "a", "c"])
    _subject_files(tmp_path / "test", ["x", "y"], labels=False)
    (tmp_path / "train" / "images" / "notes.txt").write_text("ignored")
    train = discover_subjects(tmp_path, "train")
    assert [s.name for s in train] == ["a", "b", "c"]
    assert all(s.label == tmp_path / "train" / "labels" / f"{s.name}.nii.gz" for s in train)
    test = discover_subjects(tmp_path, "test")
    assert [s.label for s in test] == [None, None]
    with pytest.raises(RanregError, match="choose a split"):
        discover_subjects(tmp_path)
    with pytest.raises(RanregError, match="val"):
        discover_subjects(tmp_path, "val")
    assert list(discover_splits(tmp_path)) == ["train", "test"]


def test_discover_direct_layout_and_missing_label(tmp_path):
    _subject_files(tmp_path, ["s1", "s2"])
    assert [s.name for s in discover_subjects(tmp_path)] == ["s1", "s2"]
    with pytest.raises(RanregError, match="no 'train' split"):
        discover_subjects(tmp_path, "train")
    with pytest.raises(RanregError, match="unknown split"):
        discover_subjects(tmp_path, "training")
    _write(tmp_path / "images" / "s3.nii.gz", np.zeros((16, 12, 20), np.float32))
    with pytest.raises(RanregError, match=r"s3.nii.gz: no label file"):
        discover_subjects(tmp_path)
    with pytest.raises(RanregError, match="no dataset found"):
        discover_subjects(tmp_path / "labels")
    with pytest.raises(RanregError, match="not found"):
        discover_subjects(tmp_path / "missing")


def test_discover_learn2reg_layout(tmp_path):
    shape = (8, 6, 10)
    for name in ("AbdomenCTCT_0002", "AbdomenCTCT_0001"):
        _write(tmp_path / "imagesTr" / f"{name}_0000.nii.gz", np.zeros(shape, np.float32))
        _write(tmp_path / "labelsTr" / f"{name}_0000.nii.gz", np.zeros(shape, np.int8))
    _write(tmp_path / "imagesTs" / "AbdomenCTCT_0031_0000.nii.gz", np.zeros(shape, np.float32))
    (tmp_path / "AbdomenCTCT_dataset.json").write_text("{}")
    subjects = discover_subjects(tmp_path)
    assert [s.name for s in subjects] == ["AbdomenCTCT_0001", "AbdomenCTCT_0002"]
    assert subjects[0].label.name == "AbdomenCTCT_0001_0000.nii.gz"
    test = discover_subjects(tmp_path, "test")
    assert [(s.name, s.label) for s in test] == [("AbdomenCTCT_0031", None)]
    (tmp_path / "labelsTr" / "AbdomenCTCT_0002_0000.nii.gz").unlink()
    with pytest.raises(RanregError, match="AbdomenCTCT_0002_0000.nii.gz: no label"):
        discover_subjects(tmp_path)


def test_shape_mismatch_names_both_files(tmp_path):
    _subject_files(tmp_path, ["a", "b"])
    _write(tmp_path / "labels" / "b.nii.gz", np.zeros((16, 12, 19), np.int8))
    subjects = discover_subjects(tmp_path)
    with pytest.raises(RanregError, match=r"images/b.nii.gz.*labels/b.nii.gz"):
        load_subject(subjects[1])
    ds = PairDataset(subjects)
    with pytest.raises(RanregError, match=r"images/b.nii.gz.*labels/b.nii.gz"):
        ds[0]


def test_ordered_pairs():
    items = ["a", "b", "c", "d"]
    pairs = ordered_pairs(items)
    assert len(pairs) == 4 * 3 and len(set(pairs)) == 12
    assert all(m != f for m, f in pairs)
    assert ("a", "b") in pairs and ("b", "a") in pairs
    assert ordered_pairs(["a"]) == []
    assert len(ordered_pairs(range(30))) == 870


def test_split_subjects_file_order():
    parts = split_subjects(list(range(30)))
    assert [len(parts[k]) for k in ("train", "val", "test")] == [23, 3, 4]
    assert parts["test"] == [26, 27, 28, 29]
    assert [len(v) for v in split_subjects(list(range(20))).values()] == [15, 2, 3]


def test_pair_dataset_items(tmp_path):
    _subject_files(tmp_path, ["a", "b", "c"])
    ds = PairDataset(discover_subjects(tmp_path))
    assert len(ds) == 6
    item = ds[0]
    assert set(item) == {"moving", "fixed", "moving_label", "fixed_label"}
    assert item["moving"].shape == item["moving_label"].shape == (1, 8, 6, 10)
    assert item["moving"].dtype == torch.float32 and item["fixed_label"].dtype == torch.int64
    assert 0.0 <= float(item["fixed"].min()) and float(item["fixed"].max()) <= 1.0
    assert set(torch.unique(item["moving_label"]).tolist()) <= {0, *ABDOMEN_ORGANS}
    assert ds.pair_names(0) == ("a", "b") and ds.pair_names(5) == ("c", "b")
    assert not torch.equal(item["moving"], item["fixed"])
    item["moving"].fill_(7.0)  # items are copies, the cache stays intact
    assert float(ds[0]["moving"].max()) <= 1.0
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["moving"].shape == (2, 1, 8, 6, 10)


def test_pair_dataset_without_labels(tmp_path):
    _subject_files(tmp_path, ["a", "b"], labels=False)
    ds = PairDataset(discover_subjects(tmp_path), factor=None)
    assert set(ds[1]) == {"moving", "fixed"} and ds[1]["moving"].shape == (1, 16, 12, 20)
    with pytest.raises(RanregError, match="at least 2"):
        PairDataset(discover_subjects(tmp_path)[:1])


def test_crop_offsets_and_arrays():
    shape, margin = (20, 16, 24), (3, 2, 4)
    slices, offsets = crop_offsets(shape, margin, None)
    assert offsets == margin  # centred
    seen = set()
    for k in range(200):
        rng = np.random.default_rng(k)
        slices, offsets = crop_offsets(shape, margin, rng)
        assert all(0 <= o <= 2 * m for o, m in zip(offsets, margin, strict=True))
        assert [s.stop - s.start for s in slices] == [14, 12, 16]
        seen.add(offsets)
    assert len(seen) > 50
    a = np.arange(np.prod(shape)).reshape(shape)
    out = crop_arrays([a, a.copy(), None], margin, np.random.default_rng(3))
    np.testing.assert_array_equal(out[0], out[1])
    assert out[2] is None and out[0].shape == (14, 12, 16)
    with pytest.raises(RanregError, match="too large"):
        crop_offsets((10, 10, 10), (5, 1, 1), None)


def test_random_crop_deterministic_and_same_for_pair(tmp_path):
    # subjects a and b are identical files, so a crop applied equally leaves moving == fixed
    _subject_files(tmp_path, ["a"])
    for sub in ("images", "labels"):
        (tmp_path / sub / "b.nii.gz").write_bytes((tmp_path / sub / "a.nii.gz").read_bytes())
    subjects = discover_subjects(tmp_path)
    margin = (2, 1, 2)
    ds = PairDataset(subjects, factor=None, crop_margin=margin, seed=7)
    full = PairDataset(subjects, factor=None)[0]["moving"][0].numpy()
    crops = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["moving"].shape == (1, 12, 10, 16)
        assert torch.equal(item["moving"], item["fixed"])
        assert torch.equal(item["moving_label"], item["fixed_label"])
        # locate the crop in the full image
        m = item["moving"][0].numpy()
        hits = [
            (i, j, k)
            for i in range(5)
            for j in range(3)
            for k in range(5)
            if np.array_equal(full[i : i + 12, j : j + 10, k : k + 16], m)
        ]
        assert len(hits) == 1
        crops.append(hits[0])
    assert len(set(crops)) > 1  # epochs change the crop
    # same seed and epoch -> same crop, in a fresh dataset and in any order of access
    again = PairDataset(subjects, factor=None, crop_margin=margin, seed=7)
    again.set_epoch(5)
    again[1]
    assert torch.equal(again[0]["moving"], ds[0]["moving"])
    # an explicit generator gives a reproducible sequence
    g1 = PairDataset(subjects, factor=None, crop_margin=margin, rng=np.random.default_rng(3))
    g2 = PairDataset(subjects, factor=None, crop_margin=margin, rng=np.random.default_rng(3))
    for _ in range(3):
        assert torch.equal(g1[0]["moving"], g2[0]["moving"])
    # centred crop for evaluation
    centred = PairDataset(subjects, factor=None, crop_margin=margin, random_crop=False)[0]
    np.testing.assert_array_equal(centred["moving"][0].numpy(), full[2:14, 1:11, 2:18])


def test_subject_dataclass_is_plain():
    s = Subject("x", Path("/i.nii.gz"))
    assert s.label is None and s.name == "x"


def test_real_label_file_loads(shared_dir):
    path = shared_dir / "data" / "abdomen-ct-labels" / "0001.nii.gz"
    if not path.exists():
        pytest.skip("shared abdomen labels not present")
    vol = load_label_volume(path)
    assert vol.shape == (192, 160, 256) and vol.array.dtype == np.int8
    assert vol.spacing == (2.0, 2.0, 2.0)
    assert set(np.unique(vol.array)) == set(range(14))
    lab = resample(vol.array, 0.5, order=0, affine=vol.affine)
    assert lab.array.shape == (96, 80, 128) and lab.spacing == (4.0, 4.0, 4.0)
