"""What a training run learns from: subjects in memory and the samples of every step.

Every sample of step t comes from ``default_rng([seed, stage, t, rank, slot])``, so a run
resumed from a checkpoint sees exactly the batches the uninterrupted run would have seen.
Synthetic stages draw one subject and a known field (the paper's stage 1, or the pairs of
:mod:`ranreg.data.pairs` when the stage sets ``pairs``, ``swap`` or ``augment``);
unsupervised stages draw an ordered pair of distinct subjects.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from ranreg.config import StageConfig, TrainConfig, mix_source
from ranreg.data.datasets import crop_offsets, discover_splits, discover_subjects, load_subject
from ranreg.data.io import max_voxels
from ranreg.data.pairs import PairRecipe, augment_batch, make_pair, swapped
from ranreg.data.preprocess import preprocess_subject, select_labels
from ranreg.data.shapes import shapes_subjects
from ranreg.data.synth_images import synthesize_dataset
from ranreg.errors import RanregError
from ranreg.synth import random_ddf
from ranreg.validation import BODY_LEVEL, scan_on_grid

__all__ = [
    "MixedSamples",
    "StepSamples",
    "SubjectData",
    "fit_to_shape",
    "load_subjects",
    "load_train_scans",
    "stage_samples",
]


@dataclass
class SubjectData:
    """A preprocessed subject: image in [0, 1] and optional label map, both (*S)."""

    name: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...] | None = None  # voxel size (mm) after preprocessing
    tissues: np.ndarray | None = None  # every label (organs and the rest), for painting


def load_subjects(
    cfg: TrainConfig, out_dir: Path, progress: bool = True
) -> tuple[list[SubjectData], list[SubjectData]]:
    """Training and validation subjects of ``cfg.data``, preprocessed, in memory."""
    data = cfg.data
    if data.shapes is not None:
        count = int(data.shapes.get("count", 8))
        subjects = [
            SubjectData(n, i, lab.astype(np.int64))
            for n, i, lab in shapes_subjects(data.shapes["size"], count, seed=cfg.seed)
        ]
        return _split(cfg, subjects, None)

    root = Path(data.root) if data.root else _synthesised_root(cfg, out_dir, progress)
    if not root.is_dir():
        raise RanregError(f"{root}: data folder not found")
    splits = discover_splits(root) if any((root / s).is_dir() for s in ("train", "val")) else {}
    if splits.get("train"):
        train_s, val_s = splits["train"], splits.get("val", [])
        if data.subjects:
            train_s = train_s[: data.subjects]
        return [_preprocess(cfg, s) for s in train_s], [_preprocess(cfg, s) for s in val_s]
    found = discover_subjects(root)
    if data.subjects:
        found = found[: data.subjects]
    return _split(cfg, [_preprocess(cfg, s) for s in found], root)


def _split(
    cfg: TrainConfig, subjects: list[SubjectData], root: Path | None
) -> tuple[list[SubjectData], list[SubjectData]]:
    n_train = cfg.data.train if cfg.data.train is not None else len(subjects) - cfg.data.val
    if n_train < 2 or n_train + cfg.data.val > len(subjects):
        where = root or "data.shapes"
        raise RanregError(
            f"{where}: {len(subjects)} subjects cannot give {n_train} training (>= 2) and "
            f"{cfg.data.val} validation subjects"
        )
    return subjects[:n_train], subjects[n_train : n_train + cfg.data.val]


def _preprocess(cfg: TrainConfig, subject: Any) -> SubjectData:
    image, label, affine = load_subject(subject)
    window = None if cfg.data.window is None else tuple(cfg.data.window)
    shape_in = image.shape
    grown = float(np.prod(shape_in)) * (cfg.data.factor or 1.0) ** len(shape_in)
    if grown > max_voxels():
        raise RanregError(
            f"{subject.image}: data.factor {cfg.data.factor:g} would give {grown:.3g} voxels, "
            f"over the limit of {max_voxels():.3g} (raise it with RANREG_MAX_VOXELS)"
        )
    try:
        image, every = preprocess_subject(
            image, label, factor=cfg.data.factor, window=window, keep=None
        )
    except RanregError as exc:
        raise RanregError(f"{subject.image}: {exc}") from None
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0) * np.divide(shape_in, image.shape)
    organs = None if every is None else select_labels(every, cfg.data.organs).astype(np.int64)
    return SubjectData(
        subject.name,
        image,
        organs,
        tuple(round(float(v), 4) for v in spacing),
        None if every is None else every.astype(np.int64),
    )


def load_train_scans(cfg: TrainConfig, like: SubjectData) -> list[SubjectData]:
    """``data.train_scans`` as subjects without labels on the grid of ``like`` (its voxel
    size and shape), so that they batch with the painted subjects."""
    if not cfg.data.train_scans:
        return []
    if like.spacing is None or len(set(like.spacing)) != 1:
        raise RanregError("data.train_scans needs training subjects on one isotropic grid")
    spacing = float(like.spacing[0])
    return [
        SubjectData(
            Path(path).name,
            fit_to_shape(scan_on_grid(path, spacing, cfg.data.window), like.image.shape),
            None,
            like.spacing,
        )
        for path in cfg.data.train_scans
    ]


def fit_to_shape(image: np.ndarray, shape: tuple[int, ...], body: float = BODY_LEVEL) -> np.ndarray:
    """``image`` cropped or zero-padded to ``shape``, its body (values above ``body``)
    centred: a scan's field of view rarely matches the training grid."""
    inside = image > body
    centre = ndimage.center_of_mass(inside) if inside.any() else [(n - 1) / 2 for n in image.shape]
    out = np.zeros(shape, dtype=np.float32)
    src, dst = [], []
    for c, n, m in zip(centre, image.shape, shape, strict=True):
        start = int(round(c - (m - 1) / 2))  # where out's first voxel lies in image
        lo, hi = max(start, 0), min(start + m, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = image[tuple(src)]
    return out


def _synthesised_root(cfg: TrainConfig, out_dir: Path, progress: bool) -> Path:
    """Images painted from ``data.labels`` (cached; built once, atomically)."""
    labels = Path(cfg.data.labels)
    if not labels.is_dir():
        raise RanregError(f"{labels}: labels folder not found")
    cache = Path(cfg.data.cache) if cfg.data.cache else out_dir / "synth-data"
    if (cache / "images").is_dir():
        return cache
    files = sorted(p for p in labels.glob("*.nii.gz") if not p.name.startswith("."))
    if cfg.data.subjects:
        files = files[: cfg.data.subjects]
    if not files:
        raise RanregError(f"{labels}: no *.nii.gz label maps found")
    with tempfile.TemporaryDirectory(
        prefix=".labels-", dir=cache.parent if cache.parent.exists() else None
    ) as tmp:
        for f in files:  # only the subjects the run uses
            os.symlink(f.resolve(), Path(tmp) / f.name)
        synthesize_dataset(tmp, cache, seed=cfg.data.synth_seed, progress=progress)
    return cache


class StepSamples(Dataset):
    """Item ``step * batch + slot`` of a stage: a deterministic function of its index.

    ``recipe_index``: draw the samples as that stage does (a mixed stage's known-field
    steps), from the random streams of stage ``stage_index``.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        stage_index: int,
        subjects: list[SubjectData],
        rank: int,
        recipe_index: int | None = None,
        scans: list[SubjectData] | None = None,
    ) -> None:
        self.cfg, self.stage_index, self.rank = cfg, stage_index, rank
        self.length = cfg.stages[stage_index].steps * cfg.stages[stage_index].batch_size
        self.stage = cfg.stages[stage_index if recipe_index is None else recipe_index]
        self.subjects = subjects
        self.scans = scans or []
        options = {k: v for k, v in self.stage.pairs.items() if k != "scans"}
        self.scan_share = float(self.stage.pairs.get("scans", 0.0))
        self.recipe = PairRecipe(deformation=dict(self.stage.deformation), **options)
        self._cache: tuple[tuple[int, int], dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        step, slot = divmod(index, self.stage.batch_size)
        if self.stage.kind == "synthetic" and _uses_pairs(self.stage):
            return _tensors(self._known_field_pair(step, slot))
        rng = np.random.default_rng([self.cfg.seed, self.stage_index, step, self.rank, slot])
        n = len(self.subjects)
        if self.stage.kind == "synthetic":
            picks = [self.subjects[int(rng.integers(n))]]
        else:
            i = int(rng.integers(n))
            j = int(rng.integers(n - 1))
            picks = [self.subjects[i], self.subjects[j + (j >= i)]]
        slices = self._crop(picks[0].image.shape, rng)
        out: dict[str, torch.Tensor] = {}
        names = ("moving", "fixed")
        for name, s in zip(names, picks, strict=False):
            out[name] = torch.from_numpy(np.ascontiguousarray(s.image[slices]))[None]
            if s.label is not None:
                out[name + "_label"] = torch.from_numpy(np.ascontiguousarray(s.label[slices]))[None]
        if self.stage.kind == "synthetic":
            ddf, _ = random_ddf(out["moving"].shape[1:], rng, **self.stage.deformation)
            out["ddf_true"] = torch.from_numpy(ddf)
        return out

    def _crop(self, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[slice, ...]:
        if self.cfg.data.crop is None:
            return tuple(slice(None) for _ in shape)
        return crop_offsets(shape, self.cfg.data.crop, rng)[0]

    def _known_field_pair(self, step: int, slot: int) -> dict[str, np.ndarray]:
        """A pair of one subject under a known field (:mod:`ranreg.data.pairs`); with
        ``swap`` odd slots hold the previous slot's pair turned round. Augmentation draws
        once per step, so every slot of a batch has the same shape."""
        base = slot - slot % 2 if self.stage.swap else slot
        key = (step, base)
        if self._cache is None or self._cache[0] != key:
            rng = np.random.default_rng([self.cfg.seed, self.stage_index, step, self.rank, base])
            s = self._subject(rng)
            sl = self._crop(s.image.shape, rng)
            tissue = None if s.tissues is None else np.ascontiguousarray(s.tissues[sl])
            pair = make_pair(
                np.ascontiguousarray(s.image[sl]),
                tissue,
                s.spacing or (1.0,) * 3,
                rng,
                self.recipe,
            )
            if "moving_label" not in pair and self.subjects[0].tissues is not None:
                # a real scan has no labels: empty maps, so that it batches with subjects
                empty = np.zeros(pair["moving"].shape, dtype=np.int64)
                pair["moving_label"], pair["fixed_label"] = empty, empty.copy()
            if "moving_label" in pair:  # Dice and losses see the organs only; selecting
                # after the nearest-neighbour warp equals warping the selected map
                for key in ("moving_label", "fixed_label"):
                    pair[key] = select_labels(pair[key], self.cfg.data.organs)
            self._cache = (key, pair)
        pair = self._cache[1]
        if self.stage.swap and slot % 2:
            pair = swapped(pair)
        pair.setdefault("ddf_weight", np.ones(pair["moving"].shape, dtype=np.float32))
        if self.stage.augment:
            rng = np.random.default_rng([self.cfg.seed, self.stage_index, step, self.rank, 2**31])
            pair = augment_batch(pair, rng)
        return pair

    def _subject(self, rng: np.random.Generator) -> SubjectData:
        """A training subject, or with the stage's ``pairs.scans`` share a real scan (no
        draw without scans, so that runs without them keep their random streams)."""
        if self.scans and self.scan_share > 0 and rng.random() < self.scan_share:
            return self.scans[int(rng.integers(len(self.scans)))]
        return self.subjects[int(rng.integers(len(self.subjects)))]


class MixedSamples(Dataset):
    """A mixed stage's items: every ``every``-th step (the last of each group of
    ``every``) comes from ``mixed`` (the known-field stage it names), the rest from
    ``own``; all items of one step come from one source, so a batch is of one kind."""

    def __init__(self, own: StepSamples, mixed: StepSamples, every: int, batch: int) -> None:
        self.own, self.mixed, self.every, self.batch = own, mixed, every, batch

    def __len__(self) -> int:
        return len(self.own)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        step = index // self.batch
        source = self.mixed if step % self.every == self.every - 1 else self.own
        return source[index]


def stage_samples(
    cfg: TrainConfig,
    index: int,
    subjects: list[SubjectData],
    rank: int,
    scans: list[SubjectData] | None = None,
) -> Dataset:
    """The samples of stage ``index``, with the known-field steps of a mixed stage;
    ``scans``: real scans for the stages' ``pairs.scans`` share (:func:`load_train_scans`)."""
    stage = cfg.stages[index]
    own = StepSamples(cfg, index, subjects, rank, scans=scans)
    if stage.mix is None:
        return own
    source = mix_source(cfg.stages, index)
    mixed = StepSamples(cfg, index, subjects, rank, recipe_index=source, scans=scans)
    return MixedSamples(own, mixed, stage.mix_every, stage.batch_size)


def _uses_pairs(stage: StageConfig) -> bool:
    return bool(stage.pairs) or stage.swap or stage.augment


def _tensors(pair: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Images and labels gain a channel axis (1, *S); fields keep theirs (d, *S)."""
    out = {}
    for key, value in pair.items():
        t = torch.from_numpy(np.ascontiguousarray(value))
        out[key] = t if key == "ddf_true" else t[None]
    return out
