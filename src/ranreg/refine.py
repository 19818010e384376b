"""Instance optimisation: fit one pair's displacement field by gradient descent.

A network predicts a field in one forward pass; instance optimisation then fits the field
to the pair at hand (as ConvexAdam and other Learn2Reg entries do), minimising
``-local NCC(fixed, moving o u) + weight * |grad u|^2`` with Adam. It needs no labels and
no training and runs after the affine pre-alignment in ``ranreg register`` (the default)
and ``ranreg evaluate``.

Design, for speed and accuracy on a CPU:

* **Multi-level**: cell grids of about 8, 4, then 2 mm (:attr:`RefineSettings.levels`) over
  the fixed image's field of view; a level never has more than ``max_cells`` cells (it is
  coarsened to fit) nor cells finer than the fixed image's voxels (so a 4 mm image runs
  8 and 4 mm, a 3 mm image 8, 4 and 3 mm). Both images are
  averaged over blocks before sampling (no aliasing) and normalised by percentiles.
* **Coarse parameters**: the correction is held on a grid ``control`` times coarser than the
  level and upsampled (trilinear), added to the field the level starts from; fewer
  parameters, a smoother field, fast steps. The regulariser acts on the whole field.
* **Cheap similarity**: the fixed image's local statistics are computed once
  (:class:`ranreg.similarity.LocalNCC`), box filters by cumulative sums.
* **Network start**: the field the network predicted is kept only if it makes the
  similarity at the first level better than no deformation; the step size decays to zero
  at each level, so an already aligned pair stays still.
* **Diffeomorphic mode**: the parameters are a stationary velocity field integrated by
  scaling and squaring (7 squarings) on the parameter grid.

The defaults were chosen on the validation cases only (docs/registration.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from ranreg.adam import DecayingAdam
from ranreg.data.io import Volume
from ranreg.errors import RanregError
from ranreg.geometry import apply_affine, area_downsample, cell_centres, cell_grid, sample
from ranreg.losses import gradient_l2
from ranreg.similarity import (
    BODY_THRESHOLD,
    LocalNCC,
    normalised_volumes,
    with_mask,
    with_moving_mask,
)
from ranreg.spatial import integrate_velocity, resize_ddf, warp

__all__ = [
    "DEFAULT_STEPS",
    "DEFAULT_WEIGHT",
    "RefineSettings",
    "check_refine",
    "refine_ddf",
    "refine_pair",
    "integrate_velocity",
]

#: Adam steps per level of the default pipeline (validated, docs/registration.md).
DEFAULT_STEPS = 50
DEFAULT_WEIGHT = 1.0
DEFAULT_WINDOW = 5
DEFAULT_LR = 0.1


def check_refine(steps: int, weight: float) -> None:
    """One-line errors for settings that cannot work."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise RanregError(f"refine steps must be an integer >= 0, got {steps!r}")
    if not (weight >= 0 and weight < float("inf")):
        raise RanregError(f"refine weight must be a finite number >= 0, got {weight!r}")


@dataclass(frozen=True)
class RefineSettings:
    """Instance-optimisation settings (defaults validated, see the module docstring).

    ``steps``: Adam steps per level (0: no optimisation). ``weight``: diffusion weight.
    ``levels``: cell sizes in mm, coarse to fine. ``control``: parameter grid coarsening.
    ``lr``: Adam step in parameter-grid voxels. ``max_cells``: size bound of a level.
    ``max_work``: cells x steps bound of each level after the first (a level with more
    cells gets fewer steps, at least 10: the time a step takes grows with the cells).
    """

    steps: int = DEFAULT_STEPS
    weight: float = DEFAULT_WEIGHT
    levels: tuple[float, ...] = (8.0, 4.0, 2.0)
    window: int = DEFAULT_WINDOW
    lr: float = DEFAULT_LR
    control: int = 2
    diffeomorphic: bool = False
    max_cells: int = 1_100_000
    max_work: int | None = 12_000_000

    def check(self) -> None:
        check_refine(self.steps, self.weight)
        if not self.levels or not all(math.isfinite(s) and s > 0 for s in self.levels):
            raise RanregError(f"refine levels must be positive mm, got {self.levels}")
        if self.window < 1 or self.window % 2 == 0:
            raise RanregError(f"refine window must be an odd number >= 1, got {self.window}")
        if self.control < 1 or not (self.lr > 0 and math.isfinite(self.lr)):
            raise RanregError("refine control must be >= 1 and lr a positive number")

    def with_steps(self, steps: int) -> RefineSettings:
        return replace(self, steps=steps)


