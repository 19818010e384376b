"""A registration's mapping as an object: apply it to other images, invert it, save it.

A :class:`Transform` holds a displacement field ``u`` in mm along the world (RAS+) axes on
a voxel grid (:class:`Grid`), the convention of ``ddf.nii.gz``
(:data:`ranreg.outputs.DDF_CONVENTION`): the point ``p`` of the grid's space (the *fixed*
space of a registration) corresponds to the point ``q = p + u(p)`` of the *moving* space.

* :meth:`Transform.apply` resamples an image that lives in moving space (any grid, any
  affine) onto a reference grid (default: the field's own grid):
  ``out(x) = image(A_image^-1 (p + u(p)))`` with ``p = A_ref x``. Between the field's grid
  points ``u`` is interpolated linearly; outside the field's grid it is extrapolated linearly
  from the border for one voxel, and constant (that value) further out.
* :meth:`Transform.inverse` computes the field ``w`` of the inverse mapping on a grid of
  the moving space (default: the registration's moving grid), ``q + w(q) = p`` where
  ``p + u(p) = q``, by fixed-point iteration, and reports the round-trip error
  ``|u(p) + w(p + u(p))|`` over the fixed grid (:meth:`Transform.round_trip`).
* :meth:`Transform.save` / :meth:`Transform.load` write and read ``ddf.nii.gz`` and a
  small ``transform.json``; ``load`` also reads any ``ranreg register`` result folder.

Coordinates are float64; the field is stored in float32 (as in ``ddf.nii.gz``) and
sampled with :func:`ranreg.geometry.sample` (the pipeline's own sampler), so applying a
result's transform to its moving image reproduces ``warped.nii.gz``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

from ranreg.data.io import Volume, spacing_from_affine
from ranreg.errors import RanregError
from ranreg.geometry import apply_affine, sample
from ranreg.grids import (
    INTERPOLATIONS,
    Grid,
    ImageLike,
    _as_grid,
    _sampler,
    as_volume,
    interpolation,
    read_grid,
)

__all__ = [
    "INTERPOLATIONS",
    "Grid",
    "ImageLike",
    "Transform",
    "as_volume",
    "interpolation",
    "read_grid",
]

#: The json that :meth:`Transform.save` writes next to ``ddf.nii.gz``.
TRANSFORM_JSON = "transform.json"


# ------------------------------------------------------------------------------ grids
@dataclass(eq=False)
class Transform:
    """The mapping ``p -> p + u(p)`` from a fixed space to a moving space.

    ``ddf_mm`` (X, Y, Z, 3): ``u`` in mm along the world (RAS+) axes at the points of
    ``grid`` (the fixed grid). ``target``: the grid of the moving image, where
    :meth:`inverse` defines the inverse by default (None when unknown). ``round_trip_mm``
    and ``inversion``: set on a transform made by :meth:`inverse` (see there).
    ``origin``: where it came from, for messages.
    """

    ddf_mm: np.ndarray
    grid: Grid
    target: Grid | None = None
    round_trip_mm: dict[str, Any] | None = None
    inversion: dict[str, Any] | None = None
    origin: str = ""
    _field: Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.ddf_mm = np.asarray(self.ddf_mm, dtype=np.float32)
        if self.ddf_mm.shape != (*self.grid.shape, 3):
            raise RanregError(
                f"{self.origin or 'transform'}: field of shape {self.ddf_mm.shape} does not "
                f"match its grid {(*self.grid.shape, 3)}"
            )

    # ---------------------------------------------------------------- reading and writing
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Transform:
        """Read a result folder of ``ranreg register`` or of :meth:`save` (or its
        ``ddf.nii.gz``). The moving grid comes from ``transform.json`` or ``metrics.json``
        (``moving_grid``, else the header of the file named by ``moving``) when known."""
        folder = Path(path)
        if folder.is_file() and folder.name.endswith((".nii", ".nii.gz")):
            folder, ddf_file = folder.parent, folder
        else:
            ddf_file = folder / "ddf.nii.gz"
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "transform folder not found"
            raise RanregError(f"{folder}: {what}")
        if not ddf_file.is_file():
            raise RanregError(
                f"{folder}: no ddf.nii.gz here; expected a folder written by `ranreg register`"
                " or Transform.save"
            )
        ddf, grid = _read_ddf(ddf_file)
        info = _read_json(folder / TRANSFORM_JSON) or _read_json(folder / "metrics.json")
        return cls(
            ddf,
            grid,
            target=_moving_grid(info, folder),
            round_trip_mm=info.get("round_trip_mm"),
            inversion=info.get("inversion"),
            origin=str(folder),
        )

    @classmethod
    def load_inverse(cls, path: str | os.PathLike[str]) -> Transform | None:
        """The inverse saved in a result folder by ``ranreg register --save-inverse``
        (``inverse_ddf.nii.gz`` on the moving grid, its round trip in ``metrics.json``),
        or None when the folder has none."""
        folder = Path(path)
        file = folder / "inverse_ddf.nii.gz"
        if not file.is_file():
            return None
        ddf, grid = _read_ddf(file)
        saved = _read_json(folder / "metrics.json").get("inverse") or {}
        fixed = nib.load(str(folder / "ddf.nii.gz")) if (folder / "ddf.nii.gz").is_file() else None
        return cls(
            ddf,
            grid,
            target=None if fixed is None else Grid(fixed.shape[:3], fixed.affine),
            round_trip_mm=saved.get("round_trip_mm"),
            inversion=saved.get("inversion"),
            origin=f"{file}",
        )

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``ddf.nii.gz`` (the ``ranreg register`` convention) and ``transform.json``
        (grids, round-trip error) into the new folder ``out_dir``, atomically."""
        from ranreg.atomic import new_output_dir
        from ranreg.outputs import save_ddf, write_json

        out = Path(out_dir)
        with new_output_dir(out) as tmp:
            save_ddf(tmp / "ddf.nii.gz", self.ddf_mm, self.grid.affine)
            write_json(tmp / TRANSFORM_JSON, self.info())
        return out

    def info(self) -> dict[str, Any]:
        """What :meth:`save` writes to ``transform.json``."""
        from ranreg.outputs import DDF_CONVENTION

        return {
            "origin": self.origin,
            "fixed_grid": self.grid.to_json(),
            "moving_grid": None if self.target is None else self.target.to_json(),
            "round_trip_mm": self.round_trip_mm,
            "inversion": self.inversion,
            "ddf_convention": DDF_CONVENTION,
        }

    # ---------------------------------------------------------------- evaluating u
    def _field_tensor(self) -> Tensor:
        if self._field is None:
            channels = np.ascontiguousarray(np.moveaxis(_extended(self.ddf_mm), -1, 0))
            self._field = torch.from_numpy(channels)[None]
        return self._field

    def displacement_at(self, world: Tensor) -> Tensor:
        """``u`` at world points ``(3, *T)`` (T of 3 dims), float64: linear between grid
        points and up to one voxel beyond the grid (extrapolated linearly from the border),
        the value there further out (:func:`_extended`)."""
        vox = apply_affine(np.linalg.inv(self.grid.affine), world) + 1.0
        return sample(self._field_tensor(), vox, "bilinear", None).double()

    def _displacement(self, grid: Grid, start: int, stop: int, world: Tensor) -> Tensor:
        if grid is self.grid or grid.same_as(self.grid):  # exact on the field's own grid
            return torch.from_numpy(self.ddf_mm[start:stop]).double().movedim(-1, 0)
        return self.displacement_at(world)

    def map_points(self, points_mm: np.ndarray) -> np.ndarray:
        """Map world points ``(N, 3)`` of the fixed space to the moving space."""
        p = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        world = torch.from_numpy(p.T.copy()).view(3, -1, 1, 1)
        q = world + self.displacement_at(world)
        return q.view(3, -1).T.numpy()

    # ---------------------------------------------------------------- resampling
    def apply(
        self,
        image: ImageLike,
        *,
        labels: bool = False,
        interp: str | None = None,
        reference: Grid | Volume | str | os.PathLike[str] | None = None,
    ) -> Volume:
        """Resample ``image`` (in moving space, any grid) onto ``reference`` (default: the
        field's grid): ``out(x) = image(A_image^-1 (p + u(p)))``, ``p = A_ref x``.

        ``interp``: ``linear`` (default), ``nearest`` or ``bspline`` (cubic B-spline,
        prefiltered); the output of linear and bspline is float32 (float64 kept), never
        rounded. ``labels``: a label map, resampled with nearest neighbour keeping its
        integer type (``interp`` may then only be ``nearest``). Outside the image: 0 for
        labels, the image minimum for images.
        """
        mode = interpolation(labels, interp)
        vol = as_volume(image, "image", labels=labels)
        ref = self.grid if reference is None else _as_grid(reference)
        values, dtype = _sampler(vol, mode, labels)
        out = np.empty(ref.shape, dtype=dtype)
        for start, stop, vox in self._mapped_voxels(ref, vol.affine):
            out[start:stop] = values(vox)
        return Volume(out, ref.affine.copy(), spacing_from_affine(ref.affine))

    def _mapped_voxels(
        self, ref: Grid, image_affine: np.ndarray
    ) -> Iterator[tuple[int, int, Tensor]]:
        """Slab by slab of ``ref``: ``start, stop`` and the voxel ``A_image^-1 (p + u(p))``
        ``(3, stop - start, Y, Z)`` of an image in moving space at each point ``p``."""
        to_image = np.linalg.inv(image_affine)
        for start, stop in ref.slabs():
            p = ref.points(start, stop)
            yield start, stop, apply_affine(to_image, p + self._displacement(ref, start, stop, p))

    def voxel_displacement(
        self,
        moving: Grid | Volume | str | os.PathLike[str] | None = None,
        reference: Grid | Volume | str | os.PathLike[str] | None = None,
    ) -> np.ndarray:
        """The mapping in voxel units, ``(X, Y, Z, 3)`` float32 on ``reference`` (default:
        the field's grid): at the voxel ``x``, ``A_moving^-1 (p + u(p)) - x`` with
        ``p = A_ref x``, i.e. the moving voxel that ``x`` corresponds to is ``x`` plus this,
        along the arrays' axes (Learn2Reg's displacement files, :mod:`ranreg.learn2reg`).
        ``moving``: the moving image or its grid (default: :attr:`target`)."""
        ref = self.grid if reference is None else _as_grid(reference)
        mov = self.target if moving is None else _as_grid(moving)
        if mov is None:
            raise RanregError(f"{self.origin or 'transform'}: the moving grid is not known")
        out = np.empty((*ref.shape, 3), dtype=np.float32)
        for start, stop, vox in self._mapped_voxels(ref, mov.affine):
            out[start:stop] = (vox - ref.indices(start, stop)).movedim(0, -1).numpy()
        return out

    # ---------------------------------------------------------------- inverse
    def linear_fit(self) -> np.ndarray:
        """The 4x4 affine map closest (least squares, on a sub-grid of at most 24 points
        per axis) to ``p -> p + u(p)``."""
        idx = [
            np.unique(np.linspace(0, n - 1, min(n, 24)).round()).astype(int)
            for n in self.grid.shape
        ]
        vox = np.stack(np.meshgrid(*idx, indexing="ij"), axis=-1).reshape(-1, 3).astype(float)
        p = vox @ self.grid.affine[:3, :3].T + self.grid.affine[:3, 3]
        q = p + self.ddf_mm[np.ix_(*idx)].reshape(-1, 3)
        coef, *_ = np.linalg.lstsq(np.c_[p, np.ones(len(p))], q, rcond=None)
        out = np.eye(4)
        out[:3, :3], out[:3, 3] = coef[:3].T, coef[3]
        return out

    def inverse(
        self,
        grid: Grid | Volume | str | os.PathLike[str] | None = None,
        *,
        iterations: int = 100,
        tolerance: float = 1e-3,
        mask: np.ndarray | Volume | None = None,
    ) -> Transform:
        """The inverse mapping as a :class:`Transform` on ``grid`` (default: the moving
        grid, :attr:`target`), with ``round_trip_mm`` and ``inversion`` filled in.

        For each point ``q`` of ``grid`` the point ``p = q + w(q)`` with ``p + u(p) = q``
        is found by the fixed-point iteration ``w <- -u(q + w)``, preconditioned with the
        inverse of the linear part ``L`` of the field's best-fit affine map ``F``
        (:meth:`linear_fit`): ``p <- p + L^-1 (q - p - u(p))``, started at ``F^-1 q``.
        Without an affine component (``L = I``) this is exactly ``w_{k+1} = -u(q + w_k)``;
        with one (e.g. a rotation of the affine stage) it still converges. ``u`` is
        interpolated linearly (outside the fixed grid: extrapolated for one voxel, then
        constant; see :meth:`displacement_at`). It stops when no point moves more than
        ``tolerance`` mm or after ``iterations`` steps; the points whose residual
        ``|p + u(p) - q|`` is still above ``tolerance`` (where the field's local rotation is
        far from the affine fit's, the iteration stalls) go on with Newton's method
        (:meth:`unmap_points`). ``inversion`` holds the steps taken, how many points went on
        with Newton, and the residual (mm); ``round_trip_mm`` the round-trip error
        (:meth:`round_trip`, inside ``mask`` on the fixed grid if given).
        """
        if iterations < 1 or not tolerance > 0:
            raise RanregError("inverse needs iterations >= 1 and a positive tolerance")
        target = self._inverse_grid(grid)
        start_map, precond = self._preconditioner()
        w = np.empty((*target.shape, 3), dtype=np.float32)
        steps, newton, residuals = 0, 0, []
        for start, stop in target.slabs():
            q = target.points(start, stop)
            p, k, _ = self._solve(q, apply_affine(start_map, q), precond, iterations, tolerance)
            p, residual, n = self._polish(q.reshape(3, -1), p.reshape(3, -1), tolerance)
            steps, newton = max(steps, k), newton + n
            residuals.append(residual.numpy().astype(np.float32))
            w[start:stop] = (p.reshape(q.shape) - q).movedim(0, -1).numpy()
        res = np.concatenate(residuals)
        inverse = Transform(w, target, target=self.grid, origin=f"inverse of {self.origin}")
        inverse.inversion = {
            "iterations": steps,
            "newton_points": newton,
            "converged": bool((res <= tolerance).all()),
            "tolerance_mm": tolerance,
            # points still off after both methods (no solution there: where the mapping
            # folds or does not reach the grid)
            "unconverged_fraction": float((res > tolerance).mean()),
            "residual_mm": {"mean": float(res.mean()), "max": float(res.max())},
        }
        inverse.round_trip_mm = self.round_trip(inverse, mask)
        return inverse

    def unmap_points(
        self,
        points_mm: np.ndarray,
        *,
        iterations: int = 50,
        tolerance: float = 1e-4,
        start: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The inverse mapping at world points ``q`` ``(N, 3)`` of the moving space alone:
        the fixed-space points ``p`` with ``p + u(p) = q`` (no inverse field, no moving grid
        needed). Newton's method from the best-fit affine map's inverse, with the Jacobian
        of ``p + u(p)`` by central differences and the step halved until the residual
        falls, so that it also converges where the field is strongly curved (the fixed
        point iteration of :meth:`inverse` may not). Returns ``p`` and the residual
        ``|p + u(p) - q|`` (mm) of each point. ``start``: first guesses ``(N, 3)``."""
        q = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        if start is None:
            start_map, _ = self._preconditioner()
            p = q @ start_map[:3, :3].T + start_map[:3, 3]
        else:
            p = np.array(start, dtype=np.float64).reshape(-1, 3)
        r = q - self.map_points(p)
        h = 0.25 * min(spacing_from_affine(self.grid.affine))
        for _ in range(iterations):
            err = np.linalg.norm(r, axis=1)
            active = np.flatnonzero(err >= tolerance)
            if active.size == 0:
                break
            step = _newton_step(self._jacobian(p[active], h), r[active])
            t = np.ones(active.size)
            for _ in range(10):  # halve each point's step until its residual falls
                trial = p[active] + t[:, None] * step
                r_trial = q[active] - self.map_points(trial)
                worse = np.linalg.norm(r_trial, axis=1) >= err[active]
                if not worse.any():
                    break
                t[worse] *= 0.5
            keep = ~worse  # a point that found no better step stays where it was
            p[active[keep]], r[active[keep]] = trial[keep], r_trial[keep]
            if not keep.any():
                break
        return p, np.linalg.norm(r, axis=1)

    def _polish(self, q: Tensor, p: Tensor, tolerance: float) -> tuple[Tensor, Tensor, int]:
        """Points ``(3, N)`` where the fixed-point iteration left ``|p + u(p) - q|`` above
        ``tolerance`` go on with Newton's method (:meth:`unmap_points`) from there; returns
        the points, their residuals and how many went on."""
        residual = (q - p - self.displacement_at(p.view(3, -1, 1, 1)).view(3, -1)).norm(dim=0)
        stalled = torch.nonzero(residual > tolerance).flatten()
        if stalled.numel():
            start = p[:, stalled].T.numpy()
            solved, res = self.unmap_points(
                q[:, stalled].T.numpy(), start=start, tolerance=tolerance
            )
            p, residual = p.clone(), residual.clone()
            p[:, stalled], residual[stalled] = torch.from_numpy(solved.T), torch.from_numpy(res)
        return p, residual, int(stalled.numel())

    def _jacobian(self, points: np.ndarray, h: float) -> np.ndarray:
        """The Jacobian of ``p + u(p)`` at world points ``(N, 3)``, by central differences
        with step ``h`` mm: ``(N, 3, 3)``."""
        n = len(points)
        offsets = np.concatenate([np.eye(3) * h, -np.eye(3) * h])  # (6, 3)
        probes = (points[:, None, :] + offsets[None]).reshape(-1, 3)
        values = self.map_points(probes).reshape(n, 6, 3)
        return ((values[:, :3] - values[:, 3:]) / (2 * h)).transpose(0, 2, 1)

    def _preconditioner(self) -> tuple[np.ndarray, Tensor]:
        """The inverse of the best-fit affine map (where the iteration starts) and of its
        linear part (the preconditioner); the identity when the fit is degenerate."""
        fit = self.linear_fit()
        lin = fit[:3, :3]
        if not (np.all(np.isfinite(fit)) and np.linalg.cond(lin) < 1e6):
            fit, lin = np.eye(4), np.eye(3)
        return np.linalg.inv(fit), torch.from_numpy(np.linalg.inv(lin))

    def _solve(
        self, q: Tensor, p: Tensor, precond: Tensor, iterations: int, tolerance: float
    ) -> tuple[Tensor, int, bool]:
        """Iterate ``p <- p + P (q - p - u(p))`` until each point moves less than
        ``tolerance`` (a converged point is not updated again, so the few points that do
        not converge, e.g. where the mapping folds, do not hold up the others); returns
        ``p``, the steps and whether every point converged."""
        shape = p.shape
        q_flat, p_flat = q.reshape(3, -1), p.reshape(3, -1).clone()
        active = torch.arange(q_flat.shape[1])
        for k in range(1, iterations + 1):
            pa = p_flat[:, active]
            u = self.displacement_at(pa.reshape(3, -1, 1, 1)).reshape(3, -1)
            step = precond.to(pa.dtype) @ (q_flat[:, active] - pa - u)
            p_flat[:, active] = pa + step
            active = active[step.norm(dim=0) >= tolerance]
            if active.numel() == 0:
                return p_flat.reshape(shape), k, True
        return p_flat.reshape(shape), iterations, False

    def _inverse_grid(self, grid: Grid | Volume | str | os.PathLike[str] | None) -> Grid:
        if grid is not None:
            return _as_grid(grid)
        if self.target is None:
            raise RanregError(
                f"{self.origin or 'transform'}: the moving grid is unknown (no moving_grid in "
                "metrics.json and the moving image file is not found); give a reference grid"
            )
        return self.target

    def round_trip(
        self, inverse: Transform, mask: np.ndarray | Volume | None = None
    ) -> dict[str, Any]:
        """Round-trip error ``|u(p) + w(p + u(p))|`` (mm) of ``inverse`` (field ``w``) over
        the points ``p`` of this field's grid (inside ``mask`` if given) whose image
        ``p + u(p)`` lies on the inverse's grid (elsewhere ``w`` is not defined): mean,
        95th percentile, max, the number of points and their fraction of the grid (mask)."""
        keep = None if mask is None else _mask_array(mask, self.grid)
        errors = []
        for start, stop in self.grid.slabs():
            p = self.grid.points(start, stop)
            u = self._displacement(self.grid, start, stop, p)
            q = p + u
            inside = inverse.grid.inside(q).numpy()
            if keep is not None:
                inside &= keep[start:stop]
            err = (u + inverse.displacement_at(q)).norm(dim=0).numpy()
            errors.append(err[inside])
        e = np.concatenate(errors)
        total = int(keep.sum()) if keep is not None else int(np.prod(self.grid.shape))
        if e.size == 0:
            return {"mean": None, "p95": None, "max": None, "points": 0, "fraction": 0.0}
        return {
            "mean": float(e.mean()),
            "p95": float(np.percentile(e, 95)),
            "max": float(e.max()),
            "points": int(e.size),
            "fraction": float(e.size / max(total, 1)),
        }


# ------------------------------------------------------------------------------ files
def _read_ddf(path: Path) -> tuple[np.ndarray, Grid]:
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise RanregError(f"{path}: cannot read the displacement field ({exc})") from None
    shape = data.shape
    if len(shape) == 5 and shape[3] == 1 and shape[4] == 3:
        data = data[:, :, :, 0, :]
    elif not (len(shape) == 4 and shape[3] == 3):
        raise RanregError(f"{path}: expected a displacement field (X, Y, Z, 1, 3), got {shape}")
    if not np.all(np.isfinite(data)):
        raise RanregError(f"{path}: the displacement field has NaN or infinite values")
    try:
        return data, Grid(shape[:3], img.affine)  # type: ignore[arg-type]
    except RanregError as exc:
        raise RanregError(f"{path}: {exc}") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RanregError(f"{path}: cannot read ({exc})") from None
    return data if isinstance(data, dict) else {}


def _moving_grid(info: dict[str, Any], folder: Path) -> Grid | None:
    """The moving grid recorded in a result's json: ``moving_grid``, else the header of the
    file ``moving`` names (as given, or relative to the folder's parent); None if unknown."""
    if info.get("moving_grid"):
        return Grid.from_json(info["moving_grid"], f"{folder}: moving_grid")
    name = info.get("moving")
    if not isinstance(name, str) or not name or name == "None":
        return None
    for candidate in (Path(name), folder.parent / name):
        if candidate.exists():
            return read_grid(candidate)
    return None


def _mask_array(mask: np.ndarray | Volume, grid: Grid) -> np.ndarray:
    arr = np.asarray(mask.array if isinstance(mask, Volume) else mask)
    if arr.shape != grid.shape:
        raise RanregError(f"mask of shape {arr.shape} does not match the grid {grid.shape}")
    return arr != 0


def _extended(field: np.ndarray) -> np.ndarray:
    """The field ``(X, Y, Z, 3)`` with one more plane on each side of every axis,
    extrapolated linearly from the two border planes (copied for an axis of size 1): points
    just outside the grid (e.g. where the inverse's iteration or a grid's border lands)
    get the field's smooth continuation rather than a kink."""
    out = field
    for axis in range(3):
        first, last = np.take(out, [0], axis), np.take(out, [-1], axis)
        if out.shape[axis] > 1:
            first = 2 * first - np.take(out, [1], axis)
            last = 2 * last - np.take(out, [-2], axis)
        out = np.concatenate([first, out, last], axis=axis)
    return out


def _newton_step(jacobian: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """Solve ``J d = r`` per point; where ``J`` is singular, the plain step ``d = r``."""
    step = residual.copy()
    ok = np.abs(np.linalg.det(jacobian)) > 1e-8
    if ok.any():
        step[ok] = np.linalg.solve(jacobian[ok], residual[ok][..., None])[..., 0]
    return step
