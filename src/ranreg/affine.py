"""Affine pre-alignment in world space: the first step of ``ranreg register``.

The transform maps a fixed world point ``p`` (RAS+ mm) to the moving world point
``q = M (p - c) + c + t``, with ``c`` the fixed image's centre of mass. It starts from the
centres of mass (``M = I``, ``t = c_moving - c``), then optimises a rigid stage (rotation
vector and translation) and, for ``mode="affine"``, an affine stage (a free 3x3 matrix),
each coarse to fine on cell grids of the fixed image's field of view (16, 8, then 4 mm or
the fixed spacing if coarser; a level with too many cells is left out). On a level where
the fixed image is under :data:`MIN_AXIS_CELLS` cells thick (a slab), the parameters that
level cannot measure (a shift across the slab, tilts out of it) keep their values.
The similarity is local NCC for images of one modality and mutual information for a CT
registered to anything else (``similarity="auto"``).

The result is a 4x4 matrix in world (RAS+) coordinates; :func:`write_itk_affine` writes it
as an ITK transform file (LPS), the format ANTs, SimpleITK and 3D Slicer read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ranreg.adam import DecayingAdam
from ranreg.data.io import Volume
from ranreg.errors import RanregError
from ranreg.geometry import area_downsample, cell_centres, cell_grid, sample
from ranreg.similarity import (
    build_similarity,
    is_ct,
    normalised_volumes,
    with_mask,
    with_moving_mask,
)

__all__ = [
    "AFFINE_MODES",
    "SIMILARITIES",
    "AffineSettings",
    "register_affine",
    "rotation_matrix",
    "write_itk_affine",
    "read_itk_affine",
    "check_world_map",
]

AFFINE_MODES = ("none", "rigid", "affine")
SIMILARITIES = ("auto", "lncc", "mi")
#: RAS <-> LPS: ITK's world frame has x and y negated.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: the most cells a level may have (finer levels are coarsened to fit: time per step)
MAX_CELLS = 160_000
#: a fixed axis with fewer cells than this at a level is too thin there to show a shift
#: along it or a tilt out of it: those parameters keep their values at that level
MIN_AXIS_CELLS = 4


@dataclass(frozen=True)
class AffineSettings:
    """How the affine stage runs (chosen on the validation cases, docs/registration.md).

    ``levels``: cell sizes in mm, coarse to fine (a level finer than the fixed image's
    spacing runs at that spacing). ``iterations``: Adam steps per level and stage.
    ``starts_deg``: if > 0, rotations by that angle about each axis are also tried at the
    coarsest level (0 by default: rotations up to 45 degrees converge from the identity on
    the validation scans).
    """

    mode: str = "affine"
    similarity: str = "auto"
    levels: tuple[float, ...] = (16.0, 8.0, 4.0)
    iterations: tuple[int, ...] = (40, 40, 20)
    starts_deg: float = 0.0
    window: int = 5

    def check(self) -> None:
        if self.mode not in AFFINE_MODES:
            raise RanregError(f"affine must be one of {', '.join(AFFINE_MODES)}, got {self.mode!r}")
        if self.similarity not in SIMILARITIES:
            raise RanregError(
                f"similarity must be one of {', '.join(SIMILARITIES)}, got {self.similarity!r}"
            )
        if len(self.levels) != len(self.iterations) or not self.levels:
            raise RanregError("affine levels and iterations must be non-empty and of equal length")
        if not all(s > 0 and math.isfinite(s) for s in self.levels):
            raise RanregError(f"affine levels must be positive mm, got {self.levels}")
        if not all(isinstance(n, int) and n >= 0 for n in self.iterations):
            raise RanregError(f"affine iterations must be integers >= 0, got {self.iterations}")


def rotation_matrix(rotvec: Tensor) -> Tensor:
    """The rotation ``exp([r]_x)`` of a rotation vector ``r`` (3,), differentiable."""
    zero = rotvec.new_zeros(())
    x, y, z = rotvec.unbind()
    skew = torch.stack(
        [torch.stack([zero, -z, y]), torch.stack([z, zero, -x]), torch.stack([-y, x, zero])]
    )
    return torch.linalg.matrix_exp(skew)


@dataclass
class _Level:
    """One resolution: fixed cell centres (world mm, relative to the centre ``c``), the
    fixed image on them, the moving image and its world-to-voxel map, the similarity."""

    points: Tensor  # (3, N) world - c
    shape: tuple[int, int, int]
    moving: Tensor  # (1, C, *S_m): the image, and the moving mask as channel 1 if given
    world_to_moving: Tensor  # (4, 4) float32, relative to c
    similarity: Callable[..., Tensor]
    spacing: float
    thin: Tensor  # (3, k): orthonormal world directions of the fixed axes too thin here

    def warp(self, matrix: Tensor, shift: Tensor) -> Tensor:
        """The moving image at ``M p + t`` (relative to ``c``) for every cell, (1, C, *S):
        linear, fading to zero over the voxel beyond its outer voxel centres (a gradient
        where it leaves the field of view); on a level with thin axes, by the fixed cells'
        rule instead (:func:`~ranreg.geometry.sample`: the border value within half a
        voxel, zero beyond), as the fade would dim a slab one cell thick and a one-voxel
        axis would read as endless, so that a slab registered to itself is best aligned
        by the identity."""
        q = matrix @ self.points + shift[:, None]
        vox = self.world_to_moving[:3, :3] @ q + self.world_to_moving[:3, 3:]
        if self.thin.shape[1]:
            out = sample(self.moving, vox.view(3, *self.shape), "bilinear", 0.0)
            return out.view(1, -1, *self.shape)
        n = torch.tensor(self.moving.shape[2:], dtype=vox.dtype)[:, None]
        grid = (vox * (2.0 / (n - 1).clamp_min(1)) - 1.0).flip(0).T
        grid = grid.reshape(1, *self.shape, 3)
        return F.grid_sample(
            self.moving, grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )

    def loss(self, matrix: Tensor, shift: Tensor) -> Tensor:
        return with_moving_mask(self.similarity, self.warp(matrix, shift))


def _centre_of_mass(image: Tensor, affine: np.ndarray) -> np.ndarray:
    """Intensity-weighted centre (world mm) of a normalised image ``(1, 1, *S)``."""
    w = image[0, 0].double()
    total = float(w.sum())
    if total <= 0:
        idx = (np.asarray(image.shape[2:], dtype=np.float64) - 1) / 2
    else:
        idx = np.array(
            [
                float((w.sum(dim=[b for b in range(3) if b != a]) * torch.arange(n)).sum()) / total
                for a, n in enumerate(w.shape)
            ]
        )
    return (np.asarray(affine) @ np.append(idx, 1.0))[:3]


def _make_level(
    fixed: Tensor,
    fixed_vol: Volume,
    moving: Tensor,
    moving_affine: np.ndarray,
    spacing: float,
    centre: np.ndarray,
    similarity: str,
    window: int,
    masks: tuple[Tensor | None, Tensor | None] = (None, None),
) -> _Level:
    """Both images at about ``spacing`` mm: the fixed image averaged over blocks and sampled
    at the cell centres, the moving image averaged over blocks (sampled while optimising);
    the fixed and moving masks, if given, each with its image (the cells at least half
    inside)."""
    fixed_mask, moving_mask = masks
    space = spacing
    shape, step = cell_grid(fixed_vol, (space, space, space))
    both = with_mask(fixed, fixed_mask)
    fixed_small, fixed_small_affine = area_downsample(both, fixed_vol.affine, space)
    centres = cell_centres(shape, step, "cpu").reshape(3, -1)
    world = torch.as_tensor(fixed_vol.affine, dtype=torch.float64)
    points = world[:3, :3] @ centres + world[:3, 3:]
    to_small = torch.as_tensor(np.linalg.inv(fixed_small_affine), dtype=torch.float64)
    vox = (to_small[:3, :3] @ points + to_small[:3, 3:]).reshape(3, *shape)
    on_cells = sample(fixed_small, vox, "bilinear", 0.0).view(-1, *shape)
    fixed_level = on_cells[:1][None].float()
    region = None if fixed_mask is None else (on_cells[1:] >= 0.5)[None].float()
    both_m = with_mask(moving, moving_mask)
    moving_small, moving_small_affine = area_downsample(both_m, moving_affine, space)
    shift = np.eye(4)
    shift[:3, 3] = centre
    w2m = np.linalg.inv(moving_small_affine) @ shift
    return _Level(
        points=(points - torch.as_tensor(centre)[:, None]).float(),
        shape=shape,
        moving=moving_small.float(),
        world_to_moving=torch.as_tensor(w2m, dtype=torch.float32),
        similarity=build_similarity(similarity, fixed_level, window, region),
        spacing=space,
        thin=_thin_directions(fixed_vol.affine, shape),
    )


def _thin_directions(affine: np.ndarray, shape: Sequence[int]) -> Tensor:
    """Orthonormal world directions ``(3, k)`` of the axes with fewer than
    :data:`MIN_AXIS_CELLS` cells (a slab's normal; ``k = 0`` for a usual scan)."""
    cols = [
        np.asarray(affine, dtype=np.float64)[:3, a] for a in range(3) if shape[a] < MIN_AXIS_CELLS
    ]
    if not cols:
        return torch.zeros(3, 0)
    q, _ = np.linalg.qr(np.stack(cols, axis=1))
    return torch.as_tensor(q, dtype=torch.float32)


@torch.no_grad()
def _hold_thin(thin: Tensor, start: list[Tensor], params: list[Tensor]) -> None:
    """Undo the changes since ``start`` that a level with thin axes cannot measure: shifts
    along them, rotations and affine parts that tilt them (a rotation about the one thin
    axis keeps the slab's plane and stays free). Adam moves a parameter whose gradient is
    nearly zero by its full step, so an unmeasurable one would otherwise drift."""
    k = thin.shape[1]
    if k == 0:
        return
    plane = torch.eye(3) - thin @ thin.T
    rotvec, shift, *extra = params
    r0, t0, *e0 = start
    rotvec.copy_(r0 + (thin @ (thin.T @ (rotvec - r0)) if k == 1 else 0.0))
    shift.copy_(t0 + plane @ (shift - t0))
    for e, e_start in zip(extra, e0, strict=True):
        e.copy_(e_start + plane @ (e - e_start) @ plane)


def _fit(
    level: _Level,
    rotvec: Tensor,
    shift: Tensor,
    extra: Tensor | None,
    steps: int,
) -> float:
    """Adam on the rigid (and, with ``extra``, affine) parameters at one level; returns
    the final loss."""
    # step sizes shrink with the level: about a tenth of a cell at the body's edge (~100 mm)
    groups = [(rotvec, level.spacing / 800.0), (shift, 0.1 * level.spacing)]
    if extra is not None:
        groups.append((extra, level.spacing / 3200.0))
    opt = DecayingAdam(groups, steps)
    params = [p for p, _ in groups]
    start = [p.detach().clone() for p in params]
    for _ in range(steps):
        matrix = rotation_matrix(rotvec) + (0 if extra is None else extra)
        level.loss(matrix, shift).backward()
        opt.step()
        _hold_thin(level.thin, start, params)
    with torch.no_grad():
        matrix = rotation_matrix(rotvec) + (0 if extra is None else extra)
        return float(level.loss(matrix, shift))


def _starts(degrees: float) -> list[np.ndarray]:
    """The identity and rotations by +-``degrees`` about each axis (rotation vectors)."""
    out = [np.zeros(3)]
    if degrees > 0:
        for axis in range(3):
            for sign in (1.0, -1.0):
                r = np.zeros(3)
                r[axis] = sign * math.radians(degrees)
                out.append(r)
    return out


def choose_similarity(fixed: Volume, moving: Volume, similarity: str) -> str:
    """``auto``: mutual information when exactly one image is CT (HU), else local NCC."""
    if similarity != "auto":
        return similarity
    return "mi" if is_ct(fixed.array) != is_ct(moving.array) else "lncc"


def _world_matrix(rotvec: Tensor, shift: Tensor, extra: Tensor | None, centre: np.ndarray):
    m = (rotation_matrix(rotvec) + (0 if extra is None else extra)).detach().double().numpy()
    out = np.eye(4)
    out[:3, :3] = m
    out[:3, 3] = centre + shift.detach().double().numpy() - m @ centre
    return out


def register_affine(
    fixed: Volume,
    moving: Volume,
    settings: AffineSettings | None = None,
    images: tuple[Tensor, Tensor] | None = None,
    initial: np.ndarray | None = None,
    fixed_mask: Tensor | None = None,
    moving_mask: Tensor | None = None,
) -> np.ndarray:
    """The 4x4 world (RAS+) map from fixed to moving points (see the module docstring).

    ``initial``: a world map to start from (an earlier affine, as ANTs takes
    ``--initial-moving-transform``) instead of the centres of mass; ``mode="none"``
    returns it as it is (the identity without it). Images are compared after
    :func:`~ranreg.similarity.robust_normalise` (``images``: the two already normalised,
    from :func:`~ranreg.similarity.normalised_volumes`). ``fixed_mask`` ``(1, 1, *fixed)``,
    0/1: the similarity counts only voxels inside it (the centres of mass stay the whole
    images'). ``moving_mask`` ``(1, 1, *moving)``, 0/1: likewise the fixed voxels that the
    current map sends inside it (ANTs' moving mask).
    """
    s = settings or AffineSettings()
    s.check()
    start = np.eye(4) if initial is None else check_world_map(initial)
    if s.mode == "none":
        return start.copy()
    # the map is optimised between the fixed image and the moving one seen through
    # ``start`` (its voxels at world points start^-1 q), then composed with ``start``
    seen = replace(moving, affine=np.linalg.inv(start) @ np.asarray(moving.affine))
    with torch.inference_mode(False), torch.enable_grad():
        images = images or normalised_volumes(fixed, moving)
        masks = (fixed_mask, moving_mask)
        found = _register(fixed, seen, s, images, initial is None, masks)
    return start @ found


def check_world_map(matrix: Any) -> np.ndarray:
    """``matrix`` as a 4x4 float64 world map: finite, last row (0, 0, 0, 1), invertible."""
    try:
        m = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError):
        raise RanregError(f"an affine world map must be a 4x4 matrix, got {matrix!r}") from None
    if m.shape != (4, 4) or not np.isfinite(m).all() or not np.allclose(m[3], [0, 0, 0, 1]):
        raise RanregError(f"an affine world map must be a finite 4x4 matrix, got {m.tolist()}")
    if abs(np.linalg.det(m[:3, :3])) < 1e-6:
        raise RanregError("the affine world map is singular (it flattens space)")
    return m


