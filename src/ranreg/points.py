"""Landmarks: points in a CSV file, mapped through a registration result.

A points file is a CSV with a header row that has the columns ``x``, ``y`` and ``z`` (world
mm; any case) and any others (a name, ITK's ``t``, ...), which are kept as they are. The
coordinates are LPS by default, as ITK, ANTs (``antsApplyTransformsToPoints``) and
3D Slicer's markups write them, or RAS (NIfTI's world axes, nibabel) with
``coordinates="ras"``. The mapped file has the same columns and rows, in the same system.

Direction: a registration result maps a point ``p`` of the **fixed** space to ``p + u(p)``
in the **moving** space (:meth:`ranreg.transform.Transform.map_points`), so fixed-space
landmarks are mapped directly, which is how landmark errors (TRE) are measured; moving-space
landmarks go to the fixed space through the inverse (``inverse=True``). ANTs maps points
the same way: the transforms that bring the moving image onto the fixed grid take fixed
points to the moving space.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ranreg.atomic import atomic_file
from ranreg.errors import RanregError

if TYPE_CHECKING:
    from ranreg.grids import Grid
    from ranreg.transform import Transform

__all__ = [
    "COORDINATES",
    "PointTable",
    "check_points_out",
    "map_points_file",
    "outside_grid",
    "read_points",
]

#: coordinate systems of a points file: ITK's (LPS) or NIfTI's (RAS)
COORDINATES = ("lps", "ras")
_TO_RAS = {"lps": np.array([-1.0, -1.0, 1.0]), "ras": np.ones(3)}


@dataclass
class PointTable:
    """A points file: its header and rows as text, where ``x``, ``y``, ``z`` are, and the
    points as RAS world mm ``(N, 3)``."""

    header: list[str]
    rows: list[list[str]]
    columns: tuple[int, int, int]
    ras: np.ndarray


def _check_coordinates(coordinates: str) -> np.ndarray:
    if coordinates not in COORDINATES:
        raise RanregError(
            f"coordinates must be one of {', '.join(COORDINATES)}, got {coordinates!r}"
        )
    return _TO_RAS[coordinates]


def _number(text: str, path: Path, line: int, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise RanregError(f"{path}: line {line}: {name} = {text!r} is not a finite number")
    return value


def read_points(path: str | os.PathLike[str], coordinates: str = "lps") -> PointTable:
    """Read a points CSV (see the module docstring); ``coordinates``: ``lps`` or ``ras``."""
    sign = _check_coordinates(coordinates)
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise RanregError(f"{file}: points file not found") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise RanregError(f"{file}: not a text (CSV) file") from None
    reader = csv.reader(io.StringIO(text))
    table = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    if not table:
        raise RanregError(f"{file}: empty; expected a header with columns x, y, z")
    header = table[0][1]
    names = [c.strip().lower() for c in header]
    if not {"x", "y", "z"} <= set(names):
        raise RanregError(f"{file}: the header {header} has no columns x, y and z")
    columns = (names.index("x"), names.index("y"), names.index("z"))
    if len(table) == 1:
        raise RanregError(f"{file}: no points below the header")
    points = np.empty((len(table) - 1, 3))
    for i, (line, row) in enumerate(table[1:]):
        if len(row) != len(names):
            raise RanregError(f"{file}: line {line} has {len(row)} fields, the header {len(names)}")
        for axis, col in enumerate(columns):
            points[i, axis] = _number(row[col], file, line, "xyz"[axis])
    return PointTable(header, [row for _, row in table[1:]], columns, points * sign)


def _write_points(path: Path, table: PointTable, ras: np.ndarray, coordinates: str) -> None:
    values = ras * _TO_RAS[coordinates]
    with atomic_file(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(table.header)
        for row, point in zip(table.rows, values, strict=True):
            out = list(row)
            for axis, col in enumerate(table.columns):
                out[col] = f"{point[axis]:.6f}"
            writer.writerow(out)


def outside_grid(points_ras: np.ndarray, grid: Grid) -> np.ndarray:
    """Which world points lie outside ``grid`` (more than half a voxel beyond its border),
    where a field is extrapolated rather than known."""
    vox = (np.asarray(points_ras) - grid.affine[:3, 3]) @ np.linalg.inv(grid.affine[:3, :3]).T
    return np.any((vox < -0.5) | (vox > np.asarray(grid.shape) - 0.5), axis=1)


def check_points_out(out: str | os.PathLike[str]) -> Path:
    """Refuse an output points file that exists or is not named ``*.csv``."""
    target = Path(out)
    if target.exists() or target.is_symlink():
        raise RanregError(f"{target}: exists; refusing to overwrite it")
    if target.suffix.lower() != ".csv":
        raise RanregError(f"{target}: the mapped points are written as CSV: name it *.csv")
    return target


def map_points_file(
    transform: Transform,
    points: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    coordinates: str = "lps",
) -> dict[str, Any]:
    """Map the points of the CSV ``points`` through ``transform`` (a
    :class:`ranreg.transform.Transform`: fixed -> moving, or its inverse) into the new CSV
    ``out`` (refused if it exists; written whole or not at all). Returns the number of
    points and how many lie outside the field's grid."""
    target = check_points_out(out)
    table = read_points(points, coordinates)
    mapped = transform.map_points(table.ras)
    _write_points(target, table, mapped, coordinates)
    return {
        "points": len(table.rows),
        "outside": int(outside_grid(table.ras, transform.grid).sum()),
    }
