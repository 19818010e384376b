"""2D slices of 3D subjects: the data of the 2D studies (issue 14).

A 2D network trains in a small fraction of a 3D step's time, so the paper's architecture
claims can be tested to convergence on a CPU. The slices come from the real anatomy: axial
and coronal planes of a subject's label map (and of everything painted from it, on the
same grid), chosen where the organs cover the most of the plane, spread over that range so
that one subject gives different cross-sections.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["ORIENTATIONS", "Slice", "pick_slices", "subject_slices", "take_slice"]

#: The axis a plane holds fixed, for volumes in RAS-like (x, y, z) voxel order as the shared
#: label maps are stored: axial planes fix z, coronal planes fix y.
ORIENTATIONS: dict[str, int] = {"axial": 2, "coronal": 1}


@dataclass(frozen=True)
class Slice:
    """One plane of one subject: ``arrays`` holds the 2D cut of every volume given to
    :func:`subject_slices` under the same name (image, labels, tissue maps ...)."""

    subject: str
    orientation: str
    index: int
    arrays: Mapping[str, np.ndarray]


def take_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The plane ``index`` of ``volume`` along ``axis``, as a contiguous 2D copy."""
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    if not 0 <= index < volume.shape[axis]:
        raise ValueError(f"slice {index} outside axis {axis} of size {volume.shape[axis]}")
    return np.ascontiguousarray(np.take(volume, index, axis=axis))


def pick_slices(labels: np.ndarray, axis: int, count: int, min_share: float = 0.5) -> list[int]:
    """``count`` plane indices along ``axis`` among the planes whose organ area (labels > 0)
    is at least ``min_share`` of the largest plane's, at the centres of ``count`` equal
    parts of that range (one plane: its middle); fewer when fewer planes qualify, none when
    no plane holds an organ."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    lab = np.asarray(labels)
    area = np.count_nonzero(lab > 0, axis=tuple(a for a in range(lab.ndim) if a != axis))
    if area.max(initial=0) == 0:
        return []
    candidates = np.flatnonzero(area >= min_share * area.max())
    n, k = len(candidates), min(count, len(candidates))
    centres = (np.arange(k) + 0.5) * n / k - 0.5
    return sorted({int(candidates[int(np.floor(c + 0.5))]) for c in centres})


def subject_slices(
    subject: str,
    volumes: Mapping[str, np.ndarray],
    counts: Mapping[str, int],
    labels_key: str = "labels",
) -> list[Slice]:
    """The planes of one subject: for each orientation in ``counts`` (a name of
    :data:`ORIENTATIONS` and how many planes), :func:`pick_slices` on
    ``volumes[labels_key]``, and the cut of every volume at each chosen plane."""
    shapes = {v.shape for v in volumes.values()}
    if len(shapes) != 1:
        raise ValueError(f"volumes of {subject} differ in shape: {sorted(shapes)}")
    out = []
    for orientation, count in counts.items():
        if orientation not in ORIENTATIONS:
            raise ValueError(f"unknown orientation {orientation!r}; known: {list(ORIENTATIONS)}")
        axis = ORIENTATIONS[orientation]
        for index in pick_slices(volumes[labels_key], axis, count):
            cut = {k: take_slice(v, axis, index) for k, v in volumes.items()}
            out.append(Slice(subject, orientation, index, cut))
    return out