def _register(
    fixed: Volume,
    moving: Volume,
    s: AffineSettings,
    images: tuple[Tensor, ...],
    from_centres: bool = True,
    masks: tuple[Tensor | None, Tensor | None] = (None, None),
) -> np.ndarray:
    sim = choose_similarity(fixed, moving, s.similarity)
    fix, mov = images
    centre = _centre_of_mass(fix, fixed.affine)
    shift0 = _centre_of_mass(mov, moving.affine) - centre if from_centres else np.zeros(3)
    rotvec = torch.zeros(3, requires_grad=True)
    shift = torch.tensor(shift0, dtype=torch.float32, requires_grad=True)
    extra = torch.zeros(3, 3, requires_grad=True) if s.mode == "affine" else None
    for i, (spacing, steps) in enumerate(plan_levels(fixed, s.levels, s.iterations)):
        level = _make_level(fix, fixed, mov, moving.affine, spacing, centre, sim, s.window, masks)
        if i == 0:
            _best_start(level, rotvec, shift, steps, s.starts_deg)
            _fit(level, rotvec, shift, None, steps)  # rigid first: an affine fit from a poor
        _fit(level, rotvec, shift, extra, steps)  # start can shear instead of rotating
    return _world_matrix(rotvec, shift, extra, centre)


