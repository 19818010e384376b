"""What a training run measures while it learns.

* :func:`validate`: mean organ Dice after registering pairs of validation subjects (the
  curve that selects ``model-best``).
* :func:`validate_known_fields`: end-point error on real scans registered to copies of
  themselves under known smooth fields (:func:`known_field_cases`), in mm inside the body:
  how the network does on real texture it never trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ranreg.data.pairs import PairRecipe, make_pair
from ranreg.metrics import dice
from ranreg.spatial import warp_labels

__all__ = [
    "BODY_LEVEL",
    "KnownFieldCase",
    "known_field_cases",
    "scan_on_grid",
    "validate",
    "validate_known_fields",
    "validation_pairs",
]

#: the validation fields at the training grid (voxels): a rotation up to ~6 degrees, a
#: shift and a smooth warp of about 1-2 voxels (8-16 mm at 8 mm), the residual an
#: affine pre-alignment leaves on real scans
VALIDATION_FIELD = {
    "max_angle": 0.1,
    "max_translation": 1.5,
    "tps_scale": 1.5,
    "bump_scale": 1.5,
    "bump_sigma": 4.0,
}

#: a windowed scan's body: values above this (air is 0 after the window)
BODY_LEVEL = 0.05


def validation_pairs(val: Sequence[Any], limit: int) -> list[tuple[int, int]]:
    """The first ``limit`` ordered pairs of distinct validation subjects."""
    pairs = [(i, j) for i in range(len(val)) for j in range(len(val)) if i != j]
    return pairs[:limit]


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    val: Sequence[Any],
    pairs: Sequence[tuple[int, int]],
    organs: Sequence[int] | None,
    device: torch.device,
    identity: bool = False,
) -> float:
    """Mean Dice over organs and pairs after registration (or before, ``identity``)."""
    scores = []
    was_training = model.training
    model.eval()
    for i, j in pairs:
        mov, fix = val[i], val[j]
        if mov.label is None or fix.label is None:
            continue
        labels = organs or sorted(set(np.unique(fix.label)) - {0})
        if identity:
            warped = mov.label
        else:
            m = torch.from_numpy(mov.image)[None, None].to(device)
            f = torch.from_numpy(fix.image)[None, None].to(device)
            ddf = model(m, f)
            lab = torch.from_numpy(mov.label)[None, None].to(device)
            warped = warp_labels(lab, ddf)[0, 0].cpu().numpy()
        values = [v for v in dice(warped, fix.label, labels).values() if not math.isnan(v)]
        if values:
            scores.append(float(np.mean(values)))
    model.train(was_training)
    return float(np.mean(scores)) if scores else float("nan")


@dataclass
class KnownFieldCase:
    """A real scan on the training grid, its warped copy and the field between them."""

    name: str
    moving: np.ndarray
    fixed: np.ndarray
    ddf: np.ndarray  # (3, *S) voxels
    body: np.ndarray  # bool (*S): where the error is measured
    spacing: float  # mm per voxel

    def identity_error(self) -> float:
        """The end-point error of no registration (mm): the true field's mean length."""
        return float(np.linalg.norm(self.ddf, axis=0)[self.body].mean()) * self.spacing


def scan_on_grid(path: str | Path, spacing: float, window: Sequence[float] | None) -> np.ndarray:
    """A real scan resampled to ``spacing`` mm on its voxel axes, in [0, 1]: the training
    window for CT, min-max otherwise (the rule `ranreg register` applies for models with
    ``model_window: auto``)."""
    from ranreg.data.io import load_nifti
    from ranreg.data.preprocess import network_intensity, resample

    vol = load_nifti(path)
    voxel = np.linalg.norm(np.asarray(vol.affine)[:3, :3], axis=0)
    array = resample(np.asarray(vol.array, dtype=np.float32), voxel / spacing, order=1).array
    return network_intensity(array, window, ct_only=True).astype(np.float32)


def _scan_on_grid(path: Path, spacing: float, window: Sequence[float] | None) -> np.ndarray:
    """:func:`scan_on_grid` padded to multiples of 16 (the network's)."""
    image = scan_on_grid(path, spacing, window)
    pads = [((-n) % 16 // 2, (-n) % 16 - (-n) % 16 // 2) for n in image.shape]
    return np.ascontiguousarray(np.pad(image, pads))


def known_field_cases(
    scans: Sequence[str | Path],
    spacing: float,
    window: Sequence[float] | None,
    per_scan: int = 2,
    seed: int = 0,
) -> list[KnownFieldCase]:
    """``per_scan`` cases of every scan under :data:`VALIDATION_FIELD` fields, drawn from
    ``seed`` (the same cases at every validation and in every run)."""
    recipe = PairRecipe(styles={"image": 1.0}, noise=0.01, deformation=dict(VALIDATION_FIELD))
    cases = []
    for k, path in enumerate(scans):
        image = _scan_on_grid(Path(path), spacing, window)
        for j in range(per_scan):
            pair = make_pair(
                image, None, (spacing,) * 3, np.random.default_rng([seed, k, j]), recipe
            )
            body = image > BODY_LEVEL
            name = f"{Path(path).name}#{j}"
            cases.append(
                KnownFieldCase(name, pair["moving"], pair["fixed"], pair["ddf_true"], body, spacing)
            )
    return cases


@torch.no_grad()
def validate_known_fields(
    model: torch.nn.Module, cases: Sequence[KnownFieldCase], device: torch.device
) -> float:
    """Mean end-point error (mm, inside the body) of the network's fields over ``cases``."""
    errors = []
    was_training = model.training
    model.eval()
    for case in cases:
        m = torch.from_numpy(case.moving)[None, None].to(device)
        f = torch.from_numpy(case.fixed)[None, None].to(device)
        ddf = model(m, f)[0].float().cpu().numpy()
        error = np.linalg.norm(ddf - case.ddf, axis=0)[case.body]  # voxels
        errors.append(float(error.mean()) * case.spacing)
    model.train(was_training)
    return float(np.mean(errors)) if errors else float("nan")
