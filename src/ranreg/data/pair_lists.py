"""Which (moving, fixed) pairs to evaluate, when not every ordered pair of a split.

Two sources of pairs:

* **a Learn2Reg key**: ``registration_val``, ``registration_test`` or
  ``training_paired_images``, a list of ``{"fixed": "./imagesTr/X.nii.gz", "moving": ...}``
  in the data set's ``*_dataset.json``. The images are the files the list names (so the
  two time points of one patient, ``NLST_0001_0000`` and ``NLST_0001_0001``, are two
  subjects, named by their file stems); a label is the entry's ``label`` in the JSON's
  ``training``/``test`` lists or the file of the same name in ``labelsTr``/``labelsTs``;
  landmarks are ``keypointsTr``/``keypointsTs/STEM.csv``, read as voxel indices (the
  challenge's keypoint files), when that file exists.
* **a CSV file** with the columns ``moving`` and ``fixed``: subject names of the split
  (:func:`ranreg.data.datasets.discover_subjects`), one pair per row, e.g. the time points
  of longitudinal scans.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ranreg.data.datasets import Subject
from ranreg.data.formats import image_stem
from ranreg.errors import RanregError

__all__ = [
    "LEARN2REG_KEYS",
    "csv_pairs",
    "default_pairs",
    "is_pairs_file",
    "learn2reg_json",
    "learn2reg_pairs",
]

#: the lists of (fixed, moving) pairs a Learn2Reg ``*_dataset.json`` may hold
LEARN2REG_KEYS: tuple[str, ...] = (
    "registration_val",
    "registration_test",
    "training_paired_images",
)

Pair = tuple[Subject, Subject]


def is_pairs_file(spec: str) -> bool:
    """Whether a ``--pairs`` value names a CSV file (a ``.csv`` name, a path, or a file that
    exists; else it is a Learn2Reg key)."""
    path_like = spec.lower().endswith(".csv") or "/" in spec or os.sep in spec
    return path_like or Path(spec).is_file()


def default_pairs(root: str | os.PathLike[str]) -> str | None:
    """``registration_val`` for a Learn2Reg folder whose ``*_dataset.json`` lists it: the
    pairs the challenge validates on (with their labels or keypoints), rather than every
    ordered pair of ``imagesTs`` (unlabelled, and for intra-patient tasks not one scan per
    subject). None for any other folder."""
    r = Path(root)
    found = sorted(r.glob("*dataset.json")) if r.is_dir() else []
    if len(found) != 1 or not (r / "imagesTr").is_dir():
        return None
    listed = _load_json(found[0]).get("registration_val")
    return "registration_val" if isinstance(listed, list) and listed else None


def learn2reg_json(root: Path) -> Path:
    """The one ``*_dataset.json`` (or ``dataset.json``) of a Learn2Reg folder."""
    if not root.is_dir():
        raise RanregError(f"{root}: Learn2Reg folder not found")
    found = sorted(root.glob("*dataset.json"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise RanregError(f"{root}: {what} *_dataset.json found; pairs by key need exactly one")
    return found[0]


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RanregError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise RanregError(f"{path}: expected a JSON object")
    return data


def _inside(root: Path, rel: Any, where: str) -> Path:
    """A path of the JSON, relative to ``root`` (``./imagesTr/X.nii.gz``), which must exist."""
    if not isinstance(rel, str) or not rel:
        raise RanregError(f"{where}: expected a file path, got {rel!r}")
    path = (root / rel).resolve()
    if not path.is_file():
        raise RanregError(f"{where}: {rel} not found under {root}")
    return path


def _json_labels(root: Path, data: dict[str, Any]) -> dict[Path, Path]:
    """``image -> label`` from the ``training`` and ``test`` lists (entries with a label)."""
    labels: dict[Path, Path] = {}
    for key in ("training", "test"):
        for entry in data.get(key) or []:
            if isinstance(entry, dict) and entry.get("image") and entry.get("label"):
                where = f"{key} entry {entry['image']}"
                labels[(root / entry["image"]).resolve()] = _inside(root, entry["label"], where)
    return labels


def _sibling(image: Path, folder: str, name: str) -> Path | None:
    """The file ``name`` in the folder beside ``imagesTr``/``imagesTs`` (``labelsTr``...)."""
    suffix = image.parent.name.removeprefix("images")
    path = image.parent.parent / f"{folder}{suffix}" / name
    return path if path.is_file() else None


def _subject(image: Path, labels: dict[Path, Path]) -> Subject:
    """A Learn2Reg image with its label and keypoints (the files that exist)."""
    stem = image_stem(image)
    label = labels.get(image) or _sibling(image, "labels", image.name)
    marks = _sibling(image, "keypoints", f"{stem}.csv")
    return Subject(stem, image, label, marks, "voxel" if marks else None)


def learn2reg_pairs(root: str | os.PathLike[str], key: str) -> list[Pair]:
    """The (moving, fixed) subjects of the list ``key`` of the Learn2Reg ``*_dataset.json``
    under ``root`` (the module docstring)."""
    r = Path(root).resolve()
    if key not in LEARN2REG_KEYS:
        known = ", ".join(LEARN2REG_KEYS)
        raise RanregError(f"pairs {key!r}: expected a CSV file or a Learn2Reg key ({known})")
    path = learn2reg_json(r)
    data = _load_json(path)
    entries = data.get(key)
    if not isinstance(entries, list) or not entries:
        raise RanregError(f"{path}: no pairs under {key!r}")
    labels = _json_labels(r, data)
    pairs = []
    for i, entry in enumerate(entries):
        where = f"{path.name} {key}[{i}]"
        if not isinstance(entry, dict) or not {"fixed", "moving"} <= entry.keys():
            raise RanregError(f"{where}: expected an object with 'fixed' and 'moving'")
        moving = _subject(_inside(r, entry["moving"], where), labels)
        fixed = _subject(_inside(r, entry["fixed"], where), labels)
        pairs.append((moving, fixed))
    return pairs


def csv_pairs(path: str | os.PathLike[str], subjects: Sequence[Subject]) -> list[Pair]:
    """The pairs of a CSV with columns ``moving`` and ``fixed`` (subject names)."""
    from ranreg.batch import read_csv_rows

    by_name = {s.name: s for s in subjects}
    pairs = []
    for line, row in enumerate(read_csv_rows(path, ("moving", "fixed")), start=2):
        names = (row["moving"] or "").strip(), (row["fixed"] or "").strip()
        for name in names:
            if name not in by_name:
                raise RanregError(f"{path}, line {line}: no subject {name!r} in the data set")
        if names[0] == names[1]:
            raise RanregError(f"{path}, line {line}: a pair needs two subjects, got {names[0]!r}")
        pairs.append((by_name[names[0]], by_name[names[1]]))
    return pairs
