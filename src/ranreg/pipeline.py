"""The registration itself: a short pipeline of named steps on two world-space volumes.

``register_volumes`` runs, for a pair of :class:`~ranreg.data.io.Volume`:

1. **affine** (:mod:`ranreg.affine`): a world map ``T`` (fixed point -> moving point),
   identity for ``affine="none"``;
2. **network grid**: the fixed image resampled onto the model's cell grid (config
   ``spacing``) and the moving image resampled onto it through ``T`` (one interpolation);
3. **network**: a DDF ``v`` in network voxels, resized to the fixed grid;
4. **refine** (:mod:`ranreg.refine`): instance optimisation of ``v`` (or of zero when the
   network's field makes the similarity worse);
5. **outputs**: the moving image and labels sampled once at the whole mapping.

Geometry (the convention of every output)
-----------------------------------------
``A_f``, ``A_m``: voxel-to-world affines of the fixed and moving images (world = RAS+ mm).
``v(x)`` is a displacement in fixed voxels along the fixed array axes; ``L_f`` the 3x3 part
of ``A_f``. The fixed voxel ``x`` at world point ``p = A_f x`` corresponds to the moving
world point ``q(p) = T(p + L_f v(x))``, i.e. to the moving voxel
``A_m^-1 T A_f (x + v(x))``. The warped image is the ORIGINAL moving image sampled once
there (linear; labels nearest; outside the moving field of view the image gets its minimum
and labels 0). ``ddf_mm`` holds the whole mapping ``u(p) = q(p) - p`` (affine included)
along the world axes. The Jacobian determinant is that of ``p -> q(p)``:
``det(M_T) det(I + dv/dx)``, exact from ``v`` whatever rotation, flip, permutation or
anisotropy the affines have.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ranreg.affine import register_affine
from ranreg.data.io import Volume
from ranreg.data.preprocess import DEFAULT_WINDOW, HU_THRESHOLD, network_intensity
from ranreg.errors import RanregError
from ranreg.geometry import (
    apply_affine,
    cell_centres,
    cell_grid,
    label_tensor,
    labels_on_grid,
    same_grid,
    sample,
)
from ranreg.grids import Grid
from ranreg.options import RegistrationOptions
from ranreg.refine import RefineReport, RefineSettings, refine_pair
from ranreg.registry import is_peer
from ranreg.runtime import is_neural, resolve_device, run_network, synchronize
from ranreg.similarity import BODY_THRESHOLD, normalised_volumes
from ranreg.spatial import folding_fraction, identity_grid, jacobian_determinant, resize_ddf
from ranreg.spatial import std_log_jacobian as _std_log_jacobian

__all__ = [
    "HU_THRESHOLD",
    "RegistrationResult",
    "align_labels",
    "check_inputs",
    "check_contrast",
    "mask_on",
    "model_settings",
    "register_volumes",
]


def model_settings(
    config: dict[str, Any],
) -> tuple[tuple[float, float, float] | None, tuple[float, float] | None | str]:
    """``(spacing, window)`` of a model config.

    ``spacing``: the network's voxel size in mm per fixed array axis, or ``None`` (absent:
    run on the fixed image's own grid). ``window``: ``(low, high)`` HU, ``None`` (min-max
    normalisation per image) or ``"auto"`` (absent from the config: ``(-100, 300)`` for an
    image whose minimum is below -500, as CT in HU, else min-max).
    """
    name = config.get("name", "model")
    spacing = config.get("spacing")
    if spacing is not None:
        try:
            values = tuple(float(s) for s in spacing)
        except (TypeError, ValueError):
            values = ()
        if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
            raise RanregError(
                f"model {name}: config 'spacing' must be 3 positive mm, got {spacing}"
            )
        spacing = values
    if "window" not in config:
        return spacing, "auto"
    window = config["window"]
    if window is None:
        return spacing, None
    try:
        low, high = (float(w) for w in window)
    except (TypeError, ValueError):
        raise RanregError(f"model {name}: config 'window' must be [low, high] or null") from None
    if not high > low:
        raise RanregError(f"model {name}: config 'window' needs high > low, got {window}")
    return spacing, (low, high)


@dataclass
class RegistrationResult:
    """Everything :func:`register_volumes` produced, on the fixed image's original grid.

    ``warped`` (X, Y, Z) float32: the moving image warped onto the fixed grid.
    ``ddf_mm`` (X, Y, Z, 3): world (RAS+) displacement ``u`` in mm (see the module docs).
    ``jacobian`` (X, Y, Z): ``det(I + du/dp)``. ``warped_label``: moving labels warped
    (nearest), or None. ``runtime_s``: the whole call; ``network_s``: the forward pass;
    ``affine_s``, ``refine_s``: the affine stage and the instance optimisation.
    ``ddf_vox`` (X, Y, Z, 3): the same displacement in fixed voxels along the fixed array
    axes. ``world_map``: the affine stage's 4x4 world map (fixed -> moving point);
    ``initial_map``: the one it started from (``initial_affine``), or None;
    ``refine_report``: what the optimisation did (None without it);
    ``fixed_mask_fraction`` / ``moving_mask_fraction``: the part of the fixed / moving
    image inside its mask, if given.
    ``moving_on_fixed`` / ``moving_label_on_fixed``: the moving image / labels resampled to
    the fixed grid with the identity world transform (the "before" state).
    """

    warped: np.ndarray
    ddf_mm: np.ndarray
    jacobian: np.ndarray
    warped_label: np.ndarray | None
    runtime_s: float
    network_s: float
    fixed_affine: np.ndarray
    ddf_vox: np.ndarray | None = None
    moving_on_fixed: np.ndarray | None = None
    moving_label_on_fixed: np.ndarray | None = None
    fixed_label: np.ndarray | None = None
    network_shape: tuple[int, ...] = ()
    network_spacing: tuple[float, ...] = ()
    network_fixed: np.ndarray | None = None
    refine_s: float = 0.0
    levels: Any = None
    affine_s: float = 0.0
    world_map: np.ndarray | None = None
    refine_report: RefineReport | None = None
    initial_map: np.ndarray | None = None
    fixed_mask_fraction: float | None = None
    moving_mask_fraction: float | None = None

    @property
    def fixed_spacing(self) -> tuple[float, float, float]:
        norms = np.sqrt((np.asarray(self.fixed_affine)[:3, :3] ** 2).sum(axis=0))
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    def jacobian_stats(self) -> dict[str, float]:
        """Folding % and SD of log det J (:func:`ranreg.metrics.jacobian_stats` semantics)."""
        jac = torch.from_numpy(np.ascontiguousarray(self.jacobian))[None]
        return {
            "folding_percent": 100.0 * float(folding_fraction(jac)[0]),
            "sd_log_jacobian": float(_std_log_jacobian(jac)[0]),
        }


def _normalise(image: Tensor, window: tuple[float, float] | None | str, raw_min: float) -> Tensor:
    if window == "auto":  # the window for CT, min-max otherwise
        return network_intensity(image, DEFAULT_WINDOW, ct_only=True, raw_min=raw_min)
    return network_intensity(image, window, ct_only=False)  # type: ignore[arg-type]


def _volume_name(v: Volume, default: str) -> str:
    return str(v.path) if v.path is not None else default


def check_inputs(model: torch.nn.Module, moving: Volume, fixed: Volume) -> None:
    """Refuse a model that is not 3D, images that are not 3D volumes and images without
    contrast (RanregError naming the model or file)."""
    ndim = int(getattr(model, "config", {}).get("ndim", 3))
    if ndim != 3:
        raise RanregError(
            f"model {getattr(model, 'source', model.config.get('name'))}: a {ndim}D model "
            "cannot register 3D volumes"
        )
    for vol, name in ((moving, "moving image"), (fixed, "fixed image")):
        if len(vol.shape) != 3 or min(vol.shape) < 2:
            raise RanregError(
                f"{_volume_name(vol, name)}: need a 3D volume with at least 2 voxels per axis, "
                f"got shape {vol.shape}"
            )
        check_contrast(vol, name)


def check_contrast(volume: Volume, name: str = "image") -> None:
    """Refuse an image whose voxels all have one value (RanregError naming the file):
    any field fits it equally well, so a registration would return an arbitrary one."""
    lo, hi = float(np.min(volume.array)), float(np.max(volume.array))
    if not hi > lo:
        raise RanregError(
            f"{_volume_name(volume, name)}: every voxel is {lo:g}; an image without "
            "contrast cannot be registered (an empty scan or a failed conversion?)"
        )


def align_labels(
    label: Volume | None, image: Volume, role: str, kind: str = "labels"
) -> Volume | None:
    """``label`` on its image's grid: as it is when the grids agree, else resampled through
    both affines with a warning; a label map that lands outside its image is an error.
    ``role`` and ``kind`` name an array in messages (``fixed labels``, ``fixed mask``)."""
    if label is None or same_grid(label, image):
        return label
    placed = labels_on_grid(label, image)
    name = _volume_name(label, f"{role} {kind}")
    if np.asarray(label.array).any() and not placed.array.any():
        what = "label of this map" if kind == "labels" else f"voxel of this {kind}"
        raise RanregError(
            f"{name}: no {what} falls inside its image "
            f"{_volume_name(image, role + ' image')} in world space (their affines disagree)"
        )
    warnings.warn(
        f"{name} is stored on another grid than its image; resampled onto the image's grid "
        "through both affines (nearest)",
        stacklevel=3,
    )
    return placed


def mask_on(mask: Volume | None, image: Volume, side: str = "fixed") -> Tensor | None:
    """The ``side`` (fixed or moving) image's mask (non-zero: inside) as a
    ``(1, 1, *image)`` 0/1 tensor on its grid, resampled like a label map when it is stored
    on another grid; a mask with no voxel inside is an error."""
    if mask is None:
        return None
    placed = align_labels(mask, image, side, "mask")
    assert placed is not None
    inside = np.asarray(placed.array) != 0
    if not inside.any():
        raise RanregError(f"{_volume_name(mask, side + ' mask')}: the mask is empty")
    return torch.from_numpy(inside.astype(np.float32))[None, None]


def _check_mask(
    mask: Tensor, images: tuple[Tensor, ...] | None, name: str, peer: bool, side: int = 0
) -> None:
    """A mask outside its image's body (``images[side]``, normalised intensity over 0.1,
    what the similarities count) would leave nothing to compare: refuse it rather than
    return the start. A mask that nothing or only the affine stage uses is said in a
    warning."""
    peers = "the comparison methods (ANTs SyN, ConvexAdam) do not use it"
    if images is None:
        why = peers + " and the affine stage does not run" if peer else "nothing uses it"
        warnings.warn(
            f"{name} has no effect: it restricts ranreg's affine stage and optimisation, and "
            + why,
            stacklevel=3,
        )
        return
    if peer:
        warnings.warn(f"{name}: {peers}; only ranreg's affine stage does", stacklevel=3)
    if not bool(((mask > 0.5) & (images[side] > BODY_THRESHOLD)).any()):
        which = "fixed" if side == 0 else "moving"
        raise RanregError(f"{name}: no voxel of the mask lies in the {which} image's body")


def _fraction(mask: Tensor | None) -> float | None:
    """The part of an image inside its mask (metrics.json), or None without one."""
    return None if mask is None else round(float(mask.mean()), 6)


def _check_overlap(world_map: np.ndarray, fixed: Volume, moving: Volume, mode: str) -> None:
    """Refuse a pair whose moving image, after the affine stage, lies nowhere over the
    fixed image: every output would be empty. Checked both ways on 8 mm grids of each image
    (at least two cells per axis, so a thin slab over a large scan is found)."""
    if _any_inside(fixed, moving, world_map) or _any_inside(
        moving, fixed, np.linalg.inv(world_map)
    ):
        return
    how = (
        "where they lie in world space (--affine none)"
        if mode == "none"
        else "after the affine stage"
    )
    raise RanregError(
        f"{_volume_name(moving, 'moving image')}: no part of it lies over the fixed image "
        f"{_volume_name(fixed, 'fixed image')} {how}; check the files' origins and "
        "orientation, or let the affine stage run (--affine affine)"
    )


def _any_inside(source: Volume, target: Volume, world_map: np.ndarray) -> bool:
    """Whether a cell centre of an 8 mm grid over ``source``, moved by the world map
    ``world_map``, lies on ``target``'s grid (:meth:`Grid.inside`)."""
    shape, step = cell_grid(source, (8.0, 8.0, 8.0))
    to_world = world_map @ np.asarray(source.affine, dtype=np.float64)
    world = apply_affine(to_world, cell_centres(shape, step, "cpu"))
    return bool(Grid.of(target).inside(world).any())


