"""Learn2Reg submissions: a data set's listed pairs registered, one displacement file each.

``ranreg register --pairs KEY --data DIR --out OUT`` registers the pairs of the list ``KEY``
(``registration_test``, ``registration_val``, ``training_paired_images``) of the Learn2Reg
folder ``DIR`` (:func:`ranreg.data.pair_lists.learn2reg_pairs`): one result folder per
pair as for a CSV of pairs (:mod:`ranreg.batch`), and in ``OUT/learn2reg/`` the file the
challenge's evaluation reads for each pair, ``disp_FFFF_MMMM.nii.gz``. ``FFFF`` and
``MMMM`` are the case numbers of the fixed and the moving image (``0001`` in
``AbdomenCTCT_0001_0000.nii.gz``; a name without one keeps its whole stem). The file
holds an array ``(X, Y, Z, 3)`` on the fixed image's voxels, float32, in voxel units along
the arrays' axes: the fixed voxel ``x`` corresponds to the moving voxel ``x + disp(x)``
(the challenge's evaluation samples it at the fixed keypoints and compares with the moving
ones, and warps the moving label map by it). It is
:meth:`ranreg.transform.Transform.voxel_displacement` of the pair's ``ddf.nii.gz``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from ranreg.atomic import atomic_file
from ranreg.batch import Pair, check_pair_names
from ranreg.data.formats import image_stem
from ranreg.data.pair_lists import learn2reg_pairs
from ranreg.grids import read_grid
from ranreg.transform import Transform

__all__ = [
    "FIELDS_FOLDER",
    "case_id",
    "field_name",
    "submission_pairs",
    "write_field",
    "write_missing_fields",
]

#: the folder of ``--out`` that holds the displacement files, ready to zip
FIELDS_FOLDER = "learn2reg"
_CASE = re.compile(r"_(\d{4})_\d{4}$")


def case_id(image: str | os.PathLike[str]) -> str:
    """The case number of a Learn2Reg image (``TASK_CASE_TIME``), else its stem."""
    stem = image_stem(image)
    found = _CASE.search(stem)
    return found.group(1) if found else stem


def field_name(fixed: str | os.PathLike[str], moving: str | os.PathLike[str]) -> str:
    """``disp_FFFF_MMMM.nii.gz``: the file name the challenge expects for a pair."""
    return f"disp_{case_id(fixed)}_{case_id(moving)}.nii.gz"


def submission_pairs(root: str | os.PathLike[str], key: str) -> list[Pair]:
    """The pairs of ``key`` as cohort pairs (:class:`ranreg.batch.Pair`) named
    ``FFFF_MMMM``, with their label maps and keypoints (voxel indices) where they exist."""
    pairs = []
    for moving, fixed in learn2reg_pairs(root, key):
        both = fixed.landmarks is not None and moving.landmarks is not None
        pairs.append(
            Pair(
                f"{case_id(fixed.image)}_{case_id(moving.image)}",
                fixed.image,
                moving.image,
                moving_labels=moving.label,
                fixed_labels=fixed.label,
                fixed_landmarks=fixed.landmarks if both else None,
                moving_landmarks=moving.landmarks if both else None,
                landmark_coordinates="voxel" if both else None,
            )
        )
    check_pair_names(pairs, f"{root} ({key})")
    return pairs


def write_field(
    result: str | os.PathLike[str], pair: Pair, out_dir: str | os.PathLike[str]
) -> Path:
    """Write the pair's displacement file (:func:`field_name`) from its result folder
    ``result`` (of ``ranreg register``) into ``out_dir``, atomically; returns its path."""
    fixed = read_grid(pair.fixed)
    disp = Transform.load(result).voxel_displacement(moving=read_grid(pair.moving), reference=fixed)
    img = nib.Nifti1Image(np.ascontiguousarray(disp), fixed.affine)
    path = Path(out_dir) / field_name(pair.fixed, pair.moving)
    with atomic_file(path, ".nii.gz") as tmp:
        nib.save(img, str(tmp))
    return path


def write_missing_fields(out_dir: str | os.PathLike[str], pairs: list[Pair]) -> None:
    """Write the displacement file of each finished pair (folder ``out_dir/NAME``) that has
    none yet in ``out_dir/learn2reg``."""
    folder = Path(out_dir) / FIELDS_FOLDER
    for pair in pairs:
        if not (folder / field_name(pair.fixed, pair.moving)).is_file():
            write_field(Path(out_dir) / pair.name, pair, folder)
