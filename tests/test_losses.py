"""Tests of ranreg.losses against independent numpy/scipy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import DiffusionLoss
from scipy import ndimage

from ranreg import losses

SHAPES = [(2, 2, 9, 11), (2, 3, 7, 8, 6)]  # (B, d, *S) for d = 2 and 3


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def _linear_field(shape: tuple[int, ...], g: np.ndarray) -> np.ndarray:
    """(B, d, *S) field with ddf_c(x) = sum_i g[c, i] x_i."""
    spatial = shape[2:]
    x = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in spatial], indexing="ij"))
    field = np.einsum("ci,i...->c...", g, x)
    return np.broadcast_to(field, shape).copy()


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("shape", SHAPES)
def test_ddf_gradient_matches_numpy_diff(shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).normal(size=shape)
    grads = losses.ddf_gradient(_t(x))
    assert len(grads) == len(shape) - 2
    for i, g in enumerate(grads):
        np.testing.assert_allclose(g.numpy(), np.diff(x, axis=2 + i))
    np.testing.assert_allclose(
        losses.gradient_l2(_t(x)).item(),
        sum(np.mean(np.diff(x, axis=2 + i) ** 2) for i in range(len(shape) - 2)),
    )
    np.testing.assert_allclose(
        losses.gradient_l1(_t(x)).item(),
        sum(np.mean(np.abs(np.diff(x, axis=2 + i))) for i in range(len(shape) - 2)),
    )


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")
@pytest.mark.parametrize("shape", SHAPES)
def test_gradient_losses_constant_and_linear(shape: tuple[int, ...]) -> None:
    d = len(shape) - 2
    const = torch.full(shape, 3.7, dtype=torch.float64)
    assert losses.gradient_l2(const).item() == 0.0
    assert losses.gradient_l1(const).item() == 0.0
    g = np.random.default_rng(1).normal(size=(d, d))
    lin = _t(_linear_field(shape, g))
    np.testing.assert_allclose(losses.gradient_l2(lin).item(), np.sum(g**2) / d, rtol=1e-10)
    np.testing.assert_allclose(losses.gradient_l1(lin).item(), np.sum(np.abs(g)) / d, rtol=1e-10)
    # MONAI's DiffusionLoss (central differences) agrees on linear fields only
    np.testing.assert_allclose(DiffusionLoss()(lin).item(), losses.gradient_l2(lin).item())
    rough = torch.from_numpy(np.random.default_rng(2).normal(size=shape))
    assert abs(DiffusionLoss()(rough).item() - losses.gradient_l2(rough).item()) > 0.1


@pytest.mark.parametrize("shape", SHAPES)
def test_synthetic_ddf_loss(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=shape), rng.normal(size=shape)
    d = len(shape) - 2
    reg = sum(np.mean(np.diff(a, axis=2 + i) ** 2) for i in range(d))
    for lam in (0.0, 1.0, 0.3):
        expected = np.mean((a - b) ** 2) + lam * reg
        np.testing.assert_allclose(
            losses.synthetic_ddf_loss(_t(a), _t(b), lam=lam).item(), expected, rtol=1e-10
        )
    assert losses.synthetic_ddf_loss(_t(a), _t(a), lam=0.0).item() == 0.0
    pred = _t(a).requires_grad_()
    losses.synthetic_ddf_loss(pred, _t(b)).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


def test_mse_loss_mask() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(2, 3, 5, 6)), rng.normal(size=(2, 3, 5, 6))
    np.testing.assert_allclose(losses.mse_loss(_t(a), _t(b)).item(), np.mean((a - b) ** 2))
    mask = rng.random((2, 1, 5, 6)) > 0.5
    full = np.broadcast_to(mask, a.shape)
    np.testing.assert_allclose(
        losses.mse_loss(_t(a), _t(b), _t(mask)).item(), np.mean(((a - b) ** 2)[full])
    )
    w = rng.random((2, 1, 5, 6))
    ww = np.broadcast_to(w, a.shape)
    np.testing.assert_allclose(
        losses.mse_loss(_t(a), _t(b), _t(w)).item(), np.sum(ww * (a - b) ** 2) / np.sum(ww)
    )
    assert losses.mse_loss(_t(a), _t(b), torch.zeros(2, 1, 5, 6, dtype=torch.bool)).item() == 0.0
    # an empty mask under a large loss weight: zero gradients, not NaN (the 2D study's
    # all-random-contrast batches under image weight 100 crashed in grid_sample's backward)
    pred = _t(a).float().requires_grad_()
    (100.0 * losses.mse_loss(pred, _t(b).float(), torch.zeros(2, 1, 1, 1))).backward()
    assert pred.grad is not None and bool((pred.grad == 0).all())


# ----------------------------------------------------------------------------- local NCC


def _ncc_reference(
    f: np.ndarray, w: np.ndarray, window: int, thr: float | None, eps: float
) -> float:
    """Windowed statistics with scipy's uniform_filter, normalised by the in-image count."""
    size = (1, 1) + (window,) * (f.ndim - 2)

    def box(x: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(x, size=size, mode="constant", cval=0.0)

    count = box(np.ones_like(f))
    mf, mw = box(f) / count, box(w) / count
    var_f = np.maximum(box(f * f) / count - mf**2, 0)
    var_w = np.maximum(box(w * w) / count - mw**2, 0)
    cov = box(f * w) / count - mf * mw
    cc = cov**2 / (var_f * var_w + eps)
    if thr is None:
        return -float(cc.mean())
    return -float(cc[f > thr].mean())


def _smooth_image(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.random(shape), sigma=(0, 0) + (1.0,) * (len(shape) - 2))
    return (img - img.min()) / (img.max() - img.min())


@pytest.mark.parametrize("spatial", [(12, 10), (9, 10, 8)])
@pytest.mark.parametrize("window", [8, 5, 1])
@pytest.mark.parametrize("thr", [None, 0.4])
def test_local_ncc_matches_scipy(spatial: tuple[int, ...], window: int, thr: float | None) -> None:
    shape = (2, 1, *spatial)
    f, w = _smooth_image(shape, 5), _smooth_image(shape, 6)
    got = losses.local_ncc_loss(_t(f), _t(w), window=window, mask_threshold=thr).item()
    np.testing.assert_allclose(got, _ncc_reference(f, w, window, thr, 1e-8), rtol=1e-9)
    assert -1.0 <= got <= 0.0


@pytest.mark.parametrize("spatial", [(16, 14), (10, 9, 11)])
def test_local_ncc_identical_and_affine_invariant(spatial: tuple[int, ...]) -> None:
    shape = (2, 1, *spatial)
    f, w = _smooth_image(shape, 7), _smooth_image(shape, 8)
    eps = 1e-12
    same = losses.local_ncc_loss(_t(f), _t(f), mask_threshold=0.3, eps=eps).item()
    assert same == pytest.approx(-1.0, abs=1e-8)
    base = losses.local_ncc_loss(_t(f), _t(w), eps=eps).item()
    assert base > -0.9  # unrelated images correlate much less
    for scale, shift in ((2.5, -0.3), (-0.7, 4.0)):
        moved = losses.local_ncc_loss(_t(f), _t(scale * w + shift), eps=eps).item()
        assert moved == pytest.approx(base, abs=1e-7)
    # float32 with the default eps: identical textured images stay close to -1
    f32 = torch.from_numpy(f.astype(np.float32))
    assert losses.local_ncc_loss(f32, f32, mask_threshold=0.1).item() < -0.999
    # flat image: no 0/0, zero correlation
    flat = torch.full_like(f32, 0.5)
    assert losses.local_ncc_loss(flat, flat).item() == pytest.approx(0.0, abs=1e-6)


def test_local_ncc_mask_restricts_average_and_has_gradient() -> None:
    shape = (1, 1, 12, 12)
    f = _smooth_image(shape, 9)
    w = _smooth_image(shape, 10)
    # empty mask -> 0
    assert losses.local_ncc_loss(_t(f), _t(w), mask_threshold=2.0).item() == 0.0
    warped = _t(w).requires_grad_()
    loss = losses.local_ncc_loss(_t(f), warped, mask_threshold=0.2)
    loss.backward()
    assert warped.grad is not None and torch.isfinite(warped.grad).all()
    assert warped.grad.abs().max() > 0
    # better alignment gives a lower loss
    shifted = np.roll(f, 3, axis=-1)
    aligned = losses.local_ncc_loss(_t(f), _t(f), mask_threshold=0.2).item()
    misaligned = losses.local_ncc_loss(_t(f), _t(shifted), mask_threshold=0.2).item()
    assert aligned < misaligned - 0.2


# ----------------------------------------------------------------------------- edge-aware


def _edge_reference(ddf: np.ndarray, img: np.ndarray, alpha: float) -> float:
    total = 0.0
    for i in range(ddf.ndim - 2):
        ax = 2 + i
        n = img.shape[ax]
        lo = np.take(img, range(n - 1), axis=ax)
        hi = np.take(img, range(1, n), axis=ax)
        grad2 = np.sum((hi - lo) ** 2, axis=1, keepdims=True)
        mid = np.mean((hi + lo) / 2, axis=1, keepdims=True)
        weight = np.exp(-alpha * grad2 / (0.2 + mid) ** 2)
        total += np.mean(weight * np.abs(np.diff(ddf, axis=ax)))
    return total


@pytest.mark.parametrize("shape", SHAPES)
def test_edge_aware_smoothness(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(11)
    ddf = rng.normal(size=shape)
    img = _smooth_image((shape[0], 1, *shape[2:]), 12)
    np.testing.assert_allclose(
        losses.edge_aware_smoothness(_t(ddf), _t(img), alpha=25.0).item(),
        _edge_reference(ddf, img, 25.0),
        rtol=1e-10,
    )
    const = np.full((shape[0], 1, *shape[2:]), 0.5)
    np.testing.assert_allclose(
        losses.edge_aware_smoothness(_t(ddf), _t(const)).item(),
        losses.gradient_l1(_t(ddf)).item(),
        rtol=1e-12,
    )


def test_edge_aware_weight_drops_at_edges() -> None:
    # image with a step between rows 7 and 8; DDF with a unit jump either at the edge or away
    img = np.zeros((1, 1, 16, 10))
    img[:, :, 8:] = 1.0
    at_edge = np.zeros((1, 2, 16, 10))
    at_edge[:, :, 8:] = 1.0
    away = np.zeros((1, 2, 16, 10))
    away[:, :, 3:] = 1.0
    loss_edge = losses.edge_aware_smoothness(_t(at_edge), _t(img)).item()
    loss_away = losses.edge_aware_smoothness(_t(away), _t(img)).item()
    plain = losses.gradient_l1(_t(at_edge)).item()
    assert loss_away == pytest.approx(plain)  # weight 1 on the flat part
    assert loss_edge < 1e-3 * plain  # exp(-25 / 0.7^2) at the edge
    expected = plain * np.exp(-25.0 / (0.2 + 0.5) ** 2)
    assert loss_edge == pytest.approx(expected)
    field = _t(at_edge).requires_grad_()
    losses.edge_aware_smoothness(field, _t(img)).backward()
    assert field.grad is not None and torch.isfinite(field.grad).all()


# ----------------------------------------------------------------------------- dice


def _onehot(labels: np.ndarray, k: int) -> np.ndarray:
    return np.moveaxis(np.eye(k)[labels], -1, 1)


@pytest.mark.parametrize("spatial", [(8, 9), (6, 5, 7)])
def test_dice_loss(spatial: tuple[int, ...]) -> None:
    rng = np.random.default_rng(13)
    k = 4
    lab = rng.integers(0, k, size=(2, *spatial))
    oh = _t(_onehot(lab, k))
    assert losses.dice_loss(oh, oh).item() == pytest.approx(0.0, abs=1e-7)
    other = rng.integers(0, k, size=(2, *spatial))
    pred = rng.random((2, k, *spatial))
    target = _onehot(other, k)
    axes = tuple(range(2, 2 + len(spatial)))
    inter = np.sum(pred * target, axis=axes)
    denom = np.sum(pred, axis=axes) + np.sum(target, axis=axes)
    per = 1 - (2 * inter + 1e-5) / (denom + 1e-5)
    expected = per[:, 1:].mean()  # foreground classes only
    np.testing.assert_allclose(losses.dice_loss(_t(pred), _t(target)).item(), expected, rtol=1e-7)
    # disjoint foreground -> loss ~1
    a = np.zeros((1, *spatial), dtype=int)
    b = np.zeros((1, *spatial), dtype=int)
    a[(0, 0)] = 1
    b[(0, -1)] = 1
    assert losses.dice_loss(_t(_onehot(a, 2)), _t(_onehot(b, 2))).item() == pytest.approx(
        1.0, abs=1e-4
    )
