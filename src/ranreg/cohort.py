"""Registering a cohort with one model: :func:`register_cohort`, the Python API of
``ranreg register --pairs``.

The pairs come from a CSV file (:func:`ranreg.batch.read_pairs`), from a list of a
Learn2Reg folder (``data=`` the folder, ``pairs=`` the key:
:func:`ranreg.learn2reg.submission_pairs`), or as :class:`ranreg.batch.Pair` objects. The
model is resolved once; each pair is registered by :func:`ranreg.infer.register_files`
into ``out_dir/NAME`` through :func:`ranreg.batch.run_batch` (finished pairs are skipped
when run again, ``summary.csv`` is kept up to date), and for a Learn2Reg list the
challenge's displacement files are written into ``out_dir/learn2reg``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ranreg.batch import Pair, check_pair_names, read_pairs, run_batch
from ranreg.errors import RanregError
from ranreg.infer import register_files
from ranreg.labelnames import load_label_names
from ranreg.learn2reg import FIELDS_FOLDER, submission_pairs, write_field, write_missing_fields
from ranreg.models import resolve_model
from ranreg.options import RegistrationOptions
from ranreg.runtime import resolve_device

__all__ = ["register_cohort"]

PairsLike = str | os.PathLike[str] | Sequence[Pair]


def _pairs(pairs: PairsLike, data: str | os.PathLike[str] | None) -> list[Pair]:
    if data is not None:
        if not isinstance(pairs, str):
            raise RanregError("with a Learn2Reg folder, pairs is the key of its list")
        return submission_pairs(data, pairs)
    if isinstance(pairs, str | os.PathLike):
        return read_pairs(pairs)
    listed = list(pairs)
    if not listed or not all(isinstance(p, Pair) for p in listed):
        raise RanregError("pairs: give a CSV file, a Learn2Reg key with data, or Pair objects")
    check_pair_names(listed, "pairs")
    return listed


def register_cohort(
    pairs: PairsLike,
    out_dir: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    model: torch.nn.Module | str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    labels_to_score: Sequence[int] | None = None,
    label_names: str | os.PathLike[str] | dict[int, str] | None = None,
    output_format: str | None = None,
    landmark_coordinates: str | None = None,
    save_inverse: bool = False,
    progress: bool = False,
    **options: Any,
) -> list[dict[str, Any]]:
    """Register every pair of a cohort into ``out_dir``, as ``ranreg register --pairs``.

    ``pairs``: a CSV file (columns as :mod:`ranreg.batch` describes), a list of
    :class:`~ranreg.batch.Pair`, or with ``data`` (a Learn2Reg folder) the key of one of
    its lists (``registration_test``, ``registration_val``, ``training_paired_images``);
    then ``out_dir/learn2reg`` also receives the challenge's ``disp_FFFF_MMMM.nii.gz``
    (:mod:`ranreg.learn2reg`). Each pair gets the folder ``out_dir/NAME`` with the files of
    :func:`ranreg.infer.register_files`; a folder that exists is a finished pair and is
    skipped. ``model``, ``device``, ``labels_to_score``, ``label_names``, ``output_format``,
    ``landmark_coordinates`` (for pairs whose data set does not fix them), ``save_inverse``
    and ``options`` (:class:`~ranreg.options.RegistrationOptions` settings, named as in
    :func:`ranreg.register`) apply to every pair; a pair's own affine comes from its
    ``initial_affine``. ``progress`` shows a bar over the pairs.

    Returns the rows of ``out_dir/summary.csv``, one per pair: ``status`` is ``done`` or
    ``failed`` (with ``error``); a failed pair does not stop the others.
    """
    if options.get("initial_affine") is not None:
        raise RanregError("a cohort takes each pair's affine from its initial_affine column")
    cohort = _pairs(pairs, data)
    opts = RegistrationOptions.from_settings({**options, "progress": False})
    net = model if isinstance(model, torch.nn.Module) else resolve_model(model)
    resolve_device(device)
    names = label_names if isinstance(label_names, dict) else load_label_names(label_names)
    fields = Path(out_dir) / FIELDS_FOLDER

    def one(pair: Pair, folder: Path) -> dict[str, Any]:
        metrics = register_files(
            pair.fixed,
            pair.moving,
            folder,
            net,
            moving_labels=pair.moving_labels,
            fixed_labels=pair.fixed_labels,
            device=device,
            labels_to_score=labels_to_score,
            options=opts.with_(initial_affine=pair.initial_affine),
            label_names=names if label_names is not None else None,
            output_format=output_format,
            fixed_landmarks=pair.fixed_landmarks,
            moving_landmarks=pair.moving_landmarks,
            landmark_coordinates=pair.landmark_coordinates or landmark_coordinates,
            save_inverse=save_inverse,
            fixed_mask=pair.fixed_mask,
            moving_mask=pair.moving_mask,
        )
        if data is not None:  # a pair registered again replaces its file
            write_field(folder, pair, fields)
        return metrics

    rows = run_batch(cohort, out_dir, one, progress=progress)
    if data is not None:  # a run killed between a pair's folder and its file
        done = [p for p, r in zip(cohort, rows, strict=True) if r["status"] == "done"]
        write_missing_fields(out_dir, done)
    return rows
