"""2D slices of 3D subjects (ranreg.data.slices): planes, picks and the arrays cut with them."""

from __future__ import annotations

import numpy as np
import pytest

from ranreg.data.slices import ORIENTATIONS, pick_slices, subject_slices, take_slice


def _volume() -> np.ndarray:
    """Organ area grows along z up to plane 6 and vanishes after plane 9."""
    lab = np.zeros((10, 8, 12), dtype=np.int64)
    for z in range(10):
        lab[: min(z, 6) + 1, 2:6, z] = 1
    return lab


def test_take_slice_cuts_the_plane_that_fixes_the_axis() -> None:
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    np.testing.assert_array_equal(take_slice(vol, 2, 3), vol[:, :, 3])
    np.testing.assert_array_equal(take_slice(vol, 1, 0), vol[:, 0, :])
    assert take_slice(vol, 1, 0).flags.c_contiguous
    with pytest.raises(ValueError, match="outside"):
        take_slice(vol, 2, 6)
    with pytest.raises(ValueError, match="3D"):
        take_slice(vol[0], 0, 0)


def test_picks_spread_over_the_planes_with_most_organ() -> None:
    lab = _volume()
    # areas along z: 4, 8, ..., 28 (planes 0-6), 28 (7-9), 0 (10, 11); half of 28 is 14
    assert pick_slices(lab, 2, 1) == [6]  # the middle of planes 3-9
    assert pick_slices(lab, 2, 3) == [4, 6, 8]
    assert pick_slices(lab, 2, 100) == list(range(3, 10))  # every qualifying plane once
    assert pick_slices(np.zeros_like(lab), 2, 3) == []
    with pytest.raises(ValueError):
        pick_slices(lab, 2, 0)


def test_subject_slices_cut_every_volume_at_the_same_plane() -> None:
    lab = _volume()
    image = np.random.default_rng(0).random(lab.shape).astype(np.float32)
    out = subject_slices("s", {"labels": lab, "image": image}, {"axial": 2, "coronal": 1})
    assert [(s.orientation, s.index) for s in out] == [("axial", 4), ("axial", 8), ("coronal", 4)]
    for s in out:
        axis = ORIENTATIONS[s.orientation]
        np.testing.assert_array_equal(s.arrays["image"], np.take(image, s.index, axis=axis))
        np.testing.assert_array_equal(s.arrays["labels"], np.take(lab, s.index, axis=axis))
    with pytest.raises(ValueError, match="differ in shape"):
        subject_slices("s", {"labels": lab, "image": image[:-1]}, {"axial": 1})
    with pytest.raises(ValueError, match="unknown orientation"):
        subject_slices("s", {"labels": lab}, {"sagittal": 1})
