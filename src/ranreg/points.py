"""Landmarks: points in a file, mapped through a registration result.

Three formats, each written back in its own format with only the coordinates changed:

- ``.csv``: a header row with the columns ``x``, ``y``, ``z`` (world mm; any case) and any
  others (a name, ITK's ``t``, ...). The coordinates are LPS by default, as ITK and ANTs
  (``antsApplyTransformsToPoints``) write them, or RAS (NIfTI's world axes, nibabel) with
  ``coordinates="ras"``. Columns ``l, p, s`` or ``r, a, s`` instead (3D Slicer's control
  point tables) name their system.
- ``.fcsv``: 3D Slicer's fiducial list, whose ``# CoordinateSystem`` line says LPS or RAS
  and whose ``# columns`` line says where ``x``, ``y``, ``z`` are.
- ``.mrk.json``: 3D Slicer's markups file: every control point's ``position``, in each
  markup's ``coordinateSystem`` (LPS when absent, as in Slicer's schema).

A CSV may instead hold **voxel indices** (``coordinates="voxel"``), as Learn2Reg's keypoint
files do: three numbers per row (0-based ``i, j, k`` of the image's array as nibabel reads
it, the same as ITK's index), with or without a header ``x, y, z``. They are read through
the grid of the image they belong to and written in the grid of the image they are mapped
into.

Direction: a registration result maps a point ``p`` of the **fixed** space to ``p + u(p)``
in the **moving** space (:meth:`ranreg.transform.Transform.map_points`), so fixed-space
landmarks are mapped directly, which is how landmark errors (TRE) are measured; moving-space
landmarks go to the fixed space through the inverse. ANTs maps points the same way: the
transforms that bring the moving image onto the fixed grid take fixed points to the moving
space.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ranreg.atomic import new_file
from ranreg.errors import RanregError

if TYPE_CHECKING:
    from ranreg.grids import Grid
    from ranreg.transform import Transform

__all__ = [
    "COORDINATES",
    "POINT_FORMATS",
    "PointFile",
    "check_landmarks",
    "check_points_out",
    "landmark_errors",
    "landmark_metrics",
    "map_points_file",
    "outside_grid",
    "point_format",
    "read_landmark_pair",
    "read_points",
]

#: coordinate systems of a points file: ITK's (LPS), NIfTI's (RAS), or voxel indices
COORDINATES = ("lps", "ras", "voxel")
#: the world systems a file may name for itself
_WORLD = ("lps", "ras")
#: file endings of the points formats
POINT_FORMATS = (".csv", ".fcsv", ".mrk.json")
_TO_RAS = {"lps": np.array([-1.0, -1.0, 1.0]), "ras": np.ones(3)}


def point_format(path: Path) -> str | None:
    """The points format a file's name says (an ending of :data:`POINT_FORMATS`), or None."""
    name = path.name.lower()
    return next((e for e in POINT_FORMATS if name.endswith(e) and len(name) > len(e)), None)


def _format(path: Path) -> str:
    ending = point_format(path)
    if ending is None:
        raise RanregError(f"{path}: a points file is named *{', *'.join(POINT_FORMATS)}")
    return ending


def _system(text: Any, where: str) -> str:
    """A coordinate system as a file names it (Slicer's old codes: 0 RAS, 1 LPS)."""
    value = {"0": "ras", "1": "lps"}.get(str(text).strip(), str(text).strip().lower())
    if value not in _WORLD:
        raise RanregError(f"{where}: coordinate system {text!r}: expected LPS or RAS")
    return value


