"""``ranreg register``: register two image files and write the results.

:func:`register_files` is :func:`ranreg.api.register` on two files (the model resolved by
:func:`ranreg.models.resolve_model`: packaged names, files, ``identity``, classical peers;
the pipeline :func:`ranreg.pipeline.register_volumes`, affine -> network -> instance
optimisation, whose docs give the geometry and conventions) followed by
:meth:`ranreg.api.Registration.save`, which writes the output folder atomically
(:mod:`ranreg.outputs`). ``ddf.nii.gz`` holds the whole mapping (affine
included) as world displacements in mm (:data:`ranreg.outputs.DDF_CONVENTION`);
``affine.txt`` holds the affine stage alone as an ITK transform (LPS), for tools that want
it separately.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ranreg.api import register
from ranreg.atomic import check_out_dir
from ranreg.data.formats import output_format as choose_format
from ranreg.options import RegistrationOptions

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
    fixed_mask: str | os.PathLike[str] | None = None,
    moving_mask: str | os.PathLike[str] | None = None,
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
    the inverse mapping on the moving grid (:func:`ranreg.outputs.write_inverse`).
    ``fixed_mask``, ``moving_mask``: compare the images only inside them
    (:func:`ranreg.register`). Returns
    the metrics dict (as in ``metrics.json``).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    check_out_dir(out)
    choose_format(fixed, output_format)  # an unknown --format fails before registering
    opts = (options or RegistrationOptions()).with_(**changes)
    reg = register(
        fixed,
        moving,
        model=model,
        moving_labels=moving_labels,
        fixed_labels=fixed_labels,
        device=device,
        labels_to_score=labels_to_score,
        label_names=label_names,
        fixed_landmarks=fixed_landmarks,
        moving_landmarks=moving_landmarks,
        landmark_coordinates=landmark_coordinates,
        head_masks=head_masks,
        fixed_mask=fixed_mask,
        moving_mask=moving_mask,
        **dataclasses.asdict(opts),
    )
    reg.save(out, inverse=save_inverse, output_format=output_format, since=t0)
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))