@dataclass
class _Inputs:
    """The pair on the device: raw intensities, their minima, the fixed-to-moving voxel map."""

    moving: Tensor  # (1, 1, *S_m)
    fixed: Tensor  # (*S_f)
    mov_min: float
    fix_min: float
    fixed_to_moving: np.ndarray  # fixed voxel -> moving voxel, affine stage included
    world_only: np.ndarray  # fixed voxel -> moving voxel with the identity world map


def _network_inputs(
    inputs: _Inputs,
    fixed: Volume,
    moving: Volume,
    shape_g: tuple[int, ...],
    step: np.ndarray,
    window: Any,
) -> tuple[Tensor, Tensor]:
    """Step 2: both images on the network grid, normalised as the model expects."""
    dev = inputs.fixed.device
    shape_f = tuple(int(s) for s in fixed.shape)
    aligned = tuple(moving.shape) == shape_f and np.allclose(
        inputs.fixed_to_moving, np.eye(4), atol=1e-6
    )
    if shape_g == shape_f:
        fixed_g = inputs.fixed
        grid = None if aligned else identity_grid(shape_g, device=dev, dtype=torch.float64)
    else:
        grid = cell_centres(shape_g, step, dev)
        fixed_g = sample(inputs.fixed[None, None], grid, "bilinear", None)
    if grid is None:
        moving_g = inputs.moving[0, 0]
    else:
        where = apply_affine(inputs.fixed_to_moving, grid)
        moving_g = sample(inputs.moving, where, "bilinear", inputs.mov_min)
    fixed_n = _normalise(fixed_g, window, inputs.fix_min)[None, None].contiguous()
    moving_n = _normalise(moving_g, window, inputs.mov_min)[None, None].contiguous()
    return moving_n, fixed_n