def _number(text: Any, where: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise RanregError(f"{where}: {text!r} is not a finite number")
    return value


class PointFile:
    """A points file as read: its text (or JSON), where its coordinates are, their systems,
    and the points as RAS world mm ``(N, 3)`` (:attr:`ras`); :meth:`write` writes the same
    file with other points. Voxel indices (``systems`` all ``voxel``) are read through
    ``grid``."""

    def __init__(
        self,
        path: Path,
        kind: str,
        content: Any,
        cells: list,
        systems: list[str],
        grid: Grid | None = None,
    ):
        self.path, self.kind, self.content, self.cells = path, kind, content, cells
        self.voxel = "voxel" in systems
        self.signs = np.array([_TO_RAS.get(s, np.ones(3)) for s in systems]).reshape(-1, 3)
        values = np.array([value for _, value in cells], dtype=np.float64).reshape(-1, 3)
        if self.voxel:
            if grid is None:
                raise RanregError(f"{path}: voxel indices need the image the points belong to")
            self.ras = voxel_to_world(values, grid)
        else:
            self.ras = values * self.signs

    def describe_system(self) -> str:
        """The coordinate systems of the points, for messages: ``LPS``, ``RAS``, both, or
        ``voxel indices``."""
        if self.voxel:
            return "voxel indices"
        kinds = {"LPS" if sign[0] < 0 else "RAS" for sign in self.signs}
        return " and ".join(sorted(kinds))

    def write(self, out: Path, ras: np.ndarray, grid: Grid | None = None) -> None:
        """The same file with the points ``ras`` (RAS world mm, one per point), in the
        file's own systems (voxel indices of ``grid``, the image they now belong to), into
        the new file ``out`` (never replaced; whole or not at all)."""
        values = np.asarray(ras, dtype=np.float64)
        if self.voxel:
            if grid is None:
                raise RanregError(f"{out}: voxel indices need the image the points go to")
            values = world_to_voxel(values, grid)
        values = values * self.signs
        content = copy.deepcopy(self.content)
        for (where, _), value in zip(self.cells, values, strict=True):
            where(content, value)
        with new_file(out, self.kind) as tmp:
            if self.kind == ".mrk.json":
                tmp.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
            else:
                with tmp.open("w", newline="", encoding="utf-8") as fh:
                    csv.writer(fh, lineterminator="\n").writerows(content)


def _setter(row: int, columns: tuple[int, int, int]) -> Any:
    def put(table: list[list[str]], value: np.ndarray) -> None:
        for axis, col in enumerate(columns):
            table[row][col] = f"{value[axis]:.6f}"

    return put


#: the coordinate columns a table may have and the system they name (None: ``x, y, z``,
#: whose system the user gives; ``l, p, s`` and ``r, a, s`` as 3D Slicer's tables write)
_AXES: tuple[tuple[tuple[str, str, str], str | None], ...] = (
    (("x", "y", "z"), None),
    (("l", "p", "s"), "lps"),
    (("r", "a", "s"), "ras"),
)


def _columns(names: list[str], where: str) -> tuple[tuple[int, int, int], str | None, str]:
    """Where the coordinates are among ``names``, the system the columns name, and their
    names (for messages)."""
    for axes, system in _AXES:
        if set(axes) <= set(names):
            return (names.index(axes[0]), names.index(axes[1]), names.index(axes[2])), system, axes
    raise RanregError(f"{where} has no columns x, y and z (or l, p, s or r, a, s)")


def _one_system(path: Path, named: str | None, given: str | None) -> str:
    """The system of a table: the one the file names, else the one given, else LPS; a
    system given for a file that names its own is refused rather than ignored."""
    if named is not None and given is not None:
        raise RanregError(
            f"{path}: the file names its coordinate system ({named.upper()}); give none for it"
        )
    return named or given or "lps"


def _fcsv_comments(path: Path, rows: list[tuple[int, list[str]]]) -> tuple[str | None, list]:
    """The system and the column names that a ``.fcsv``'s ``#`` lines give."""
    system, names = None, None
    for index, row in rows:
        key, _, value = ",".join(row).lstrip("#").partition("=")
        if key.strip().lower() == "coordinatesystem":
            system = _system(value, f"{path}: line {index + 1}")
        elif key.strip().lower() == "columns":
            names = [c.strip().lower() for c in value.split(",")]
    return system, names


def _numeric(row: list[str]) -> bool:
    try:
        return len(row) >= 3 and all(math.isfinite(float(c)) for c in row)
    except ValueError:
        return False


def _read_table(path: Path, text: str, coordinates: str | None, grid: Grid | None) -> PointFile:
    """``.csv`` (a header row; none for voxel indices in a row of numbers) or ``.fcsv``
    (``#`` lines give the system and the columns)."""
    try:
        table = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise RanregError(f"{path}: not a readable CSV ({exc})") from None
    rows = [(i, row) for i, row in enumerate(table) if any(c.strip() for c in row)]
    if path.suffix.lower() == ".fcsv":
        if coordinates == "voxel":
            raise RanregError(f"{path}: a Slicer file holds world points, not voxel indices")
        comments = [(i, r) for i, r in rows if r[0].strip().startswith("#")]
        rows = [(i, r) for i, r in rows if not r[0].strip().startswith("#")]
        file_system, names = _fcsv_comments(path, comments)
    elif coordinates == "voxel" and rows and _numeric(rows[0][1]):
        file_system, names = None, ["x", "y", "z"] + [""] * (len(rows[0][1]) - 3)  # Learn2Reg
    else:
        file_system, names = None, [c.strip().lower() for c in rows[0][1]] if rows else None
        rows = rows[1:]
    if names is None or not rows:
        raise RanregError(f"{path}: no points (expected a header with x, y, z and rows below)")
    if _numeric(names):
        raise RanregError(
            f"{path}: no header x, y, z; a file of voxel indices alone (as Learn2Reg's "
            "keypoints) needs the coordinates 'voxel'"
        )
    columns, named, axes = _columns(names, f"{path}: the header {names}")
    system = _one_system(path, named or file_system, coordinates)
    cells = []
    for index, row in rows:
        if len(row) < len(names):
            raise RanregError(
                f"{path}: line {index + 1} has {len(row)} fields, the header {len(names)}"
            )
        where = f"{path}: line {index + 1}"
        point = [_number(row[c], f"{where}: {n}") for c, n in zip(columns, axes, strict=True)]
        cells.append((_setter(index, columns), point))
    return PointFile(path, _format(path), table, cells, [system] * len(cells), grid)


def _list_of_dicts(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise RanregError(f"{where}: expected a list of objects, got {type(value).__name__}")
    return value


def _read_markups(path: Path, text: str, coordinates: str | None) -> PointFile:
    """Slicer's ``.mrk.json``: every control point that has a position."""
    if coordinates is not None:  # each markup names its own
        raise RanregError(f"{path}: the file names its coordinate system; give none for it")
    try:
        content = json.loads(text)
    except json.JSONDecodeError:
        raise RanregError(f"{path}: not a Slicer markups file (not JSON)") from None
    if not isinstance(content, dict) or "markups" not in content:
        raise RanregError(f"{path}: not a Slicer markups file (no 'markups' list)")
    cells, systems = [], []
    for m, markup in enumerate(_list_of_dicts(content["markups"], f"{path}: markups")):
        system = _system(markup.get("coordinateSystem", "LPS"), f"{path}: markup {m}")
        points = _list_of_dicts(markup.get("controlPoints", []), f"{path}: markup {m} points")
        for p, point in enumerate(points):
            if "position" not in point:
                continue  # a point not placed yet
            where = f"{path}: markup {m} point {p} position"
            position = point["position"]
            if not isinstance(position, list) or len(position) != 3:
                raise RanregError(f"{where}: expected 3 numbers, got {position!r}")
            cells.append((_json_setter(m, p), [_number(v, where) for v in position]))
            systems.append(system)
    if not cells:
        raise RanregError(f"{path}: no control point with a position")
    return PointFile(path, ".mrk.json", content, cells, systems)


def _json_setter(m: int, p: int) -> Any:
    def put(content: dict, value: np.ndarray) -> None:
        content["markups"][m]["controlPoints"][p]["position"] = [float(v) for v in value]

    return put


def read_points(
    path: str | os.PathLike[str], coordinates: str | None = None, grid: Grid | None = None
) -> PointFile:
    """Read a points file (``.csv``, ``.fcsv`` or ``.mrk.json``: the module docstring).
    ``coordinates`` (``lps``, ``ras`` or ``voxel``; None: LPS) is the system of a CSV's
    ``x, y, z`` columns; the files that name their own system refuse one. Voxel indices
    are read through ``grid``, the grid of the image the points belong to."""
    if coordinates is not None and coordinates not in COORDINATES:
        choices = ", ".join(COORDINATES)
        raise RanregError(f"coordinates must be one of {choices}, got {coordinates!r}")
    file = Path(path)
    kind = _format(file)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise RanregError(f"{file}: points file not found") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise RanregError(f"{file}: not a text file") from None
    if kind == ".mrk.json":
        return _read_markups(file, text, coordinates)
    return _read_table(file, text, coordinates, grid)


def check_points_out(out: str | os.PathLike[str], points: str | os.PathLike[str]) -> Path:
    """Refuse an output points file that exists or is not in the format of ``points``."""
    target, kind = Path(out), _format(Path(points))
    if target.exists() or target.is_symlink():
        raise RanregError(f"{target}: exists; refusing to overwrite it")
    if not target.name.lower().endswith(kind) or len(target.name) <= len(kind):
        raise RanregError(f"{target}: the mapped points keep their format: name it *{kind}")
    return target


def _columns_of(points: np.ndarray) -> Any:
    """Points ``(N, 3)`` as the ``(3, N)`` float64 tensor of :mod:`ranreg.geometry`."""
    import torch

    return torch.from_numpy(np.asarray(points, dtype=np.float64).T.copy())


def voxel_to_world(indices: np.ndarray, grid: Grid) -> np.ndarray:
    """RAS world mm of voxel indices ``(N, 3)`` of ``grid``."""
    from ranreg.geometry import apply_affine

    return apply_affine(grid.affine, _columns_of(indices)).T.numpy()


def world_to_voxel(points_ras: np.ndarray, grid: Grid) -> np.ndarray:
    """Voxel indices of ``grid`` (fractional) of RAS world points ``(N, 3)``."""
    from ranreg.geometry import apply_affine

    return apply_affine(np.linalg.inv(grid.affine), _columns_of(points_ras)).T.numpy()


def outside_grid(points_ras: np.ndarray, grid: Grid) -> np.ndarray:
    """Which world points lie outside ``grid`` (more than half a voxel beyond its border,
    :meth:`ranreg.grids.Grid.inside`), where a field is extrapolated rather than known."""
    return ~grid.inside(_columns_of(points_ras)).numpy()


def map_points_file(
    transform: Transform,
    points: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    inverse: bool = False,
    coordinates: str | None = None,
) -> dict[str, Any]:
    """Map the points of the file ``points`` through ``transform`` (a
    :class:`ranreg.transform.Transform`): fixed -> moving, or with ``inverse`` moving ->
    fixed (:meth:`~ranreg.transform.Transform.unmap_points`), into the new file ``out`` of
    the same format (refused if it exists; written whole or not at all). Voxel indices
    (``coordinates="voxel"``) are read in the grid of the space the points come from and
    written in the other's (the fixed image's grid, and the moving image's that the result
    records). Returns the number of points, how many of the fixed-space points lie outside
    the field's grid (where it is extrapolated) and, with ``inverse``, the largest
    residual ``|p + u(p) - q|`` (mm)."""
    target = check_points_out(out, points)
    grids = (transform.grid, transform.target)
    source, destination = grids[::-1] if inverse else grids
    if coordinates == "voxel" and transform.target is None:
        raise RanregError(
            f"{points}: voxel indices of the moving image need its grid, which this "
            "registration result does not record (register again to write it)"
        )
    table = read_points(points, coordinates, source)
    summary: dict[str, Any] = {"points": len(table.ras), "system": table.describe_system()}
    if inverse:
        mapped, residual = transform.unmap_points(table.ras)
        fixed_points = mapped
        summary["residual_max_mm"] = float(residual.max())
    else:
        mapped, fixed_points = transform.map_points(table.ras), table.ras
    table.write(target, mapped, destination)
    summary["outside"] = int(outside_grid(fixed_points, transform.grid).sum())
    return summary


Points = str | os.PathLike[str] | np.ndarray


def _as_points(points: Points, coordinates: str | None, role: str, grid: Grid | None) -> np.ndarray:
    """A file's points (:func:`read_points`), or an array ``(N, 3)`` of RAS world mm (of
    voxel indices of ``grid`` with ``coordinates="voxel"``)."""
    if not isinstance(points, np.ndarray):
        return read_points(points, coordinates, grid).ras
    if points.ndim != 2 or points.shape[1] != 3 or not np.all(np.isfinite(points)):
        raise RanregError(f"{role} landmarks: expected finite points of shape (N, 3)")
    if coordinates != "voxel":
        return points.astype(np.float64)
    if grid is None:
        raise RanregError(f"{role} landmarks: voxel indices need the image they belong to")
    return voxel_to_world(points, grid)


def read_landmark_pair(
    fixed: Points,
    moving: Points,
    coordinates: str | None = None,
    grids: tuple[Grid | None, Grid | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Corresponding landmarks of the fixed and the moving image (files in a format of
    :func:`read_points`, or RAS arrays), paired in the order they are listed; both
    ``(N, 3)`` RAS world mm. Voxel indices (``coordinates="voxel"``) are read through
    ``grids``, the fixed and the moving image's. Different numbers of points are an
    error."""
    fixed_grid, moving_grid = grids if grids is not None else (None, None)
    f = _as_points(fixed, coordinates, "fixed", fixed_grid)
    m = _as_points(moving, coordinates, "moving", moving_grid)
    if len(f) != len(m):
        raise RanregError(
            f"landmarks: {len(f)} fixed and {len(m)} moving points; they are paired in "
            "order, so both files must list the same landmarks"
        )
    return f, m


def _stats(distances: np.ndarray) -> dict[str, float]:
    d = np.asarray(distances, dtype=np.float64)
    return {
        "mean": float(d.mean()),
        "sd": float(d.std()),
        "median": float(np.median(d)),
        "max": float(d.max()),
    }


def check_landmarks(
    fixed: Points | None,
    moving: Points | None,
    coordinates: str | None = None,
    grids: tuple[Grid | None, Grid | None] | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Both landmark sets read and paired (:func:`read_landmark_pair`), or None when
    neither is given; one without the other is an error."""
    if fixed is None and moving is None:
        return None
    if fixed is None or moving is None:
        raise RanregError("landmarks: give both the fixed and the moving landmarks")
    return read_landmark_pair(fixed, moving, coordinates, grids)


def landmark_errors(
    transform: Transform, fixed: Points, moving: Points, coordinates: str | None = None
) -> dict[str, Any]:
    """Target registration error of corresponding landmarks (:func:`read_landmark_pair`):
    ``|p + u(p) - m|`` for each fixed landmark ``p`` and its moving landmark ``m``, and
    before registration ``|p - m|`` (both in world mm: mean, sd, median, max), with the
    number of points and how many fixed landmarks lie outside the field's grid. Voxel
    indices are read through the grids of ``transform`` (fixed, and moving where known)."""
    f, m = read_landmark_pair(fixed, moving, coordinates, (transform.grid, transform.target))
    after = np.linalg.norm(transform.map_points(f) - m, axis=1)
    return {
        "count": len(f),
        "before_mm": _stats(np.linalg.norm(f - m, axis=1)),
        "after_mm": _stats(after),
        "outside": int(outside_grid(f, transform.grid).sum()),
    }


def landmark_metrics(
    transform: Transform, fixed: Points, moving: Points, pair: tuple[np.ndarray, np.ndarray]
) -> dict[str, Any]:
    """``metrics.json``'s ``landmarks``: where the landmarks came from (a file, or
    ``array``) and their errors (:func:`landmark_errors` of the checked ``pair``)."""

    def source(points: Points) -> str:
        return "array" if isinstance(points, np.ndarray) else str(points)

    return {"fixed": source(fixed), "moving": source(moving), **landmark_errors(transform, *pair)}
