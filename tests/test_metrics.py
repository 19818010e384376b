"""Tests for ranreg.metrics: Dice, surface distances, Jacobian statistics, evaluate_pair."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from ranreg.metrics import (
    ORGAN_NAMES,
    PAPER_ORGANS,
    dice,
    evaluate_pair,
    jacobian_stats,
    surface_distances,
)

# ----------------------------------------------------------------------------- helpers


def _box(shape: tuple[int, ...], lo: tuple[int, ...], hi: tuple[int, ...], value: int = 1):
    """Label map with ``value`` in the half-open box ``[lo, hi)``."""
    out = np.zeros(shape, dtype=np.int64)
    out[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = value
    return out


def _ball(shape: tuple[int, ...], radius: float, spacing: tuple[float, ...]) -> np.ndarray:
    """Voxels whose centre lies within ``radius`` (physical units) of the grid centre."""
    grid = np.indices(shape).astype(np.float64)
    d2 = sum(
        ((grid[i] - (n - 1) / 2) * s) ** 2
        for i, (n, s) in enumerate(zip(shape, spacing, strict=True))
    )
    return (d2 <= radius**2).astype(np.int32)


def _surface_coords(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Physical coordinates of the inner boundary voxels (a face neighbour is background,
    outside the image counting as background), written independently of MONAI."""
    padded = np.pad(mask, 1)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    all_in = np.ones_like(mask, dtype=bool)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            all_in &= np.roll(padded, step, axis=axis)[inner].astype(bool)
    return np.argwhere(mask.astype(bool) & ~all_in) * np.asarray(spacing)


def _brute_force(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    """ASD (pooled mean) and HD95 (max of directed 95th percentiles) by pairwise distances."""
    pa, pb = _surface_coords(a, spacing), _surface_coords(b, spacing)
    dist = np.linalg.norm(pa[:, None, :] - pb[None, :, :], axis=-1)
    a_to_b, b_to_a = dist.min(axis=1), dist.min(axis=0)
    asd = np.concatenate([a_to_b, b_to_a]).mean()
    hd95 = max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))
    return float(asd), float(hd95)


# ----------------------------------------------------------------------------- constants


def test_organ_tables() -> None:
    assert sorted(ORGAN_NAMES) == list(range(1, 14))
    assert ORGAN_NAMES[1] == "spleen"
    assert ORGAN_NAMES[9] == "inferior vena cava"
    assert ORGAN_NAMES[13] == "left adrenal gland"
    assert PAPER_ORGANS == (1, 2, 3, 5, 6, 8, 9, 10, 11)
    assert set(PAPER_ORGANS) <= set(ORGAN_NAMES)


# ----------------------------------------------------------------------------- dice


def test_dice_overlapping_boxes_2d_by_hand() -> None:
    # A = rows 2..9 x cols 3..11 (8 x 9 = 72 px), B = rows 5..13 x cols 6..8 (9 x 3 = 27 px);
    # A ∩ B = rows 5..9 x cols 6..8 = 5 x 3 = 15 px.
    a = _box((16, 16), (2, 3), (10, 12))
    b = _box((16, 16), (5, 6), (14, 9))
    expected = 2 * 15 / (72 + 27)
    assert dice(a, b, [1])[1] == pytest.approx(expected, abs=1e-12)
    # symmetric, and torch / batched (1, 1, *S) inputs give the same number
    assert dice(b, a, [1])[1] == pytest.approx(expected, abs=1e-12)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    assert dice(ta, tb, [1])[1] == pytest.approx(expected, abs=1e-12)
    assert dice(ta[None, None], tb[None, None], [1])[1] == pytest.approx(expected, abs=1e-12)


def test_dice_overlapping_boxes_3d_multi_label_by_hand() -> None:
    shape = (12, 12, 12)
    # label 1: 4x4x4 = 64 vs 4x4x4 shifted by 2 along axis 0 -> overlap 2x4x4 = 32
    a = _box(shape, (0, 0, 0), (4, 4, 4), 1)
    b = _box(shape, (2, 0, 0), (6, 4, 4), 1)
    # label 3: 2x3x5 = 30 vs 2x3x5 disjoint from it
    a += _box(shape, (8, 8, 0), (10, 11, 5), 3)
    b += _box(shape, (8, 8, 6), (10, 11, 11), 3)
    scores = dice(a, b, [1, 3])
    assert list(scores) == [1, 3]
    assert scores[1] == pytest.approx(2 * 32 / (64 + 64))
    assert scores[3] == 0.0