def _whole_map(v: Tensor, a_f: np.ndarray, world_map: np.ndarray) -> tuple[Tensor, Tensor]:
    """``u(p) = T(p + L_f v) - p`` (X, Y, Z, 3) in mm and the Jacobian determinant of
    ``p -> p + u(p)`` from ``v`` (1, 3, *S) in fixed voxels."""
    dev = v.device
    lin = torch.as_tensor(a_f[:3, :3], dtype=torch.float64, device=dev)
    m_t = torch.as_tensor(world_map[:3, :3], dtype=torch.float64, device=dev)
    disp = torch.einsum("ij,j...->i...", m_t @ lin, v[0].double())
    if not np.allclose(world_map, np.eye(4)):
        # (T - I) applied to p = A_f x: affine in x, added without a dense world grid
        ident = identity_grid(v.shape[2:], device=dev, dtype=torch.float64)
        shift = (world_map - np.eye(4)) @ a_f
        disp = disp + apply_affine(shift, ident)
    jac = jacobian_determinant(v)[0] * float(np.linalg.det(world_map[:3, :3]))
    return disp.movedim(0, -1).float(), jac


def _warp_outputs(
    inputs: _Inputs, v: Tensor, moving_label: Volume | None, moving: Volume
) -> tuple[Tensor, Tensor, np.ndarray | None, np.ndarray | None]:
    """Step 5: moving image and labels before (identity world map) and after (whole map)."""
    dev = v.device
    shape_f = tuple(v.shape[2:])
    ident = identity_grid(shape_f, device=dev, dtype=torch.float64)
    where = apply_affine(inputs.fixed_to_moving, ident + v[0].double())
    identity_world = tuple(moving.shape) == shape_f and np.allclose(
        inputs.world_only, np.eye(4), atol=1e-6
    )
    before = None if identity_world else apply_affine(inputs.world_only, ident)
    del ident
    mov = inputs.moving
    moving_on_fixed = (
        mov[0, 0] if before is None else sample(mov, before, "bilinear", inputs.mov_min)
    )
    warped = sample(mov, where, "bilinear", inputs.mov_min)
    if moving_label is None:
        return warped, moving_on_fixed, None, None
    lab_t, lab_dtype = label_tensor(moving_label.array, dev), np.asarray(moving_label.array).dtype

    def labels_at(coords: Tensor | None) -> np.ndarray:
        if coords is None:
            return np.array(moving_label.array, copy=True)
        return sample(lab_t, coords, "nearest", 0.0).round().cpu().numpy().astype(lab_dtype)

    return warped, moving_on_fixed, labels_at(where), labels_at(before)