def plan_levels(
    fixed: Volume, levels: Sequence[float], iterations: Sequence[int], max_cells: int = MAX_CELLS
) -> list[tuple[float, int]]:
    """The levels that run, coarse to fine: none finer than the fixed image's voxels, and
    a level with more than ``max_cells`` cells over the fixed field of view is left out
    (its cost), unless it is the coarsest."""
    fov = float(np.prod(np.asarray(fixed.shape) * np.asarray(fixed.spacing)))
    out: list[tuple[float, int]] = []
    for spacing, steps in sorted(zip(levels, iterations, strict=True), key=lambda x: -x[0]):
        space = max(float(spacing), float(min(fixed.spacing)))
        if out and (fov / space**3 > max_cells or space >= out[-1][0]):
            continue
        out.append((space, int(steps)))
    return out


def _best_start(level: _Level, rotvec: Tensor, shift: Tensor, steps: int, deg: float) -> None:
    """Try the rotated starts for a third of ``steps`` each; keep the best in place."""
    trials = _starts(deg)
    if len(trials) == 1:
        return
    best: tuple[float, Tensor, Tensor] | None = None
    for r0 in trials:
        r = torch.tensor(r0, dtype=torch.float32, requires_grad=True)
        t = shift.detach().clone().requires_grad_(True)
        loss = _fit(level, r, t, None, max(steps // 3, 1))
        if best is None or loss < best[0]:
            best = (loss, r.detach(), t.detach())
    assert best is not None
    with torch.no_grad():
        rotvec.copy_(best[1])
        shift.copy_(best[2])


def write_itk_affine(path: str | Path, matrix_ras: np.ndarray) -> Path:
    """Write a fixed-to-moving world (RAS+) map as an ITK transform file (LPS).

    ITK's ``AffineTransform_double_3_3`` maps a fixed physical point ``x`` (LPS) to
    ``A (x - c) + c + t``; with centre ``c = 0`` the parameters are the 9 matrix entries
    (row by row) and the translation. ANTs (``-t affine.txt``), SimpleITK
    (``ReadTransform``) and 3D Slicer read it as the fixed-to-moving transform, the same
    direction ``ddf.nii.gz`` uses.
    """
    lps = RAS_TO_LPS @ np.asarray(matrix_ras, dtype=np.float64) @ RAS_TO_LPS
    values = [*lps[:3, :3].ravel(), *lps[:3, 3]]
    text = (
        "#Insight Transform File V1.0\n#Transform 0\n"
        "Transform: AffineTransform_double_3_3\n"
        f"Parameters: {' '.join(repr(float(v)) for v in values)}\n"
        "FixedParameters: 0 0 0\n"
    )
    p = Path(path)
    p.write_text(text, encoding="utf-8")
    return p


def read_itk_affine(path: str | Path) -> np.ndarray:
    """A linear ITK transform file as its fixed-to-moving world (RAS+) 4x4 matrix.

    Any file SimpleITK's ``ReadTransform`` reads (``.txt``/``.tfm``, ANTs' binary
    ``0GenericAffine.mat``, ``.h5``) holding an affine, rigid or similarity transform or a
    composite of them; a deformable one is refused. The matrix is found from where the
    transform sends the origin and the three unit points (LPS).
    """
    from ranreg.data.sitk_runtime import QuietITK, import_simpleitk, itk_reason

    sitk = import_simpleitk(path)
    if not Path(path).is_file():
        raise RanregError(f"{path}: transform file not found")
    with QuietITK(sitk):
        try:
            tx = sitk.ReadTransform(str(path))
        except RuntimeError as exc:
            raise RanregError(f"{path}: not an ITK transform file ({itk_reason(exc)})") from None
    if tx.GetDimension() != 3 or not tx.IsLinear():
        raise RanregError(f"{path}: not a 3D linear transform ({tx.GetName()}); give an affine one")
    moved = [np.array(tx.TransformPoint(x)) for x in [(0.0, 0.0, 0.0), *np.eye(3).tolist()]]
    lps = np.eye(4)
    lps[:3, 3] = moved[0]
    lps[:3, :3] = np.stack(moved[1:], axis=1) - moved[0][:, None]
    return RAS_TO_LPS @ lps @ RAS_TO_LPS


def compose_note(levels: Sequence[float]) -> str:
    """Human-readable description of the levels (for reports)."""
    return " -> ".join(f"{s:g} mm" for s in levels)
