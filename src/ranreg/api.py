"""The Python API of ``ranreg register`` and ``ranreg apply``: :func:`register`.

``register(fixed, moving, ...)`` runs the same pipeline with the same settings as the
command line (:func:`ranreg.pipeline.register_volumes` with
:class:`ranreg.options.RegistrationOptions`) and returns a :class:`Registration`: the
warped image and labels, the displacement field, the mapping as a
:class:`~ranreg.transform.Transform` (apply it to other images, invert it), the metrics,
and :meth:`Registration.save`, which writes the files of ``ranreg register --out``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ranreg.atomic import new_output_dir
from ranreg.data.formats import output_format as choose_format
from ranreg.data.io import Volume, spacing_from_affine
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
from ranreg.pipeline import (
    RegistrationResult,
    align_labels,
    check_inputs,
    model_settings,
    register_volumes,
)
from ranreg.points import check_landmarks, landmark_metrics
from ranreg.runtime import resolve_device
from ranreg.transform import Grid, ImageLike, Transform, as_volume

__all__ = ["Registration", "register"]


@dataclass(eq=False)
class Registration:
    """The outcome of :func:`register`.

    ``result``: the pipeline's :class:`~ranreg.pipeline.RegistrationResult`.
    ``transform``: the whole mapping (fixed -> moving, affine included).
    ``metrics``: what ``metrics.json`` holds (runtimes, folding %, SD log det J, and with
    both label maps Dice, ASD and HD95 before and after). The inputs are kept for
    :meth:`save`.
    """

    result: RegistrationResult
    transform: Transform
    metrics: dict[str, Any]
    fixed: Volume
    moving: Volume
    fixed_labels: Volume | None
    moving_labels: Volume | None
    model: torch.nn.Module
    options: RegistrationOptions
    labels_to_score: list[int]
    head_masks: bool = False

    def _on_fixed(self, array: np.ndarray) -> Volume:
        affine = self.fixed.affine.copy()
        return Volume(array, affine, spacing_from_affine(affine))

    @property
    def warped(self) -> Volume:
        """The moving image on the fixed grid after registration (linear)."""
        return self._on_fixed(self.result.warped)

    @property
    def warped_labels(self) -> Volume | None:
        """The moving labels on the fixed grid after registration (nearest), if given."""
        lab = self.result.warped_label
        return None if lab is None else self._on_fixed(lab)

    @property
    def ddf_mm(self) -> np.ndarray:
        """``u`` (X, Y, Z, 3) in mm along the world axes on the fixed grid."""
        return self.result.ddf_mm

    @property
    def jacobian(self) -> Volume:
        """Determinant of the Jacobian of ``p -> p + u(p)`` on the fixed grid."""
        return self._on_fixed(self.result.jacobian)

    def apply(
        self,
        image: ImageLike,
        *,
        labels: bool = False,
        interp: str | None = None,
        reference: Grid | Volume | str | os.PathLike[str] | None = None,
    ) -> Volume:
        """Bring an image of the moving space onto the fixed grid (or ``reference``):
        :meth:`Transform.apply <ranreg.transform.Transform.apply>`."""
        return self.transform.apply(image, labels=labels, interp=interp, reference=reference)

    def inverse(self, **kwargs: Any) -> Transform:
        """The inverse mapping on the moving grid, with its round-trip error:
        :meth:`Transform.inverse <ranreg.transform.Transform.inverse>`."""
        return self.transform.inverse(**kwargs)

    def save(
        self,
        out_dir: str | os.PathLike[str],
        *,
        inverse: bool = False,
        output_format: str | None = None,
        since: float | None = None,
    ) -> Path:
        """Write the files of ``ranreg register --out out_dir`` (warped image and labels,
        ddf.nii.gz, affine.txt, jacobian.nii.gz, overlay.png, metrics.json; with
        ``inverse`` also inverse_ddf.nii.gz, as ``--save-inverse``) into the new folder
        ``out_dir``, atomically (a failure leaves nothing). The volumes take the fixed
        image's file format or ``output_format`` (``--format``). ``since``: a
        ``time.perf_counter()`` reading; ``metrics.json`` then holds ``total_s``, the
        seconds from it to the end of writing (``ranreg register`` passes its start)."""
        out = Path(out_dir)
        fmt = choose_format(self.fixed.path, output_format).lstrip(".")
        with new_output_dir(out) as tmp:
            write_outputs(
                tmp,
                self.result,
                self.metrics,
                self.model,
                _named(self.fixed, "fixed (array)"),
                _named(self.moving, "moving (array)"),
                fix_lab=self.fixed_labels,
                labels=self.labels_to_score,
                head_masks=self.head_masks,
                fmt=fmt,
            )
            metrics = dict(self.metrics)
            if inverse:
                metrics["inverse"] = jsonable(write_inverse(tmp, self.transform))
            if since is not None:
                metrics["total_s"] = time.perf_counter() - since
            write_json(tmp / "metrics.json", metrics)
        return out


def _named(volume: Volume, name: str) -> Volume:
    """``volume`` with a name for figure titles when it came from an array."""
    return volume if volume.path is not None else dataclasses.replace(volume, path=Path(name))


def register(
    fixed: ImageLike,
    moving: ImageLike,
    *,
    model: torch.nn.Module | str | os.PathLike[str] | None = None,
    moving_labels: ImageLike | None = None,
    fixed_labels: ImageLike | None = None,
    device: str | torch.device = "cpu",
    labels_to_score: Sequence[int] | None = None,
    label_names: str | os.PathLike[str] | dict[int, str] | None = None,
    fixed_landmarks: str | os.PathLike[str] | np.ndarray | None = None,
    moving_landmarks: str | os.PathLike[str] | np.ndarray | None = None,
    landmark_coordinates: str | None = None,
    head_masks: bool = False,
    fixed_mask: ImageLike | None = None,
    moving_mask: ImageLike | None = None,
    **options: Any,
) -> Registration:
    """Register ``moving`` to ``fixed``, as ``ranreg register`` does.

    Images and label maps are file paths, :class:`~ranreg.data.io.Volume` objects or
    ``(array, affine)`` tuples (3D array, 4x4 voxel-to-world affine in RAS+ mm). ``model``:
    a model, a model file or folder, a packaged model name, ``identity`` or ``ants-syn``
    (:func:`ranreg.models.resolve_model`; None: the packaged default). ``options``: the
    settings of :class:`~ranreg.options.RegistrationOptions`, named as there (``affine``,
    ``similarity``, ``fast``, ``tta``, ``network_spacing``, ``refine``, ``refine_weight``,
    ``refine_levels``, ``diffeomorphic``, ``precision``, ``channels_last``, ``progress``,
    ``initial_affine``: an ITK transform file or a 4x4 world matrix to start from).
    With both label maps, ``metrics`` scores ``labels_to_score`` named by ``label_names``,
    with the defaults of ``ranreg register`` (:func:`ranreg.infer.register_files`).
    With ``fixed_landmarks`` and ``moving_landmarks`` (files of :mod:`ranreg.points` or RAS
    arrays ``(N, 3)``, paired in order; voxel indices of each image with
    ``landmark_coordinates="voxel"``), ``metrics["landmarks"]`` holds their error before
    and after (:func:`ranreg.points.landmark_errors`). ``head_masks`` keeps the RA heads'
    masks of a RAN model for :meth:`Registration.save` (``head_masks.png``).
    ``fixed_mask`` (an image like ``fixed``; non-zero: inside) limits the similarity of the
    affine stage and of the optimisation to the voxels inside it (ANTs' ``-x``); the network
    sees the whole images (:func:`ranreg.pipeline.register_volumes`). ``moving_mask`` (an
    image like ``moving``) likewise on the moving image: only the fixed voxels that the
    transform sends inside it are compared (ANTs' moving mask), e.g. to leave out an
    artefact that only the moving image has.
    """
    opts = RegistrationOptions.from_settings(options)
    net = model if isinstance(model, torch.nn.Module) else resolve_model(model)
    fix = as_volume(fixed, "fixed image")
    mov = as_volume(moving, "moving image")
    check_inputs(net, mov, fix)  # before anything long: a 2D model, a 2D image
    model_settings(net.config)
    resolve_device(device)
    fix_lab = None if fixed_labels is None else as_volume(fixed_labels, "fixed labels", labels=True)
    mov_lab = (
        None if moving_labels is None else as_volume(moving_labels, "moving labels", labels=True)
    )
    masks = [
        None if m is None else as_volume(m, f"{side} mask", labels=True)
        for m, side in ((fixed_mask, "fixed"), (moving_mask, "moving"))
    ]
    names = label_names if isinstance(label_names, dict) else load_label_names(label_names)
    mov_lab = align_labels(mov_lab, mov, "moving")
    fix_lab = align_labels(fix_lab, fix, "fixed")
    labels = choose_labels(labels_to_score, label_names, fix_lab)
    grids = (Grid.of(fix), Grid.of(mov))
    landmarks = check_landmarks(fixed_landmarks, moving_landmarks, landmark_coordinates, grids)
    result = register_volumes(
        net,
        mov,
        fix,
        mov_lab,
        fix_lab,
        device,
        options=opts,
        return_levels=head_masks,
        fixed_mask=masks[0],
        moving_mask=masks[1],
    )
    metrics = result_metrics(result, net, opts, fix, mov, fix_lab, mov_lab, device, labels, names)
    _name_inputs(metrics, fix, mov, fix_lab, mov_lab)
    metrics["fixed_mask"] = _mask_entry(masks[0], result.fixed_mask_fraction)
    metrics["moving_mask"] = _mask_entry(masks[1], result.moving_mask_fraction)
    transform = Transform(
        result.ddf_mm,
        grids[0],
        target=grids[1],
        origin=f"{metrics['moving'] or 'moving array'} -> {metrics['fixed'] or 'fixed array'}",
    )
    if landmarks is not None:
        metrics["landmarks"] = landmark_metrics(
            transform, fixed_landmarks, moving_landmarks, landmarks
        )
    return Registration(
        result=result,
        transform=transform,
        metrics=jsonable(metrics),
        fixed=fix,
        moving=mov,
        fixed_labels=fix_lab,
        moving_labels=mov_lab,
        model=net,
        options=opts,
        labels_to_score=labels,
        head_masks=head_masks,
    )


def _mask_entry(mask: Volume | None, fraction: float | None) -> dict[str, Any] | None:
    """A mask in ``metrics``: its file (None for an array) and the fraction of its image
    inside it."""
    if mask is None:
        return None
    path = None if mask.path is None else str(mask.path)
    return {"path": path, "fraction": fraction}


def _name_inputs(
    metrics: dict[str, Any],
    fix: Volume,
    mov: Volume,
    fix_lab: Volume | None,
    mov_lab: Volume | None,
) -> None:
    """Input files in ``metrics`` (None for arrays) and the grids of both images."""
    for key, vol in (("fixed", fix), ("moving", mov)):
        metrics.setdefault(f"{key}_grid", Grid.of(vol).to_json())
    inputs = {"fixed": fix, "moving": mov, "fixed_labels": fix_lab, "moving_labels": mov_lab}
    for key, opt in inputs.items():
        metrics[key] = None if opt is None or opt.path is None else str(opt.path)
