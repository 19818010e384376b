"""Numerical tests for ranreg.spatial (small arrays, d = 2 and d = 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ranreg.spatial import (
    compose_ddf,
    folding_fraction,
    identity_grid,
    jacobian_determinant,
    one_hot,
    resize_ddf,
    std_log_jacobian,
    warp,
    warp_labels,
)

# Different sizes per axis so that an axis-order mix-up changes shapes or values.
SHAPES = {2: (9, 11), 3: (7, 8, 9)}
DIMS = pytest.mark.parametrize("d", [2, 3])


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth(batch: int, channels: int, shape, amplitude: float, seed: int, dtype=torch.float64):
    """Smooth random field: coarse noise upsampled, scaled so max |value| == amplitude."""
    d = len(shape)
    coarse = torch.randn(batch, channels, *([3] * d), generator=_gen(seed), dtype=dtype)
    mode = "bilinear" if d == 2 else "trilinear"
    field = F.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=True)
    return field / field.abs().amax() * amplitude


def _interior(t: torch.Tensor, margin: int) -> torch.Tensor:
    """Crop ``margin`` voxels from each side of every spatial axis of (B, C, *S)."""
    index = (slice(None), slice(None)) + tuple(slice(margin, n - margin) for n in t.shape[2:])
    return t[index]


def _coords_image(shape, dtype=torch.float64) -> torch.Tensor:
    """A d-channel image whose channel i is the coordinate along axis i (linear ramps)."""
    return identity_grid(shape, dtype=dtype)[None]


# --------------------------------------------------------------------------------------------
# identity grid and exact warps
# --------------------------------------------------------------------------------------------


@DIMS
def test_identity_grid_values(d):
    shape = SHAPES[d]
    grid = identity_grid(shape)
    assert grid.shape == (d, *shape)
    assert grid.dtype == torch.float32
    for i in range(d):
        view = [1] * d
        view[i] = shape[i]
        expected = torch.arange(shape[i], dtype=torch.float32).view(view).expand(shape)
        torch.testing.assert_close(grid[i], expected, rtol=0, atol=0)
    assert identity_grid(shape, dtype=torch.float64).dtype == torch.float64


@DIMS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_ddf_is_identity(d, dtype):
    shape = SHAPES[d]
    image = torch.rand(2, 3, *shape, generator=_gen(1), dtype=dtype)
    ddf = torch.zeros(2, d, *shape, dtype=dtype)
    for mode in ("linear", "nearest"):
        out = warp(image, ddf, mode=mode)
        assert out.dtype == dtype and out.shape == image.shape
        torch.testing.assert_close(out, image)
    torch.testing.assert_close(warp(image, ddf, mode="nearest"), image, rtol=0, atol=0)

    labels = torch.randint(0, 5, (2, 1, *shape), generator=_gen(2))
    for method in ("nearest", "linear"):
        out = warp_labels(labels, ddf, method=method)
        assert out.dtype == labels.dtype
        assert torch.equal(out, labels)


@DIMS
@pytest.mark.parametrize("shift", [2, -1])
def test_integer_shift_moves_along_matching_axis(d, shift):
    """ddf channel a == k gives warped[x] = image[x + k e_a]: channel a moves tensor axis a."""
    shape = SHAPES[d]
    image = torch.rand(1, 2, *shape, generator=_gen(3), dtype=torch.float64)
    for axis in range(d):
        dim = axis + 2
        n = shape[axis]
        ddf = torch.zeros(1, d, *shape, dtype=torch.float64)
        ddf[:, axis] = shift
        out = warp(image, ddf)
        k = abs(shift)
        if shift > 0:
            got, want = out.narrow(dim, 0, n - k), image.narrow(dim, k, n - k)
            border_out = out.narrow(dim, n - k, k)
            border_ref = image.narrow(dim, n - 1, 1).expand_as(border_out)
        else:
            got, want = out.narrow(dim, k, n - k), image.narrow(dim, 0, n - k)
            border_out = out.narrow(dim, 0, k)
            border_ref = image.narrow(dim, 0, 1).expand_as(border_out)
        torch.testing.assert_close(got, want)
        rolled = torch.roll(image, shifts=-shift, dims=dim)
        torch.testing.assert_close(got, rolled.narrow(dim, 0 if shift > 0 else k, n - k))
        # Border padding repeats the edge slice; zeros padding gives zeros there.
        torch.testing.assert_close(border_out, border_ref)
        zeros = warp(image, ddf, padding_mode="zeros")
        band = zeros.narrow(dim, n - k, k) if shift > 0 else zeros.narrow(dim, 0, k)
        # (only rounding-level weight of the edge voxel one voxel outside the grid)
        torch.testing.assert_close(band, torch.zeros_like(band), rtol=0, atol=1e-12)
        # Nearest-neighbour warping of labels moves them the same way.
        labels = (image[:, :1] * 7).long()
        moved = warp_labels(labels, ddf)
        lo = 0 if shift > 0 else k
        hi = k if shift > 0 else 0
        assert torch.equal(moved.narrow(dim, lo, n - k), labels.narrow(dim, hi, n - k))


@DIMS
def test_subvoxel_shift_on_linear_ramp(d):
    shape = SHAPES[d]
    shift = torch.tensor([0.3, -0.7, 0.45][:d], dtype=torch.float64)
    coeffs = torch.tensor([1.5, -2.0, 0.75][:d], dtype=torch.float64)
    grid = identity_grid(shape, dtype=torch.float64)
    ramp = (coeffs.view(d, *([1] * d)) * grid).sum(0)[None, None] + 4.0
    ddf = shift.view(1, d, *([1] * d)).expand(1, d, *shape).clone()
    out = warp(ramp, ddf)
    expected = ramp + float((coeffs * shift).sum())
    # Interior: x + shift stays inside [0, N-1] on every axis.
    torch.testing.assert_close(_interior(out, 1), _interior(expected, 1), rtol=0, atol=1e-10)
    # The coordinate image warps to the sampling positions themselves.
    coords = warp(_coords_image(shape), ddf)
    torch.testing.assert_close(
        _interior(coords, 1), _interior((grid + ddf[0])[None], 1), rtol=0, atol=1e-10
    )


@DIMS
def test_subvoxel_shift_is_linear_interpolation(d):
    """On a random image a shift of f along axis a blends image[x] and image[x + e_a]."""
    shape = SHAPES[d]
    image = torch.rand(1, 1, *shape, generator=_gen(4), dtype=torch.float64)
    f = 0.25
    for axis in range(d):
        dim = axis + 2
        n = shape[axis]
        ddf = torch.zeros(1, d, *shape, dtype=torch.float64)
        ddf[:, axis] = f
        out = warp(image, ddf).narrow(dim, 0, n - 1)
        expected = (1 - f) * image.narrow(dim, 0, n - 1) + f * image.narrow(dim, 1, n - 1)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        # Nearest rounds 0.25 down to the voxel itself.
        torch.testing.assert_close(warp(image, ddf, mode="nearest"), image, rtol=0, atol=0)


@DIMS
def test_warp_batch_broadcast(d):
    shape = SHAPES[d]
    image = torch.rand(2, 1, *shape, generator=_gen(5))
    ddf = _smooth(1, d, shape, 1.5, seed=6, dtype=torch.float32)
    out = warp(image, ddf)
    assert out.shape == image.shape
    for b in range(2):
        torch.testing.assert_close(out[b : b + 1], warp(image[b : b + 1], ddf))
    ddfs = _smooth(3, d, shape, 1.5, seed=7, dtype=torch.float32)
    out = warp(image[:1], ddfs)
    assert out.shape == (3, 1, *shape)
    for b in range(3):
        torch.testing.assert_close(out[b : b + 1], warp(image[:1], ddfs[b : b + 1]))


def test_size_one_axis_does_not_divide_by_zero():
    image = torch.rand(1, 1, 1, 5, generator=_gen(8))
    ddf = torch.zeros(1, 2, 1, 5)
    ddf[:, 1] = 1.0
    out = warp(image, ddf)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[..., :4], image[..., 1:])


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------


@DIMS
def test_one_hot(d):
    shape = SHAPES[d]
    labels = torch.randint(0, 4, (2, 1, *shape), generator=_gen(9))
    encoded = one_hot(labels, 5)
    assert encoded.shape == (2, 5, *shape) and encoded.dtype == torch.float32
    torch.testing.assert_close(encoded.sum(1), torch.ones(2, *shape))
    assert torch.equal(encoded.argmax(1, keepdim=True), labels)
    assert torch.all(encoded[:, 4] == 0)
    with pytest.raises(ValueError, match="outside"):
        one_hot(labels, 3)
    with pytest.raises(ValueError, match="outside"):
        one_hot(labels - 1, 5)
    with pytest.raises(ValueError, match="integer"):
        one_hot(labels.float(), 5)


@DIMS
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_nearest_label_warp_preserves_label_set(d, dtype):
    shape = SHAPES[d]
    values = torch.tensor([0, 3, 5, 7])
    labels = values[torch.randint(0, 4, (2, 1, *shape), generator=_gen(10))].to(dtype)
    ddf = _smooth(2, d, shape, 2.3, seed=11, dtype=torch.float32)
    out = warp_labels(labels, ddf, method="nearest")
    assert out.dtype == dtype and out.shape == labels.shape
    assert set(out.unique().tolist()) <= set(values.tolist())
    assert not torch.equal(out, labels)  # the field really moved something


def test_nearest_label_warp_keeps_large_label_values():
    labels = torch.full((1, 1, 4, 4), 2**24 + 1, dtype=torch.int64)
    labels[..., :2] = 2**30 + 3
    out = warp_labels(labels, torch.zeros(1, 2, 4, 4))
    assert torch.equal(out, labels)


@DIMS
def test_linear_label_warp_half_voxel_shift(d):
    shape = SHAPES[d]
    labels = torch.randint(0, 4, (1, 1, *shape), generator=_gen(12)) * 2  # {0, 2, 4, 6}
    for axis in range(d):
        dim = axis + 2
        n = shape[axis]
        ddf = torch.zeros(1, d, *shape)
        ddf[:, axis] = 0.5
        out = warp_labels(labels, ddf, method="linear")
        assert out.dtype == labels.dtype and out.shape == labels.shape
        assert set(out.unique().tolist()) <= set(labels.unique().tolist())
        # Halfway between x and x + e_a, the result is one of the two neighbours' labels.
        got = out.narrow(dim, 0, n - 1)
        here, there = labels.narrow(dim, 0, n - 1), labels.narrow(dim, 1, n - 1)
        assert torch.all((got == here) | (got == there))
    # An explicit larger num_classes gives the same answer.
    again = warp_labels(labels, ddf, method="linear", num_classes=10)
    assert torch.equal(again, out)


@DIMS
def test_soft_labels_are_warped_linearly(d):
    shape = SHAPES[d]
    labels = torch.randint(0, 3, (1, 1, *shape), generator=_gen(13))
    soft = one_hot(labels, 3)
    ddf = _smooth(1, d, shape, 1.2, seed=14, dtype=torch.float32)
    out = warp_labels(soft, ddf, method="linear")
    torch.testing.assert_close(out, warp(soft, ddf, mode="linear"))
    torch.testing.assert_close(out.sum(1), torch.ones(1, *shape))
    hard = warp_labels(labels, ddf, method="linear")
    assert torch.equal(hard, out.argmax(1, keepdim=True))


def test_label_zero_padding_gives_background():
    labels = torch.full((1, 1, 5, 6), 3)
    ddf = torch.zeros(1, 2, 5, 6)
    ddf[:, 1] = 2.0
    for method in ("nearest", "linear"):
        out = warp_labels(labels, ddf, method=method, padding_mode="zeros")
        assert torch.all(out[..., :4] == 3) and torch.all(out[..., 4:] == 0)


# --------------------------------------------------------------------------------------------
# resize_ddf
# --------------------------------------------------------------------------------------------


@DIMS
@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_resize_constant_ddf(d, mode):
    shape = SHAPES[d]
    c = torch.tensor([0.7, -1.3, 2.1][:d], dtype=torch.float64).view(1, d, *([1] * d))
    ddf = c.expand(2, d, *shape).clone()
    fine = tuple(2 * n for n in shape)
    up = resize_ddf(ddf, fine, mode=mode)
    assert up.shape == (2, d, *fine)
    torch.testing.assert_close(up, (2 * c).expand_as(up))
    torch.testing.assert_close(resize_ddf(up, shape, mode=mode), ddf)


def _affine_ddf(shape, matrix, offset, scale=None, out_shape=None):
    """DDF of u(p) = A p + b (coarse voxel units, p = i + 0.5 at coarse centre i) sampled on a
    grid of ``out_shape`` voxels covering the same extent, in that grid's voxel units."""
    out_shape = out_shape or shape
    d = len(shape)
    ratio = [o / n for o, n in zip(out_shape, shape, strict=True)]
    grid = identity_grid(out_shape, dtype=torch.float64)
    # centre of output voxel j in coarse units
    pos = torch.stack([(grid[j] + 0.5) / ratio[j] for j in range(d)])
    u = torch.einsum("ij,j...->i...", matrix, pos) + offset.view(d, *([1] * d))
    return (u * torch.tensor(ratio, dtype=torch.float64).view(d, *([1] * d)))[None]