def _fit_level(
    fixed: Tensor,
    moving: Tensor,
    base: Tensor,
    s: RefineSettings,
    progress: Callable[[float], None] | None = None,
    region: Tensor | None = None,
) -> Tensor:
    """Fit ``base`` (1, 3, *S) plus a coarse correction to one level for ``s.steps`` steps,
    the similarity within ``region`` (a fixed mask on the level) if given; returns the
    field."""
    shape = tuple(base.shape[2:])
    ctrl_shape = tuple(max(2, math.ceil(n / s.control)) for n in shape)
    sim = LocalNCC(fixed, s.window, region)
    if s.diffeomorphic:
        start = resize_ddf(base, ctrl_shape)

        def field(c: Tensor) -> Tensor:
            return resize_ddf(integrate_velocity(start + c), shape)
    else:

        def field(c: Tensor) -> Tensor:
            return base + resize_ddf(c, shape)

    c = torch.zeros(1, 3, *ctrl_shape, requires_grad=True)
    opt = DecayingAdam([(c, s.lr)], s.steps)
    for _ in range(s.steps):
        u = field(c)
        similarity = with_moving_mask(sim, warp(moving, u))
        loss = similarity + s.weight * gradient_l2(u)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(-float(similarity.detach()))
    with torch.no_grad():
        return field(c).detach()


def refine_ddf(
    ddf: Tensor,
    moving: Tensor,
    fixed: Tensor,
    steps: int = DEFAULT_STEPS,
    *,
    weight: float = DEFAULT_WEIGHT,
    window: int = DEFAULT_WINDOW,
    lr: float = DEFAULT_LR,
    control: int = 1,
    diffeomorphic: bool = False,
    mask_threshold: float | None = BODY_THRESHOLD,
) -> Tensor:
    """Fit ``ddf`` to one pair on one grid and return the refined field (detached, float32).

    Args:
        ddf: ``(1, 3, *S)`` starting field in voxels (:func:`warp`'s convention: the moving
            image is sampled at ``x + ddf(x)``).
        moving, fixed: ``(1, 1, *S)`` images on that grid, intensities in ``[0, 1]``.
        steps: Adam steps (0 returns ``ddf`` unchanged).
        weight: weight of the diffusion regulariser (mean squared forward differences).
        window: local NCC window (odd, voxels per axis).
        lr: Adam step size, in parameter-grid voxels.
        control: parameter grid coarsening (1: one parameter per voxel).
        mask_threshold: NCC is averaged where ``fixed > mask_threshold``; None: everywhere.
    """
    check_refine(steps, weight)
    if steps == 0:
        return ddf.detach().float().clone()
    s = RefineSettings(steps=steps, weight=weight, window=window, lr=lr, control=control)
    s = replace(s, diffeomorphic=diffeomorphic)
    s.check()
    with torch.inference_mode(False), torch.enable_grad():
        fixed, moving = fixed.detach().float().clone(), moving.detach().float().clone()
        base = ddf.detach().float().clone()
        if mask_threshold is None:
            # LocalNCC masks fixed > 0.1; lifting the image keeps every voxel (cc is shift
            # invariant)
            fixed = fixed - fixed.min() + 1.0
        elif mask_threshold != BODY_THRESHOLD:
            fixed = fixed + (BODY_THRESHOLD - mask_threshold)
        return _fit_level(fixed, moving, base, s)


@dataclass
class RefineReport:
    """What :func:`refine_pair` did: levels (mm, cells, steps); on the first level the
    similarity (local NCC, 0..1) of the network's field (``ncc_start``) and of none
    (``ncc_zero``), hence whether the start was kept; on the finest level the similarity
    after the affine stage alone (``ncc_affine``) and at the end (``ncc_final``)."""

    levels: list[tuple[float, tuple[int, ...], int]]
    start_kept: bool
    ncc_start: float
    ncc_zero: float
    ncc_final: float
    ncc_affine: float = float("nan")


