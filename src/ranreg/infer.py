"""``ranreg register``: register two image files and write the results.

:func:`register_files` reads the files, resolves the model
(:func:`ranreg.models.resolve_model`: packaged names, files, ``identity``, classical
peers), runs :func:`ranreg.pipeline.register_volumes` (affine -> network -> instance
optimisation; geometry and conventions are documented there) and writes the output folder
atomically (:mod:`ranreg.outputs`). ``ddf.nii.gz`` holds the whole mapping (affine
included) as world displacements in mm (:data:`ranreg.outputs.DDF_CONVENTION`);
``affine.txt`` holds the affine stage alone as an ITK transform (LPS), for tools that want
it separately.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ranreg.atomic import check_out_dir, new_output_dir
from ranreg.data.formats import output_format as _output_format
from ranreg.data.io import load_label_volume, load_nifti
from ranreg.labelnames import load_label_names
from ranreg.models import resolve_model
from ranreg.options import RegistrationOptions
from ranreg.outputs import (
    choose_labels,
    jsonable,
    result_metrics,
    write_inverse,
    write_json,
    write_outputs,
)
from ranreg.pipeline import align_labels, check_inputs, model_settings, register_volumes
from ranreg.points import check_landmarks, landmark_metrics
from ranreg.runtime import resolve_device
from ranreg.transform import Grid, Transform

__all__ = ["register_files"]


def register_files(
    fixed: str | os.PathLike[str],
    moving: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    model: torch.nn.Module | str | None = None,
    moving_labels: str | os.PathLike[str] | None = None,
    fixed_labels: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    labels_to_score: Sequence[int] | None = None,
    *,
    head_masks: bool = False,
    label_names: str | os.PathLike[str] | dict[int, str] | None = None,
    output_format: str | None = None,
    options: RegistrationOptions | None = None,
    fixed_landmarks: str | os.PathLike[str] | None = None,
    moving_landmarks: str | os.PathLike[str] | None = None,
    landmark_coordinates: str | None = None,
    save_inverse: bool = False,
    **changes: Any,
) -> dict[str, Any]:
    """Register two NIfTI files and write the results into the new folder ``out_dir``.

    Files (volumes in the fixed image's format, or ``output_format``: ``nii.gz``, ``nii``,
    ``nrrd``, ``mha``): ``warped.nii.gz``, ``ddf.nii.gz`` (the whole mapping, always
    NIfTI: :data:`ranreg.outputs.DDF_CONVENTION`), ``affine.txt`` (the affine stage as an
    ITK transform, LPS; when it ran), ``jacobian.nii.gz``, ``warped_labels.nii.gz`` (with
    moving labels), ``overlay.png``, ``metrics.json`` (and ``head_masks.png`` with
    ``head_masks`` for RAN models). Everything is checked before anything is written, the
    folder is written as a temporary sibling and renamed into place, and a failure leaves
    nothing behind. ``out_dir`` must not exist or be empty. ``model`` is a model or a spec
    for :func:`ranreg.models.resolve_model`; ``options`` and ``changes`` as for
    :func:`ranreg.pipeline.register_volumes`. With ``fixed_landmarks`` and
    ``moving_landmarks`` (files of :mod:`ranreg.points`, paired in order; a CSV's axes are
    ``landmark_coordinates``), ``metrics["landmarks"]`` holds their error before and after
    (:func:`ranreg.points.landmark_errors`). ``save_inverse`` adds ``inverse_ddf.nii.gz``,
    the inverse mapping on the moving grid (:func:`ranreg.outputs.write_inverse`). Returns
    the metrics dict (as in ``metrics.json``).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    check_out_dir(out)
    opts = (options or RegistrationOptions()).with_(**changes)
    net = model if isinstance(model, torch.nn.Module) else resolve_model(model)
    resolve_device(device)
    fix = load_nifti(fixed)
    mov = load_nifti(moving)
    mov_lab = None if moving_labels is None else load_label_volume(moving_labels)
    fix_lab = None if fixed_labels is None else load_label_volume(fixed_labels)
    check_inputs(net, mov, fix)
    mov_lab = align_labels(mov_lab, mov, "moving")
    fix_lab = align_labels(fix_lab, fix, "fixed")
    model_settings(net.config)
    names = label_names if isinstance(label_names, dict) else load_label_names(label_names)
    labels = choose_labels(labels_to_score, label_names, fix_lab)
    grids = (Grid.of(fix), Grid.of(mov))
    landmarks = check_landmarks(fixed_landmarks, moving_landmarks, landmark_coordinates, grids)

    result = register_volumes(
        net, mov, fix, mov_lab, fix_lab, device, options=opts, return_levels=head_masks
    )
    metrics = result_metrics(result, net, opts, fix, mov, fix_lab, mov_lab, device, labels, names)
    # the mapping as a Transform, once, for what is measured or written through it
    transform = Transform(result.ddf_mm, grids[0], target=grids[1])
    if landmarks is not None:
        metrics["landmarks"] = landmark_metrics(
            transform, fixed_landmarks, moving_landmarks, landmarks
        )
    with new_output_dir(out) as tmp:
        fmt = _output_format(fixed, output_format).lstrip(".")
        write_outputs(
            tmp,
            result,
            metrics,
            net,
            fix,
            mov,
            fix_lab=fix_lab,
            labels=labels,
            head_masks=head_masks,
            fmt=fmt,
        )
        if save_inverse:
            metrics["inverse"] = write_inverse(tmp, transform)
        metrics["total_s"] = time.perf_counter() - t0
        write_json(tmp / "metrics.json", metrics)
    return jsonable(metrics)