@DIMS
def test_resize_affine_ddf_matches_analytic_field(d):
    shape = SHAPES[d]
    matrix = torch.randn(d, d, generator=_gen(15), dtype=torch.float64) * 0.2
    offset = torch.randn(d, generator=_gen(16), dtype=torch.float64)
    coarse = _affine_ddf(shape, matrix, offset)

    fine_shape = tuple(2 * n for n in shape)
    up = resize_ddf(coarse, fine_shape)
    expected = _affine_ddf(shape, matrix, offset, out_shape=fine_shape)
    # Fine voxels 1 .. 2n-2 have both coarse neighbours inside the grid (exact interpolation).
    torch.testing.assert_close(_interior(up, 1), _interior(expected, 1), rtol=0, atol=1e-10)
    # 2x average pooling of the upsampled field (back in coarse voxels) gives the coarse field.
    pooled = F.avg_pool2d(up, 2) if d == 2 else F.avg_pool3d(up, 2)
    torch.testing.assert_close(_interior(pooled / 2, 1), _interior(coarse, 1), rtol=0, atol=1e-10)
    # Downsampling by 2 samples exactly between two fine centres: exact everywhere.
    torch.testing.assert_close(resize_ddf(expected, shape), coarse, rtol=0, atol=1e-10)

    # Anisotropic, non-integer factors: component i scales by size[i] / old[i].
    odd_shape = tuple(n + 3 + i for i, n in enumerate(shape))
    odd = resize_ddf(coarse, odd_shape)
    expected = _affine_ddf(shape, matrix, offset, out_shape=odd_shape)
    torch.testing.assert_close(_interior(odd, 2), _interior(expected, 2), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------------
# compose_ddf
# --------------------------------------------------------------------------------------------


@DIMS
def test_compose_matches_sequential_warps_on_coordinates(d):
    """On the coordinate (linear ramp) image both sides are exact away from the border."""
    shape = (10, 11) if d == 2 else (9, 10, 11)
    first = _smooth(2, d, shape, 1.0, seed=17)
    second = _smooth(2, d, shape, 1.0, seed=18)
    coords = _coords_image(shape).expand(2, d, *shape)
    sequential = warp(warp(coords, first), second)
    composed = warp(coords, compose_ddf(first, second))
    torch.testing.assert_close(_interior(composed, 3), _interior(sequential, 3), rtol=0, atol=1e-10)
    # The naive sum is not the composition: the test can tell them apart.
    naive = warp(coords, first + second)
    assert (_interior(naive, 3) - _interior(sequential, 3)).abs().max() > 1e-3


def _sines(channels: int, shape, amplitude: float, wavelength: float, seed: int):
    """Smooth analytic field: per channel a plane sine wave with random direction and phase."""
    d = len(shape)
    grid = identity_grid(shape, dtype=torch.float64)
    out = []
    for c in range(channels):
        w = torch.randn(d, generator=_gen(seed + c), dtype=torch.float64)
        w = w / w.norm() * 2 * math.pi / wavelength
        phase = float(torch.rand(1, generator=_gen(seed + 100 + c))) * 2 * math.pi
        out.append(torch.sin((w.view(d, *([1] * d)) * grid).sum(0) + phase))
    return amplitude * torch.stack(out)[None]


@DIMS
def test_compose_matches_sequential_warps_on_smooth_image(d):
    shape = (16, 17) if d == 2 else (12, 13, 14)
    image = _sines(1, shape, 1.0, 20.0, seed=19)
    first = _sines(d, shape, 2.0, 8.0, seed=30)
    second = _sines(d, shape, 2.0, 8.0, seed=40)
    sequential = _interior(warp(warp(image, first), second), 3)
    composed = _interior(warp(image, compose_ddf(first, second)), 3)
    naive = _interior(warp(image, first + second), 3)
    err = (composed - sequential).abs()
    # Only interpolation error (image range is [-1, 1]) ...
    assert err.max() < 0.1
    # ... which is far smaller than the error of simply adding the fields.
    assert err.mean() < 0.5 * (naive - sequential).abs().mean()


@DIMS
def test_compose_with_zero_and_constant_fields(d):
    shape = SHAPES[d]
    field = _smooth(2, d, shape, 1.7, seed=22)
    zero = torch.zeros_like(field)
    torch.testing.assert_close(compose_ddf(field, zero), field, rtol=0, atol=1e-12)
    torch.testing.assert_close(compose_ddf(zero, field), field, rtol=0, atol=0)
    a = torch.full((1, d, *shape), 0.4, dtype=torch.float64)
    b = torch.full((1, d, *shape), -1.1, dtype=torch.float64)
    torch.testing.assert_close(compose_ddf(a, b), a + b)
    # Batch of 1 broadcasts against batch of 2.
    assert compose_ddf(a, field).shape == field.shape


# --------------------------------------------------------------------------------------------
# Jacobian determinant and its metrics
# --------------------------------------------------------------------------------------------


def _matrix_with_det(d: int, seed: int) -> torch.Tensor:
    return torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(
        d, d, generator=_gen(seed), dtype=torch.float64
    )


@DIMS
@pytest.mark.parametrize("flip", [False, True])
def test_jacobian_of_affine_field_voxels(d, flip):
    shape = SHAPES[d]
    a = _matrix_with_det(d, seed=23)
    if flip:  # a folding (orientation-reversing) map has negative determinant
        a[0] = -a[0]
    t = torch.tensor([1.0, -2.0, 0.5][:d], dtype=torch.float64)
    grid = identity_grid(shape, dtype=torch.float64)
    ddf = torch.einsum("ij,j...->i...", a - torch.eye(d, dtype=torch.float64), grid)
    ddf = (ddf + t.view(d, *([1] * d)))[None].expand(2, d, *shape)
    jac = jacobian_determinant(ddf)
    assert jac.shape == (2, *shape)
    # Differences of a linear function are exact, so this holds at the borders too.
    torch.testing.assert_close(jac, torch.full_like(jac, float(torch.linalg.det(a))))
    torch.testing.assert_close(jacobian_determinant(ddf, spacing=[1.0] * d), jac)
    assert jacobian_determinant(torch.zeros(1, d, *shape)).eq(1).all()


@DIMS
def test_jacobian_of_affine_field_with_spacing(d):
    """A field given in mm, u(x) = M x + t with x = index * spacing in mm, has det(I + M)."""
    shape = SHAPES[d]
    spacing = torch.tensor([0.8, 1.5, 2.5][:d], dtype=torch.float64)
    m = 0.2 * torch.randn(d, d, generator=_gen(24), dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    x_mm = identity_grid(shape, dtype=torch.float64) * spacing.view(d, *([1] * d))
    ddf_mm = torch.einsum("ij,j...->i...", m, x_mm)[None] + 3.0
    jac = jacobian_determinant(ddf_mm, spacing=spacing.tolist())
    torch.testing.assert_close(jac, torch.full_like(jac, float(torch.linalg.det(eye + m))))
    # Read as voxels instead (no spacing), derivatives are d u_i / d index_j = M_ij s_j.
    jac_vox = jacobian_determinant(ddf_mm)
    expected = float(torch.linalg.det(eye + m * spacing.view(1, d)))
    torch.testing.assert_close(jac_vox, torch.full_like(jac_vox, expected))


def test_folding_fraction_hand_made():
    det = torch.ones(2, 4, 5)
    det[0, 0, :2] = -0.5  # 2 folded
    det[0, 1, 0] = 0.0  # det == 0 counts as folded
    det[1, 2:, :] = -1.0  # 10 folded of 20
    torch.testing.assert_close(folding_fraction(det), torch.tensor([3 / 20, 10 / 20]))
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[:, :2, :] = True  # first two rows: 10 voxels
    torch.testing.assert_close(folding_fraction(det, mask), torch.tensor([3 / 10, 0.0]))
    # Label-style (B, 1, *S) integer mask with batch 1 broadcasts.
    torch.testing.assert_close(
        folding_fraction(det, mask[:1, None].long()), torch.tensor([3 / 10, 0.0])
    )
    det3 = torch.ones(1, 2, 2, 2)
    det3[0, 0, 0, 0] = -2.0
    torch.testing.assert_close(folding_fraction(det3), torch.tensor([1 / 8]))


def test_std_log_jacobian_hand_made():
    e = math.e
    det = torch.ones(3, 2, 4, dtype=torch.float64)
    det[1, 0] = e  # log values: four 1's and four 0's -> population SD 0.5
    det[2, :, :2] = e
    det[2, :, 2:] = 1 / e  # log values +-1 -> SD 1
    torch.testing.assert_close(std_log_jacobian(det), torch.tensor([0.0, 0.5, 1.0]).double())
    mask = torch.zeros(3, 2, 4)
    mask[:, 0] = 1  # first row only
    torch.testing.assert_close(std_log_jacobian(det, mask), torch.tensor([0.0, 0.0, 1.0]).double())
    # Non-positive determinants are clamped to eps before the log.
    folded = torch.tensor([[[1.0, -3.0], [0.0, 1.0]]], dtype=torch.float64)
    expected = 0.5 * abs(math.log(1e-6))  # two values 0 and two log(eps)
    torch.testing.assert_close(
        std_log_jacobian(folded, eps=1e-6), torch.tensor([expected]).double()
    )


# --------------------------------------------------------------------------------------------
# ValueError paths
# --------------------------------------------------------------------------------------------


@DIMS
def test_value_errors(d):
    shape = SHAPES[d]
    image = torch.rand(2, 1, *shape)
    ddf = torch.zeros(2, d, *shape)
    labels = torch.zeros(2, 1, *shape, dtype=torch.long)
    other = tuple(n + 1 for n in shape)

    cases = [
        (lambda: warp(image, torch.zeros(2, d + 1, *shape)), "channels"),
        (lambda: warp(image, torch.zeros(2, d, *other)), "spatial sizes differ"),
        (lambda: warp(image, torch.zeros(3, d, *shape)), "batch sizes"),
        (lambda: warp(image, torch.zeros(2, d, 4)), "4 or 5 dims"),
        (lambda: warp(image[0], ddf), "same number of spatial dims"),
        (lambda: warp(image, ddf, mode="cubic"), "mode"),
        (lambda: warp(image, ddf, padding_mode="reflection"), "padding_mode"),
        (lambda: warp(image.long(), ddf), "floating point"),
        (lambda: warp_labels(labels, ddf, method="bilinear"), "method"),
        (lambda: warp_labels(labels.expand(2, 2, *shape), ddf), r"\(B, 1, \*S\)"),
        (lambda: warp_labels(labels, torch.zeros(2, d, *other)), "spatial sizes differ"),
        (lambda: one_hot(labels, 0), "num_classes"),
        (lambda: resize_ddf(ddf, other[:-1]), "positive integers"),
        (lambda: resize_ddf(ddf, other, mode="cubic"), "mode"),
        (lambda: resize_ddf(torch.zeros(2, d + 1, *shape), other), "channels"),
        (lambda: compose_ddf(ddf, torch.zeros(2, d, *other)), "same grid"),
        (lambda: compose_ddf(ddf, torch.zeros(3, d, *shape)), "batch sizes"),
        (lambda: jacobian_determinant(torch.zeros(2, d + 1, *shape)), "channels"),
        (lambda: jacobian_determinant(ddf, spacing=[1.0] * (d + 1)), "spacing"),
        (lambda: jacobian_determinant(ddf, spacing=[0.0] * d), "spacing"),
        (lambda: jacobian_determinant(torch.zeros(1, d, *([1] * d))), ">= 2"),
        (lambda: folding_fraction(torch.ones(2, *shape), torch.ones(2, *other)), "mask"),
        (lambda: folding_fraction(torch.ones(2, *shape), torch.ones(3, *shape)), "batch"),
        (lambda: folding_fraction(torch.ones(2)), "jac_det"),
        (lambda: std_log_jacobian(torch.ones(2, *shape), torch.ones(2, *other)), "mask"),
        (lambda: std_log_jacobian(torch.ones(2, *shape), eps=0.0), "eps"),
        (lambda: identity_grid([]), "shape"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()


def test_error_message_names_shapes():
    with pytest.raises(ValueError) as info:
        warp(torch.zeros(1, 1, 4, 5), torch.zeros(1, 2, 4, 6))
    assert "(1, 1, 4, 5)" in str(info.value) and "(1, 2, 4, 6)" in str(info.value)


def test_compose_matches_supplement_eq6_with_scipy() -> None:
    """Eq. (6): phi_k[x] = psi[x] + phi_{k-1}[x - psi[x]], written for the convention
    warped(x) = moving(x - phi(x)). With phi = -ddf in our convention, compose_ddf must give
    the same field; the reference is evaluated with scipy's map_coordinates."""
    from scipy.ndimage import map_coordinates

    shape = (20, 22, 18)
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"))
    phi_prev = np.stack([2.0 * np.sin(grid[(i + 1) % 3] / 5.0 + i) for i in range(3)])
    psi = np.stack([1.5 * np.cos(grid[(i + 2) % 3] / 4.0 - i) for i in range(3)])
    # Eq. (6) evaluated directly (linear interpolation, edge values held like border padding)
    pos = grid - psi
    sampled = np.stack([map_coordinates(c, pos, order=1, mode="nearest") for c in phi_prev])
    eq6 = psi + sampled
    ours = -compose_ddf(torch.from_numpy(-phi_prev)[None], torch.from_numpy(-psi)[None])[0].numpy()
    np.testing.assert_allclose(ours, eq6, atol=1e-9)