def test_dice_missing_label() -> None:
    a = _box((8, 8), (1, 1), (4, 4), 2)
    b = np.zeros((8, 8), dtype=np.int64)
    scores = dice(a, b, [2, 5])
    assert scores[2] == 0.0  # present in one map only
    assert math.isnan(scores[5])  # absent from both


def test_dice_rejects_bad_inputs() -> None:
    a = np.zeros((8, 8), dtype=np.int64)
    with pytest.raises(ValueError, match="same spatial shape"):
        dice(a, np.zeros((8, 9), dtype=np.int64), [1])
    with pytest.raises(ValueError, match="integer dtype"):
        dice(a.astype(np.float32), a, [1])
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 1, 8, 8), dtype=np.int64), np.zeros((2, 1, 8, 8), dtype=np.int64), [1])


# ----------------------------------------------------------------------------- surface distances


@pytest.mark.parametrize("shape", [(24, 20), (14, 16, 12)])
def test_identical_maps_are_perfect(shape: tuple[int, ...]) -> None:
    lo = tuple(2 for _ in shape)
    hi = tuple(n // 2 for n in shape)
    labels = _box(shape, lo, hi, 1) + _box(shape, hi, tuple(n - 1 for n in shape), 4)
    spacing = tuple(0.7 + 0.4 * i for i in range(len(shape)))
    result = evaluate_pair(labels, labels.copy(), [1, 4], spacing)
    for lab in (1, 4):
        assert result["labels"][lab] == {"dice": 1.0, "asd": 0.0, "hd95": 0.0}
    assert result["mean_dice"] == 1.0
    assert result["mean_asd"] == 0.0
    assert result["mean_hd95"] == 0.0


@pytest.mark.parametrize(
    ("shape", "spacing", "r1", "r2"),
    [
        ((64, 64), (1.0, 1.0), 10.0, 16.0),
        ((64, 64), (1.5, 1.5), 9.0, 27.0),  # radii in mm
        ((40, 40, 40), (1.0, 1.0, 1.0), 8.0, 13.0),
        ((40, 40, 40), (0.8, 0.8, 0.8), 6.0, 12.0),
        ((40, 120), (2.0, 0.5), 10.0, 16.0),  # anisotropic: a physical disc, not a voxel disc
        ((30, 50, 90), (2.0, 1.0, 0.5), 8.0, 14.0),
    ],
)
def test_concentric_balls(
    shape: tuple[int, ...], spacing: tuple[float, ...], r1: float, r2: float
) -> None:
    inner = _ball(shape, r1, spacing)
    outer = _ball(shape, r2, spacing)
    voxel = max(spacing)
    for pred, ref in ((inner, outer), (outer, inner)):
        result = surface_distances(pred, ref, [1], spacing)[1]
        # Digitised surfaces sit within one voxel of the continuous circles/spheres.
        assert abs(result["asd"] - (r2 - r1)) <= voxel, result
        assert abs(result["hd95"] - (r2 - r1)) <= voxel, result
        assert result["asd"] <= result["hd95"] + 1e-6


@pytest.mark.parametrize("axis", [0, 1])
def test_anisotropic_shift_2d_uses_the_shifted_axis_spacing(axis: int) -> None:
    spacing = (2.0, 0.5)
    k = 3
    lo, hi = [6, 6], [26, 30]
    a = _box((36, 40), tuple(lo), tuple(hi))
    lo[axis] += k
    hi[axis] += k
    b = _box((36, 40), tuple(lo), tuple(hi))
    result = surface_distances(a, b, [1], spacing)[1]
    # Every surface point moves by at most k voxels along `axis`, and the whole faces
    # perpendicular to `axis` (> 5 % of the surface) move by exactly that much.
    assert result["hd95"] == pytest.approx(k * spacing[axis], abs=1e-5)
    assert result["hd95"] != pytest.approx(k * spacing[1 - axis], abs=0.1)
    assert 0 < result["asd"] < result["hd95"]
    # Swapping the spacing swaps the answer: the shift is measured with its own axis' spacing.
    swapped = surface_distances(a, b, [1], spacing[::-1])[1]
    assert swapped["hd95"] == pytest.approx(k * spacing[1 - axis], abs=1e-5)


def test_anisotropic_shift_3d() -> None:
    spacing = (1.0, 2.5, 0.6)
    k = 2
    a = _box((20, 24, 28), (4, 4, 4), (14, 14, 18))
    b = _box((20, 24, 28), (4, 4 + k, 4), (14, 14 + k, 18))  # shifted along axis 1
    result = surface_distances(a, b, [1], spacing)[1]
    assert result["hd95"] == pytest.approx(k * 2.5, abs=1e-5)
    assert 0 < result["asd"] < result["hd95"]


@pytest.mark.parametrize(
    ("shape", "spacing"), [((18, 22), (1.3, 0.7)), ((10, 12, 14), (2.0, 1.0, 0.5))]
)
def test_surface_distances_match_brute_force_definition(
    shape: tuple[int, ...], spacing: tuple[float, ...]
) -> None:
    # Smoothed random blobs, touching the image border on purpose.
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    noise_a = gaussian_filter(rng.standard_normal(shape), 2.0)
    noise_b = gaussian_filter(rng.standard_normal(shape), 2.0)
    a = (noise_a > 0).astype(np.int64)
    b = (noise_b > 0).astype(np.int64)
    assert a.any() and b.any() and (a != b).any()
    result = surface_distances(a, b, [1], spacing)[1]
    asd, hd95 = _brute_force(a, b, spacing)
    assert result["asd"] == pytest.approx(asd, rel=1e-5)
    assert result["hd95"] == pytest.approx(hd95, rel=1e-5)


def test_surface_distances_missing_label_is_nan_without_warnings() -> None:
    a = _box((16, 16), (2, 2), (8, 8), 1)
    b = _box((16, 16), (3, 3), (9, 9), 1) + _box((16, 16), (10, 10), (14, 14), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = surface_distances(a, b, [1, 2, 7], 1.0)
    assert math.isfinite(result[1]["asd"]) and math.isfinite(result[1]["hd95"])
    for lab in (2, 7):  # 2: only in one map; 7: in neither
        assert math.isnan(result[lab]["asd"])
        assert math.isnan(result[lab]["hd95"])


def test_surface_distances_isotropic_scalar_spacing_scales() -> None:
    a = _box((20, 20), (3, 3), (12, 12))
    b = _box((20, 20), (5, 4), (15, 12))
    one = surface_distances(a, b, [1], 1.0)[1]
    scaled = surface_distances(torch.from_numpy(a), torch.from_numpy(b), [1], 1.75)[1]
    assert scaled["asd"] == pytest.approx(1.75 * one["asd"], rel=1e-5)
    assert scaled["hd95"] == pytest.approx(1.75 * one["hd95"], rel=1e-5)


def test_surface_distances_rejects_bad_spacing() -> None:
    a = _box((8, 8), (1, 1), (4, 4))
    with pytest.raises(ValueError, match="spacing"):
        surface_distances(a, a, [1], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        surface_distances(a, a, [1], (1.0, 0.0))


# ----------------------------------------------------------------------------- Jacobian


def _affine_ddf(matrix: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """DDF ``(1, d, *S)`` of ``x -> A x`` (about the grid centre), in voxels."""
    grid = np.indices(shape).astype(np.float64)
    centre = np.array([(n - 1) / 2 for n in shape]).reshape(-1, *([1] * len(shape)))
    x = grid - centre
    ax = np.einsum("ij,j...->i...", matrix, x)
    return torch.from_numpy(ax - x)[None]


@pytest.mark.parametrize(
    "matrix",
    [
        np.array([[1.2, 0.3], [-0.1, 0.9]]),
        np.array([[1.1, 0.2, 0.0], [0.0, 0.8, -0.1], [0.05, 0.0, 1.3]]),
    ],
)
def test_jacobian_stats_affine(matrix: np.ndarray) -> None:
    d = matrix.shape[0]
    ddf = _affine_ddf(matrix, (12,) * d)
    assert np.linalg.det(matrix) > 0
    stats = jacobian_stats(ddf)
    assert stats["folding_percent"] == 0.0
    assert stats["sd_log_jacobian"] == pytest.approx(0.0, abs=1e-9)
    # unbatched (d, *S) numpy input works too
    stats_np = jacobian_stats(ddf[0].numpy())
    assert stats_np == pytest.approx(stats, abs=1e-9)


def test_jacobian_stats_reflection_folds_everything() -> None:
    ddf = _affine_ddf(np.array([[-1.0, 0.0], [0.0, 1.0]]), (10, 10))
    stats = jacobian_stats(ddf)
    assert stats["folding_percent"] == 100.0


@pytest.mark.parametrize("d", [2, 3])
def test_jacobian_stats_folded_slab(d: int) -> None:
    # u_0 depends on x_0 only, piecewise linear with slope 0 on [0, 6], -3 on [6, 10] and 0 on
    # [10, 15]; det J = 1 + du_0/dx_0 with central differences:
    #   i = 7..9 : 1 - 3            = -2
    #   i = 6, 10: 1 + (0 - 3) / 2  = -0.5
    #   elsewhere: 1                 (one-sided differences at the borders see slope 0)
    # -> 5 folded rows out of 16 = 31.25 %.
    n = 16
    i = np.arange(n, dtype=np.float64)
    u0 = -3.0 * np.clip(i - 6, 0, 4)
    shape = (n,) + (6,) * (d - 1)
    ddf = np.zeros((1, d, *shape))
    ddf[0, 0] = u0.reshape(-1, *([1] * (d - 1)))
    stats = jacobian_stats(torch.from_numpy(ddf).float())
    assert stats["folding_percent"] == pytest.approx(100 * 5 / 16)
    # log det: 11 rows at 0, 5 rows at log(1e-9) (clamped) -> a Bernoulli spread
    p = 5 / 16
    expected_sd = abs(math.log(1e-9)) * math.sqrt(p * (1 - p))
    assert stats["sd_log_jacobian"] == pytest.approx(expected_sd, rel=1e-4)
    # Masking out the slab (rows 5..11) leaves no folding and a constant det of 1.
    mask = np.ones(shape, dtype=bool)
    mask[5:12] = False
    masked = jacobian_stats(torch.from_numpy(ddf), mask=mask)
    assert masked["folding_percent"] == 0.0
    assert masked["sd_log_jacobian"] == pytest.approx(0.0, abs=1e-12)
    # Masking in only the slab's core gives 100 %.
    core = np.zeros(shape, dtype=bool)
    core[7:10] = True
    assert jacobian_stats(torch.from_numpy(ddf), mask=core[None])["folding_percent"] == 100.0


def test_jacobian_stats_spacing_for_physical_ddf() -> None:
    # x -> 1.5 x along axis 0 in mm on a grid with 2 mm voxels: the field in mm is
    # 0.5 * (2 * i), i.e. slope 1 mm per voxel, which is 0.5 per mm -> det 1.5.
    ddf = np.zeros((1, 2, 10, 10))
    ddf[0, 0] = (0.5 * 2.0 * np.arange(10))[:, None]
    phys = jacobian_stats(torch.from_numpy(ddf), spacing=(2.0, 1.0))
    assert phys["folding_percent"] == 0.0
    assert phys["sd_log_jacobian"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="one field"):
        jacobian_stats(torch.zeros(2, 2, 8, 8))


# ----------------------------------------------------------------------------- evaluate_pair


def test_evaluate_pair_combines_everything() -> None:
    shape = (20, 24, 16)
    spacing = (1.5, 1.0, 2.0)
    fixed = _box(shape, (2, 2, 2), (10, 12, 8), 1) + _box(shape, (12, 14, 9), (18, 22, 14), 3)
    warped = _box(shape, (3, 2, 2), (11, 12, 8), 1)  # label 3 lost, label 5 nowhere
    ddf = _affine_ddf(np.diag([1.1, 0.9, 1.0]), shape)
    result = evaluate_pair(
        torch.from_numpy(warped)[None, None],
        torch.from_numpy(fixed)[None, None],
        [1, 3, 5],
        spacing,
        ddf=ddf,
    )
    assert set(result) == {
        "labels",
        "mean_dice",
        "mean_asd",
        "mean_hd95",
        "folding_percent",
        "sd_log_jacobian",
    }
    dsc = dice(warped, fixed, [1, 3, 5])
    surf = surface_distances(warped, fixed, [1, 3, 5], spacing)
    assert result["labels"][1] == {"dice": dsc[1], **surf[1]}
    assert result["labels"][1]["hd95"] == pytest.approx(1.5, abs=1e-5)  # 1 voxel along axis 0
    assert result["labels"][3]["dice"] == 0.0
    assert math.isnan(result["labels"][3]["asd"]) and math.isnan(result["labels"][5]["dice"])
    # means skip NaN entries
    assert result["mean_dice"] == pytest.approx(dsc[1] / 2)
    assert result["mean_asd"] == pytest.approx(surf[1]["asd"])
    assert result["folding_percent"] == 0.0
    assert result["sd_log_jacobian"] == pytest.approx(0.0, abs=1e-9)


def test_evaluate_pair_without_ddf_and_all_missing() -> None:
    empty = np.zeros((8, 8), dtype=np.int64)
    result = evaluate_pair(empty, empty, [1, 2], 1.0)
    assert "folding_percent" not in result
    assert all(math.isnan(result[f"mean_{k}"]) for k in ("dice", "asd", "hd95"))