@torch.no_grad()
def register_volumes(
    model: torch.nn.Module,
    moving: Volume,
    fixed: Volume,
    moving_label: Volume | None = None,
    fixed_label: Volume | None = None,
    device: str | torch.device = "cpu",
    *,
    options: RegistrationOptions | None = None,
    return_levels: bool = False,
    fixed_mask: Volume | None = None,
    moving_mask: Volume | None = None,
    **changes: Any,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (both in world space) with ``model``.

    ``options`` (default :class:`~ranreg.options.RegistrationOptions`: affine + network +
    instance optimisation for networks), updated by any ``changes`` given as keywords
    (``refine=0``, ``affine="none"``, ``precision="bf16"``, ...). See the module docstring
    for the steps and the geometry. ``return_levels`` also keeps the network's per-level
    output (``result.levels``, RAN models only) and the normalised fixed image on the
    network grid (``result.network_fixed``), for :func:`ranreg.figures.head_mask_figure`.
    ``fixed_mask`` (non-zero: inside) limits the similarity of the affine stage and of the
    optimisation to the voxels inside it, as ANTs' and elastix's fixed masks do; the
    network sees the whole images, and the field covers the whole fixed image.
    ``moving_mask`` likewise, on the moving image: only the fixed voxels that the current
    map sends inside it count (a region of the moving image to leave out, e.g. an
    artefact that the fixed image does not have).
    """
    start = time.perf_counter()
    opts = (options or RegistrationOptions()).with_(**changes)
    dev = resolve_device(device)
    check_inputs(model, moving, fixed)
    moving_label = align_labels(moving_label, moving, "moving")
    fixed_label = align_labels(fixed_label, fixed, "fixed")
    masks = (mask_on(fixed_mask, fixed, "fixed"), mask_on(moving_mask, moving, "moving"))
    neural = is_neural(model)
    trained_spacing, window = model_settings(model.config)
    spacing = opts.grid_spacing(trained_spacing, neural)
    refine_settings = opts.refine_settings(neural)
    model = model.to(dev).eval()

    # step 1: affine pre-alignment in world space
    t_affine = time.perf_counter()
    affine_settings = opts.affine_settings(neural)
    optimised = affine_settings.mode != "none" or refine_settings.steps > 0
    images = normalised_volumes(fixed, moving) if optimised else None
    for side, (given, mask) in enumerate(zip((fixed_mask, moving_mask), masks, strict=True)):
        if given is not None and mask is not None:
            name = _volume_name(given, ("fixed", "moving")[side] + " mask")
            _check_mask(mask, images, name, is_peer(model), side)
    initial = opts.initial_map()
    world_map = register_affine(
        fixed, moving, affine_settings, images, initial, fixed_mask=masks[0], moving_mask=masks[1]
    )
    affine_s = time.perf_counter() - t_affine
    _check_overlap(world_map, fixed, moving, affine_settings.mode)
    inputs = _load_inputs(fixed, moving, world_map, dev)

    # steps 2-3: the network on its grid
    shape_g, step = cell_grid(fixed, spacing)
    moving_n, fixed_n = _network_inputs(inputs, fixed, moving, shape_g, step, window)
    ddf_g, levels, network_s = _timed_network(model, moving_n, fixed_n, opts, return_levels)
    _check_network_output(model, ddf_g, shape_g)

    # step 4: instance optimisation from the network's field (or from zero)
    t_refine = time.perf_counter()
    v, report = _refined(fixed, moving, inputs, ddf_g, refine_settings, opts, images, masks)
    refine_s = time.perf_counter() - t_refine if report is not None else 0.0

    # step 5: outputs on the fixed grid
    arrays = _fixed_grid_outputs(inputs, v, moving_label, moving, fixed, world_map)
    synchronize(dev)
    return RegistrationResult(
        **arrays,
        runtime_s=time.perf_counter() - start,
        network_s=network_s,
        refine_s=refine_s,
        affine_s=affine_s,
        world_map=world_map,
        initial_map=initial,
        refine_report=report,
        fixed_affine=np.asarray(fixed.affine, dtype=np.float64).copy(),
        fixed_label=None if fixed_label is None else np.asarray(fixed_label.array),
        network_shape=shape_g,
        network_spacing=tuple(float(s * st) for s, st in zip(fixed.spacing, step, strict=True)),
        network_fixed=fixed_n[0, 0].cpu().numpy() if return_levels else None,
        levels=levels,
        fixed_mask_fraction=_fraction(masks[0]),
        moving_mask_fraction=_fraction(masks[1]),
    )


def _fixed_grid_outputs(
    inputs: _Inputs,
    v: Tensor,
    moving_label: Volume | None,
    moving: Volume,
    fixed: Volume,
    world_map: np.ndarray,
) -> dict[str, Any]:
    """Step 5: warped image and labels, the whole mapping in mm and in fixed voxels, its
    Jacobian determinant, and the moving image before registration, as float32 arrays."""
    warped, moving_on_fixed, warped_label, label_before = _warp_outputs(
        inputs, v, moving_label, moving
    )
    a_f = np.asarray(fixed.affine, dtype=np.float64)
    ddf_mm, jac = _whole_map(v, a_f, world_map)
    to_voxels = torch.as_tensor(np.linalg.inv(a_f[:3, :3]), dtype=torch.float32, device=v.device)
    ddf_vox = torch.einsum("ij,...j->...i", to_voxels, ddf_mm)

    def array(t: Tensor) -> np.ndarray:
        return t.cpu().numpy().astype(np.float32)

    return {
        "warped": array(warped),
        "ddf_mm": array(ddf_mm),
        "jacobian": array(jac),
        "warped_label": warped_label,
        "ddf_vox": array(ddf_vox),
        "moving_on_fixed": array(moving_on_fixed),
        "moving_label_on_fixed": label_before,
    }


def _timed_network(
    model: torch.nn.Module,
    moving_n: Tensor,
    fixed_n: Tensor,
    opts: RegistrationOptions,
    return_levels: bool,
) -> tuple[Tensor, Any, float]:
    """Step 3: the forward pass (with ``opts.tta``: one per flip, averaged), timed alone
    (device synchronised around it)."""
    dev = fixed_n.device
    synchronize(dev)
    t_net = time.perf_counter()
    ndim = fixed_n.dim() - 2
    flips = flip_sets(ndim) if opts.tta and is_neural(model) else [()]
    total, levels = None, None
    for axes in flips:
        dims = [2 + a for a in axes]
        ddf, out_levels = run_network(
            model,
            moving_n.flip(dims) if axes else moving_n,
            fixed_n.flip(dims) if axes else fixed_n,
            precision=opts.precision,
            channels_last=opts.channels_last,
            return_levels=return_levels and not axes,
        )
        if axes:  # back to the unflipped grid: flipped axes' components change sign
            ddf = ddf.flip(dims)
            ddf[:, list(axes)] *= -1
        else:
            levels = out_levels
        total = ddf if total is None else total + ddf
    synchronize(dev)
    assert total is not None
    return total / len(flips), levels, time.perf_counter() - t_net


def flip_sets(ndim: int) -> list[tuple[int, ...]]:
    """Every subset of the ``ndim`` spatial axes (``()`` first): the flips of ``--tta``."""
    return [tuple(a for a in range(ndim) if mask >> a & 1) for mask in range(2**ndim)]


def _refined(
    fixed: Volume,
    moving: Volume,
    inputs: _Inputs,
    ddf_g: Tensor,
    settings: RefineSettings,
    opts: RegistrationOptions,
    images: Any,
    masks: tuple[Tensor | None, Tensor | None] = (None, None),
) -> tuple[Tensor, RefineReport | None]:
    """Step 4: the field on the fixed grid, optimised from the network's (or from zero
    when the network gave none) unless optimisation is off."""
    shape_f = tuple(int(s) for s in fixed.shape)
    if settings.steps <= 0:
        same = tuple(ddf_g.shape[2:]) == shape_f
        return (ddf_g if same else resize_ddf(ddf_g, shape_f)), None
    start_field = ddf_g if bool(ddf_g.any()) else None
    args = (fixed, moving, inputs.fixed_to_moving, start_field, settings, opts.progress, images)
    v, report = refine_pair(*args, fixed_mask=masks[0], moving_mask=masks[1])
    return v.to(inputs.fixed.device), report


def _load_inputs(
    fixed: Volume, moving: Volume, world_map: np.ndarray, dev: torch.device
) -> _Inputs:
    a_f = np.asarray(fixed.affine, dtype=np.float64)
    a_m_inv = np.linalg.inv(np.asarray(moving.affine, dtype=np.float64))
    mov = torch.from_numpy(np.ascontiguousarray(moving.array, dtype=np.float32)).to(dev)
    fix = torch.from_numpy(np.ascontiguousarray(fixed.array, dtype=np.float32)).to(dev)
    return _Inputs(
        moving=mov[None, None],
        fixed=fix,
        mov_min=float(mov.min()),
        fix_min=float(fix.min()),
        fixed_to_moving=a_m_inv @ world_map @ a_f,
        world_only=a_m_inv @ a_f,
    )


def _check_network_output(model: torch.nn.Module, ddf: Tensor, shape: tuple[int, ...]) -> None:
    """A wrong shape or a non-finite value would be written as a wrong answer: refuse."""
    name = getattr(model, "source", model.config.get("name"))
    if tuple(ddf.shape) != (1, 3, *shape):
        raise RanregError(
            f"model {name} returned a DDF of shape {tuple(ddf.shape)}, expected {(1, 3, *shape)}"
        )
    if not bool(torch.isfinite(ddf).all()):
        raise RanregError(f"model {name} returned non-finite displacements (NaN or inf)")
