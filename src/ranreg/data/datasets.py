"""Finding subjects on disk and serving preprocessed (moving, fixed) pairs.

Supported layouts
-----------------
DeepReg unpaired::

    root/{train,val,test}/images/NAME.nii.gz
    root/{train,val,test}/labels/NAME.nii.gz      (optional)
    root/{train,val,test}/landmarks/NAME.csv      (optional; or .fcsv, .mrk.json)

or a root that directly holds ``images/`` and ``labels/`` (and ``landmarks/``). Landmarks
are points files of :mod:`ranreg.points`, the points of two subjects matched in order.

Learn2Reg::

    root/imagesTr/NAME_0000.nii.gz   root/labelsTr/NAME_0000.nii.gz (or NAME.nii.gz)
    root/imagesTs/...                root/labelsTs/...              (split "test")

A ``*_dataset.json`` next to them is ignored. When a labels folder exists every
image must have its label, otherwise :class:`RanregError` names the image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset

from ranreg.data.formats import image_stem, is_image_file
from ranreg.data.io import load_label_volume, load_nifti
from ranreg.data.preprocess import (
    ABDOMEN_ORGANS,
    DEFAULT_FACTOR,
    DEFAULT_WINDOW,
    preprocess_subject,
)
from ranreg.errors import RanregError

__all__ = [
    "ABDOMEN_CROP",
    "SPLITS",
    "Subject",
    "discover_subjects",
    "discover_splits",
    "split_subjects",
    "ordered_pairs",
    "load_subject",
    "crop_offsets",
    "crop_arrays",
    "PairDataset",
]

#: Random-crop margin of the authors' abdomen training (voxels per side at 4 mm).
ABDOMEN_CROP: tuple[int, int, int] = (12, 10, 20)
SPLITS: tuple[str, ...] = ("train", "val", "test")

T = TypeVar("T")


@dataclass(frozen=True)
class Subject:
    """One subject: its image file and, when the dataset has them, its label file and its
    landmarks file; ``coordinates`` is the system of a landmarks CSV when the data set
    fixes it (Learn2Reg keypoints: ``"voxel"``), else None (the caller's choice)."""

    name: str
    image: Path
    label: Path | None = None
    landmarks: Path | None = None
    coordinates: str | None = None


def _image_files(folder: Path) -> list[Path]:
    """Image files of a folder (NIfTI, NRRD, MHA/MHD; ranreg.data.formats), by name."""
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def _landmark_files(folder: Path) -> dict[str, Path]:
    """``NAME -> file`` of the points files in ``folder`` (none when it does not exist)."""
    from ranreg.points import point_format

    found: dict[str, Path] = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            ending = point_format(p)
            if ending and p.is_file() and not p.name.startswith("."):
                found[p.name[: -len(ending)]] = p
    return found


def _pair_folder(images_dir: Path, labels_dir: Path | None, strip: str = "") -> list[Subject]:
    images = _image_files(images_dir)
    if strip:
        # Learn2Reg: NAME_0000 is the first (only) channel; other channels are ignored
        first = [p for p in images if image_stem(p).endswith(strip)]
        images = first or images
    if not images:
        raise RanregError(f"{images_dir}: no images found (.nii.gz, .nii, .nrrd, .mha, .mhd)")
    labels: dict[str, Path] = {}
    if labels_dir is not None and labels_dir.is_dir():
        labels = {image_stem(p): p for p in _image_files(labels_dir)}
    else:
        labels_dir = None
    marks = _landmark_files(images_dir.parent / "landmarks") if not strip else {}
    subjects = []
    seen: set[str] = set()
    for img in images:
        stem = image_stem(img)
        name = stem[: -len(strip)] if strip and stem.endswith(strip) else stem
        if name in seen:
            raise RanregError(f"{img}: duplicate subject name {name!r} in {images_dir}")
        seen.add(name)
        label = None
        if labels_dir is not None:
            label = labels.get(stem) or labels.get(name)
            if label is None:
                raise RanregError(f"{img}: no label file for this image in {labels_dir}")
        subjects.append(Subject(name, img, label, marks.get(name)))
    return subjects


def _layout(root: Path) -> str:
    if (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir():
        return "learn2reg"
    if (root / "images").is_dir():
        return "direct"
    if any((root / s / "images").is_dir() for s in SPLITS):
        return "splits"
    raise RanregError(
        f"{root}: no dataset found (expected images/, train|val|test/images/ or imagesTr/)"
    )


def discover_subjects(root: str | os.PathLike[str], split: str | None = None) -> list[Subject]:
    """Subjects under ``root`` in file-name order.

    ``split`` selects ``train``/``val``/``test`` in the DeepReg layout (required
    there); in the Learn2Reg layout ``None`` or ``"train"`` means ``imagesTr`` and
    ``"test"`` means ``imagesTs``; a root that directly holds ``images/`` takes
    no split (``split`` must be None), so one folder is never served as two splits.
    """
    r = Path(root)
    if not r.is_dir():
        raise RanregError(f"{r}: dataset directory not found")
    layout = _layout(r)
    if layout == "learn2reg":
        suffix = {None: "Tr", "train": "Tr", "test": "Ts"}.get(split)
        if suffix is None:
            raise RanregError(f"{r}: Learn2Reg layout has splits 'train' and 'test', not {split!r}")
        images_dir = r / f"images{suffix}"
        if not images_dir.is_dir():
            raise RanregError(f"{images_dir}: folder not found")
        return _pair_folder(images_dir, r / f"labels{suffix}", strip="_0000")
    if split is not None and split not in SPLITS:
        raise RanregError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if layout == "splits":
        if split is None:
            raise RanregError(f"{r}: dataset has train/val/test folders; choose a split")
        if not (r / split / "images").is_dir():
            raise RanregError(f"{r / split / 'images'}: folder not found")
        r = r / split
    elif split is not None:
        # a flat images/ folder has no splits: refuse rather than serve the same
        # subjects as train, val and test
        raise RanregError(f"{r}: images/ holds a single set of subjects, it has no {split!r} split")
    return _pair_folder(r / "images", r / "labels")


def discover_splits(root: str | os.PathLike[str]) -> dict[str, list[Subject]]:
    """All splits present under ``root`` (DeepReg: train/val/test; Learn2Reg: train/test)."""
    r = Path(root)
    if not r.is_dir():
        raise RanregError(f"{r}: dataset directory not found")
    layout = _layout(r)
    if layout == "learn2reg":
        names = [s for s, d in (("train", "imagesTr"), ("test", "imagesTs")) if (r / d).is_dir()]
    elif layout == "splits":
        names = [s for s in SPLITS if (r / s / "images").is_dir()]
    else:
        return {"all": discover_subjects(r)}
    return {s: discover_subjects(r, s) for s in names}


def split_subjects(
    subjects: Sequence[T], fractions: tuple[float, float, float] = (0.75, 0.10, 0.15)
) -> dict[str, list[T]]:
    """Split in file order like the paper: first train, then val, then test.

    val and test get ``floor(n * fraction)`` subjects, train the rest (30 -> 23/3/4).
    """
    n = len(subjects)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    total = float(sum(fractions))
    n_val = math.floor(n * fractions[1] / total + 1e-9)
    n_test = math.floor(n * fractions[2] / total + 1e-9)
    n_train = n - n_val - n_test
    items = list(subjects)
    return {
        "train": items[:n_train],
        "val": items[n_train : n_train + n_val],
        "test": items[n_train + n_val :],
    }


def ordered_pairs(items: Sequence[T]) -> list[tuple[T, T]]:
    """Every ordered pair ``(a, b)`` of distinct items (by position): n * (n - 1) pairs.

    In the datasets below the first element is the moving, the second the fixed
    subject.
    """
    seq = list(items)
    return [(seq[i], seq[j]) for i in range(len(seq)) for j in range(len(seq)) if i != j]


def load_subject(subject: Subject) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Read a subject's image (float32 HU) and label; returns (image, label, affine).

    An image/label shape mismatch raises :class:`RanregError` naming both files.
    """
    vol = load_nifti(subject.image)
    if subject.label is None:
        return vol.array, None, vol.affine
    lab = load_label_volume(subject.label)
    if lab.shape != vol.shape:
        raise RanregError(
            f"{subject.image} has shape {vol.shape} but its label {subject.label} "
            f"has shape {lab.shape}"
        )
    return vol.array, lab.array, vol.affine


def crop_offsets(
    shape: Sequence[int],
    margin: Sequence[int],
    rng: np.random.Generator | None = None,
) -> tuple[tuple[slice, ...], tuple[int, ...]]:
    """Crop window of size ``shape - 2 * margin`` and its low-side offsets.

    This is the authors' crop: the window is fixed in size and its position is
    drawn uniformly, so each side loses between 0 and ``2 * margin`` voxels
    (``margin`` on average). ``rng=None`` gives the centred crop (``margin``
    removed from every side), for validation and testing.
    """
    shape = tuple(int(s) for s in shape)
    margin = tuple(int(m) for m in margin)
    if len(margin) != len(shape):
        raise ValueError(f"crop margin {margin} does not match a {len(shape)}D shape")
    if any(m < 0 for m in margin):
        raise ValueError(f"crop margin must be non-negative, got {margin}")
    size = tuple(s - 2 * m for s, m in zip(shape, margin, strict=True))
    if any(z < 1 for z in size):
        raise RanregError(f"crop margin {margin} per side is too large for shape {shape}")
    if rng is None:
        offsets = margin
    else:
        offsets = tuple(int(rng.integers(0, 2 * m + 1)) for m in margin)
    slices = tuple(slice(o, o + z) for o, z in zip(offsets, size, strict=True))
    return slices, offsets


def crop_arrays(
    arrays: Sequence[np.ndarray | None], margin: Sequence[int], rng: np.random.Generator | None
) -> list[np.ndarray | None]:
    """Apply one crop (see :func:`crop_offsets`) to every array (``None`` passes through)."""
    present = [a for a in arrays if a is not None]
    if not present:
        return list(arrays)
    shape = present[0].shape
    for a in present[1:]:
        if a.shape != shape:
            raise ValueError(f"arrays to crop differ in shape: {shape} vs {a.shape}")
    slices, _ = crop_offsets(shape, margin, rng)
    return [None if a is None else a[slices] for a in arrays]


class PairDataset(Dataset):
    """Preprocessed (moving, fixed) pairs of subjects as torch tensors.

    ``__getitem__`` returns ``{"moving", "fixed"}`` float32 tensors of shape
    ``(1, *S)`` in [0, 1] and, when the subjects have labels,
    ``{"moving_label", "fixed_label"}`` int64 tensors of the same shape. Use
    :meth:`pair_names` for the subject names of an item.

    Parameters
    ----------
    subjects: the subjects (:func:`discover_subjects`).
    pairs: (moving, fixed) index pairs into ``subjects``; default every ordered
        pair of distinct subjects (:func:`ordered_pairs`).
    factor, window, keep: preprocessing (:func:`preprocess_subject`).
    crop_margin: ``None`` for no crop, else the per-side margin, e.g.
        :data:`ABDOMEN_CROP` = (12, 10, 20); output size ``S - 2 * margin``. Both
        images (and labels) of a pair get the same crop.
    random_crop: draw the crop position (training); ``False`` gives the centred crop.
    rng: a :class:`numpy.random.Generator` to draw crops from (stateful; results
        depend on the order of calls, and DataLoader workers each hold a copy).
    seed: used when ``rng`` is None: the crop of item ``i`` comes from
        ``default_rng([seed, epoch, i])``, reproducible in any order and in any
        worker. Call :meth:`set_epoch` to get new crops each epoch.
    cache: keep preprocessed subjects in memory (per process).
    """

    def __init__(
        self,
        subjects: Sequence[Subject],
        pairs: Sequence[tuple[int, int]] | None = None,
        *,
        factor: float | Sequence[float] | None = DEFAULT_FACTOR,
        window: tuple[float, float] | None = DEFAULT_WINDOW,
        keep: Sequence[int] | None = ABDOMEN_ORGANS,
        crop_margin: Sequence[int] | None = None,
        random_crop: bool = True,
        rng: np.random.Generator | None = None,
        seed: int = 0,
        cache: bool = True,
    ) -> None:
        self.subjects = list(subjects)
        if len(self.subjects) < 2 and pairs is None:
            raise RanregError(f"need at least 2 subjects to form pairs, got {len(self.subjects)}")
        n = len(self.subjects)
        if pairs is None:
            pairs = ordered_pairs(range(n))
        self.pairs = [(int(i), int(j)) for i, j in pairs]
        for i, j in self.pairs:
            if not (0 <= i < n and 0 <= j < n):
                raise IndexError(f"pair ({i}, {j}) out of range for {n} subjects")
        self.factor = factor
        self.window = window
        self.keep = None if keep is None else tuple(keep)
        self.crop_margin = None if crop_margin is None else tuple(int(m) for m in crop_margin)
        self.random_crop = random_crop
        self.rng = rng
        self.seed = int(seed)
        self.epoch = 0
        self.cache = cache
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Change the crops drawn from ``seed`` (no effect when an ``rng`` was given)."""
        self.epoch = int(epoch)

    def pair_names(self, index: int) -> tuple[str, str]:
        """(moving name, fixed name) of item ``index``."""
        i, j = self.pairs[index]
        return self.subjects[i].name, self.subjects[j].name

    def subject_arrays(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Preprocessed (image, label) of subject ``k`` (cached)."""
        if k in self._cache:
            return self._cache[k]
        subject = self.subjects[k]
        image, label, _ = load_subject(subject)
        image, label = preprocess_subject(
            image, label, factor=self.factor, window=self.window, keep=self.keep
        )
        if label is not None:
            label = label.astype(np.int16 if int(label.max(initial=0)) < 2**15 else np.int32)
        if self.cache:
            self._cache[k] = (image, label)
        return image, label

    def _crop_rng(self, index: int) -> np.random.Generator | None:
        if not self.random_crop:
            return None
        if self.rng is not None:
            return self.rng
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index = index % len(self)
        i, j = self.pairs[index]
        mov, mov_lab = self.subject_arrays(i)
        fix, fix_lab = self.subject_arrays(j)
        if mov.shape != fix.shape:
            raise RanregError(
                f"{self.subjects[i].image} and {self.subjects[j].image} have different "
                f"shapes after preprocessing: {mov.shape} vs {fix.shape}"
            )
        arrays: list[np.ndarray | None] = [mov, fix, mov_lab, fix_lab]
        if self.crop_margin is not None:
            arrays = crop_arrays(arrays, self.crop_margin, self._crop_rng(index))
        out = {
            "moving": _tensor(arrays[0], torch.float32),
            "fixed": _tensor(arrays[1], torch.float32),
        }
        if arrays[2] is not None and arrays[3] is not None:
            out["moving_label"] = _tensor(arrays[2], torch.int64)
            out["fixed_label"] = _tensor(arrays[3], torch.int64)
        return out


def _tensor(array: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor:
    assert array is not None
    # always a fresh copy: callers may modify the batch in place without touching the cache
    return torch.from_numpy(np.array(array[None], copy=True)).to(dtype)