def level_steps(s: RefineSettings, shape: tuple[int, ...], first: bool) -> int:
    """Steps of one level: ``steps``, fewer on a big level after the first (``max_work``)."""
    if first or s.max_work is None:
        return s.steps
    return min(s.steps, max(10, s.max_work // int(np.prod(shape))))


def plan_levels(fixed: Volume, s: RefineSettings) -> list[tuple[float, tuple[int, int, int]]]:
    """(spacing, cell grid shape) of each level that runs, coarse to fine; levels that
    would be finer than the fixed voxels or exceed ``max_cells`` are coarsened, and equal
    ones merge."""
    fov = np.asarray(fixed.shape) * np.asarray(fixed.spacing)
    floor = max(float(min(fixed.spacing)), (float(np.prod(fov)) / s.max_cells) ** (1 / 3))
    out: dict[tuple[int, int, int], float] = {}
    for spacing in sorted(s.levels, reverse=True):
        space = max(float(spacing), floor)
        shape, _ = cell_grid(fixed, (space, space, space))
        shape = tuple(min(a, b) for a, b in zip(shape, fixed.shape, strict=True))
        out.setdefault(shape, space)  # type: ignore[arg-type]
    return [(space, shape) for shape, space in out.items()]


def _level_images(
    fixed: Tensor,
    fixed_vol: Volume,
    moving: Tensor,
    moving_affine: np.ndarray,
    fixed_to_moving: np.ndarray,
    shape: tuple[int, int, int],
    space: float,
    masks: tuple[Tensor | None, Tensor | None] = (None, None),
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Fixed and (affinely mapped) moving images, block-averaged, on one level's cells,
    and the fixed mask there (the cells at least half inside it), if one is given; a
    moving mask, if given, is a second channel of the moving image (warped with it)."""
    fixed_mask, moving_mask = masks
    step = np.asarray(fixed_vol.shape, dtype=np.float64) / np.asarray(shape)
    centres = cell_centres(shape, step, "cpu")
    both = with_mask(fixed, fixed_mask)
    small_f, aff_f = area_downsample(both, fixed_vol.affine, space)
    both_m = with_mask(moving, moving_mask)
    small_m, aff_m = area_downsample(both_m, moving_affine, space)
    to_f = np.linalg.inv(aff_f) @ fixed_vol.affine
    to_m = np.linalg.inv(aff_m) @ np.asarray(moving_affine) @ fixed_to_moving
    f = sample(small_f, apply_affine(to_f, centres), "bilinear", 0.0).view(-1, *shape)
    m = sample(small_m, apply_affine(to_m, centres), "bilinear", 0.0).view(1, -1, *shape)
    region = None if fixed_mask is None else (f[1:] >= 0.5)[None].float()
    return f[:1][None].float(), m.float(), region


def refine_pair(
    fixed: Volume,
    moving: Volume,
    fixed_to_moving: np.ndarray,
    start: Tensor | None,
    settings: RefineSettings,
    progress: bool = False,
    images: tuple[Tensor, Tensor] | None = None,
    fixed_mask: Tensor | None = None,
    moving_mask: Tensor | None = None,
) -> tuple[Tensor, RefineReport]:
    """Multi-level instance optimisation of one pair; returns ``v`` ``(1, 3, *fixed)`` in
    fixed voxels along the fixed axes (moving voxel ``fixed_to_moving (x + v(x))``) and a
    report. ``start``: the network's field on any cell grid of the fixed image, or None.
    ``images``: both images already normalised
    (:func:`~ranreg.similarity.normalised_volumes`). ``fixed_mask`` ``(1, 1, *fixed)``,
    0/1: the similarity counts only voxels inside it (the field still covers the image);
    ``moving_mask`` ``(1, 1, *moving)``: only the fixed voxels the field sends inside it."""
    settings.check()
    images = images or normalised_volumes(fixed, moving)
    masks = (fixed_mask, moving_mask)
    with torch.inference_mode(False), torch.enable_grad():
        return _refine_pair(
            fixed, moving, fixed_to_moving, start, settings, progress, images, masks
        )


def _refine_pair(
    fixed: Volume,
    moving: Volume,
    fixed_to_moving: np.ndarray,
    start: Tensor | None,
    s: RefineSettings,
    progress: bool,
    images: tuple[Tensor, ...],
    masks: tuple[Tensor | None, Tensor | None],
) -> tuple[Tensor, RefineReport]:
    from tqdm import tqdm

    fix, mov = images
    levels = plan_levels(fixed, s)
    plan = [level_steps(s, shape, i == 0) for i, (_, shape) in enumerate(levels)]
    bar = tqdm(total=sum(plan), desc="optimising", disable=not progress, leave=False)

    def tick(ncc: float) -> None:
        bar.update(1)
        if bar.n % 5 == 0:
            bar.set_postfix_str(f"local NCC {ncc:.4f}")

    field = torch.zeros(1, 3, *levels[0][1])
    report = RefineReport([], False, float("nan"), float("nan"), float("nan"))
    with bar:
        for i, (space, shape) in enumerate(levels):
            f, m, region = _level_images(
                fix, fixed, mov, moving.affine, fixed_to_moving, shape, space, masks
            )
            if i == 0:
                field = _choose_start(f, m, start, s.window, report, region)
            else:
                field = resize_ddf(field, shape)
            field = _fit_level(f, m, field, s.with_steps(plan[i]), tick, region)
            report.levels.append((space, shape, plan[i]))
        with torch.no_grad():
            sim = LocalNCC(f, s.window, region)
            report.ncc_affine = -float(with_moving_mask(sim, m))  # the finest level, like the end
            report.ncc_final = -float(with_moving_mask(sim, warp(m, field)))
    shape_f = tuple(int(n) for n in fixed.shape)
    v = field if tuple(field.shape[2:]) == shape_f else resize_ddf(field, shape_f)
    return v, report


def _choose_start(
    fixed: Tensor,
    moving: Tensor,
    start: Tensor | None,
    window: int,
    report: RefineReport,
    region: Tensor | None = None,
) -> Tensor:
    """The network's field on this level if it improves the similarity, else zero."""
    shape = tuple(fixed.shape[2:])
    zero = torch.zeros(1, 3, *shape)
    sim = LocalNCC(fixed, window, region)
    with torch.no_grad():
        report.ncc_zero = -float(with_moving_mask(sim, moving))
        if start is None:
            return zero
        base = resize_ddf(start.float().cpu(), shape)
        report.ncc_start = -float(with_moving_mask(sim, warp(moving, base)))
    report.start_kept = report.ncc_start > report.ncc_zero
    return base if report.start_kept else zero
