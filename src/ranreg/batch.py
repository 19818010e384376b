"""Registering a cohort: ``ranreg register --pairs pairs.csv --out DIR``.

``pairs.csv`` has a header with the columns ``fixed`` and ``moving`` and optionally
``moving_labels``, ``fixed_labels``, ``fixed_mask`` and ``moving_mask`` (as
``--fixed-mask``/``--moving-mask``),
``initial_affine`` (an ITK transform file to start the
affine stage from, as ``--initial-affine``), ``fixed_landmarks`` and ``moving_landmarks``
(as ``--fixed-landmarks``/``--moving-landmarks``) and ``name`` (relative paths are taken from
the CSV's folder). The model is loaded once; every pair gets its own folder ``DIR/NAME`` (default
name ``pair-0001``, ...) with the files of a single ``ranreg register``, written atomically,
so a folder that exists is a finished pair. Run again after a kill (or with new rows), the
finished pairs are skipped, stale temporary folders of the killed run are removed, and
``DIR/summary.csv`` (one row per pair, rewritten atomically after each pair) is complete
again. A pair that fails is recorded in the summary with its error and the others go on;
the command then ends with one ``error:`` line and exit code 2. A Learn2Reg list instead
of a CSV (``--pairs registration_test --data DIR``) gives its pairs through
:mod:`ranreg.learn2reg`.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ranreg.atomic import atomic_file, remove_stale_temporaries
from ranreg.errors import RanregError

__all__ = [
    "Pair",
    "check_pair_names",
    "read_csv_rows",
    "read_pairs",
    "run_batch",
    "SUMMARY_FIELDS",
]

SUMMARY_FIELDS = (
    "name",
    "fixed",
    "moving",
    "status",
    "runtime_s",
    "folding_percent",
    "sd_log_jacobian",
    "mean_dice_before",
    "mean_dice_after",
    "landmark_error_before_mm",
    "landmark_error_after_mm",
    "error",
)
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class Pair:
    """One row of the pairs file, paths resolved."""

    name: str
    fixed: Path
    moving: Path
    moving_labels: Path | None = None
    fixed_labels: Path | None = None
    initial_affine: Path | None = None
    fixed_landmarks: Path | None = None
    moving_landmarks: Path | None = None
    #: the axes of the landmark files when the data set fixes them (Learn2Reg: voxel)
    landmark_coordinates: str | None = None
    #: compare the images only inside this mask of the fixed image (``--fixed-mask``)
    fixed_mask: Path | None = None
    #: compare only the fixed voxels mapped inside this mask of the moving image
    moving_mask: Path | None = None


def _resolve(base: Path, text: str | None) -> Path | None:
    if text is None or not text.strip():
        return None
    p = Path(text.strip())
    return p if p.is_absolute() else base / p


def read_csv_rows(path: str | os.PathLike[str], columns: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of a pairs CSV (``ranreg register --pairs``, ``ranreg evaluate --pairs``),
    with one ``error:`` line for a file that is missing, unreadable, or without rows and a
    header naming ``columns`` (a byte-order mark, as spreadsheets write, is allowed)."""
    p = Path(path)
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise RanregError(f"{p}: pairs file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RanregError(f"{p}: cannot read the pairs file ({exc})") from None
    if not rows or not set(columns) <= set(rows[0]):
        need = " and ".join(columns)
        raise RanregError(f"{p}: need a header with the columns {need} (and rows)")
    return rows


def read_pairs(path: str | os.PathLike[str]) -> list[Pair]:
    """The pairs of a CSV file, checked: columns, unique safe names, files that exist."""
    p = Path(path)
    rows = read_csv_rows(p, ("fixed", "moving"))
    pairs = [_pair(p, i, row) for i, row in enumerate(rows, start=1)]
    check_pair_names(pairs, str(p))
    return pairs


def check_pair_names(pairs: Sequence[Pair], where: str) -> None:
    """One folder per pair: refuse a name that is not a plain folder name, and two pairs
    of one name."""
    for pair in pairs:
        if not _safe_name(pair.name):
            raise RanregError(f"{where}: pair name {pair.name!r} is not a safe folder name")
    names = [x.name for x in pairs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RanregError(f"{where}: pair names must be unique, repeated: {', '.join(dupes)}")


def _safe_name(name: str) -> bool:
    return bool(_NAME.match(name)) and not name.startswith(".")


def _pair(path: Path, index: int, row: dict[str, str]) -> Pair:
    base = path.parent
    name = (row.get("name") or "").strip() or f"pair-{index:04d}"
    if not _safe_name(name):
        raise RanregError(f"{path}: line {index + 1}: name {name!r} is not a safe folder name")
    keys = (
        "fixed",
        "moving",
        "moving_labels",
        "fixed_labels",
        "fixed_mask",
        "moving_mask",
        "initial_affine",
        "fixed_landmarks",
        "moving_landmarks",
    )
    files = {k: _resolve(base, row.get(k)) for k in keys}
    for key in ("fixed", "moving"):
        if files[key] is None:
            raise RanregError(f"{path}: line {index + 1}: no {key} image")
    for key, file in files.items():
        if file is not None and not file.exists():
            raise RanregError(f"{path}: line {index + 1}: {key} {file} not found")
    return Pair(name, **files)  # type: ignore[arg-type]


def _summary_row(pair: Pair, metrics: dict[str, Any] | None, error: str | None) -> dict:
    row: dict[str, Any] = {"name": pair.name, "fixed": pair.fixed, "moving": pair.moving}
    if metrics is None:
        return {**row, "status": "failed", "error": error or ""}
    dice = (metrics.get("mean_before") or {}), (metrics.get("mean_after") or {})
    landmarks = metrics.get("landmarks") or {}
    return {
        **row,
        "status": "done",
        "runtime_s": metrics.get("runtime_s"),
        "folding_percent": metrics.get("folding_percent"),
        "sd_log_jacobian": metrics.get("sd_log_jacobian"),
        "mean_dice_before": dice[0].get("dice"),
        "mean_dice_after": dice[1].get("dice"),
        "landmark_error_before_mm": (landmarks.get("before_mm") or {}).get("mean"),
        "landmark_error_after_mm": (landmarks.get("after_mm") or {}).get("mean"),
        "error": "",
    }


def _write_summary(out: Path, rows: list[dict[str, Any]]) -> None:
    """``summary.csv`` rewritten whole through a temporary file (never half-written)."""
    with atomic_file(out / "summary.csv") as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(SUMMARY_FIELDS))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def run_batch(
    pairs: Sequence[Pair],
    out_dir: str | os.PathLike[str],
    register_one: Callable[[Pair, Path], dict[str, Any]],
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Register every pair not yet done into ``out_dir/NAME`` with ``register_one(pair,
    folder) -> metrics`` and keep ``out_dir/summary.csv`` up to date; returns its rows."""
    from tqdm import tqdm

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RanregError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    # what a killed run left: its summary's temporary file; a pair's temporary folder
    # goes when that pair is registered again (ranreg.atomic.new_output_dir)
    remove_stale_temporaries(out / "summary.csv")
    rows: list[dict[str, Any]] = []
    bar = tqdm(pairs, desc="pairs", unit="pair", disable=not progress, dynamic_ncols=True)
    for pair in bar:
        folder = out / pair.name
        metrics, error = _done_metrics(folder), None
        if metrics is None:
            bar.set_postfix_str(pair.name)
            try:
                metrics = register_one(pair, folder)
            except RanregError as exc:
                error = str(exc)
        rows.append(_summary_row(pair, metrics, error))
        _write_summary(out, rows)
    return rows


def _done_metrics(folder: Path) -> dict[str, Any] | None:
    """The metrics of a finished pair folder, or None when it still has to run."""
    path = folder / "metrics.json"
    if not path.is_file():
        if folder.exists() and not any(folder.iterdir()):
            folder.rmdir()  # an empty folder (e.g. made by hand): register into it
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise RanregError(
            f"{folder}: a finished pair folder with an unreadable metrics.json; remove it "
            "to register the pair again"
        ) from None
