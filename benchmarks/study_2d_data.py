"""Data of the 2D study (benchmarks/study_2d.py, issue 14): slices of the real anatomy.

Every shared abdomen subject is painted as `ranreg data synth --seed 0` paints it (CT look,
benchmarks/common.py) and resampled to the paper's 4 mm grid (96x80x128); axial (96x80)
and coronal (96x128) planes are cut where the organs cover the most of the plane
(:mod:`ranreg.data.slices`). Beside the image each plane keeps the full label map (13
organs: the sliding groups need them), the 9 evaluated organs, and three tissue maps
(:func:`ranreg.data.contrast.tissue_map`, drawn in 3D and cut with the plane) for the
random-contrast style.

Subjects split as in the 3D benchmarks (file order): 14 train, 2 validation (0025, 0026),
4 test (0027-0030). Training pairs (:func:`training_batch`) come from
:func:`ranreg.data.pairs.make_pair`: half CT look, half random contrast; half of the fields
a sliding motion of the two organ groups (:data:`ranreg.sliding.DEFAULT_SLIDING_GROUPS`)
against a still body wall, 5 % identity pairs, the rest smooth warps (:data:`SMOOTH`).
Validation and test pairs (:func:`known_pairs`) are CT look only, one sliding and one
smooth field per plane, drawn from fixed seeds, with the regions of the sliding field kept
for the boundary error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import SHARED_LABELS, TEST_SUBJECTS, painted_subject

SPACING_MM = 4.0
ORGANS = (1, 2, 3, 5, 6, 8, 9, 10, 11)  # the paper's evaluated organs
COUNTS = {
    "train": {"axial": 8, "coronal": 6},
    "val": {"axial": 4, "coronal": 4},
    "test": {"axial": 4, "coronal": 4},
}
TISSUE_DRAWS = 3
BOUNDARY_WIDTH = 2  # pixels each side of a sliding boundary (8 mm)
#: Sliding fields: two organ groups each move rigidly (up to 10 degrees, 5 % of the plane)
#: while the body wall and air stay still.
SLIDE: dict[str, Any] = {"max_angle": math.pi / 18, "static_background": True}
#: Smooth fields (pixels at 4 mm): rotation up to 10 degrees, shift up to 12 mm, TPS and
#: gaussian bumps of up to 12 mm.
SMOOTH: dict[str, Any] = {
    "max_angle": math.pi / 18,
    "max_translation": 3.0,
    "tps_scale": 3.0,
    "bump_scale": 3.0,
    "bump_sigma": 8.0,
}
NOISE = 0.02


def split_subjects() -> dict[str, list[str]]:
    names = sorted(p.name.split(".")[0] for p in SHARED_LABELS.glob("*.nii.gz"))
    test = [n for n in names if n in TEST_SUBJECTS]
    rest = [n for n in names if n not in TEST_SUBJECTS]
    return {"train": rest[:14], "val": rest[14:16], "test": test}


def recipe() -> Any:
    from ranreg.data.pairs import PairRecipe

    return PairRecipe(
        styles={"image": 0.5, "random": 0.5},
        identity=0.05,
        sliding=0.5,
        noise=NOISE,
        deformation=SMOOTH,
        sliding_deformation=SLIDE,
    )


def subject_volumes(name: str) -> dict[str, np.ndarray]:
    """One subject at 4 mm: image in [0, 1], full labels, the 9 organs, tissue maps."""
    from ranreg.data.contrast import tissue_map
    from ranreg.data.io import load_label_volume
    from ranreg.data.preprocess import resample, window_normalize

    image_hu, organs, _ = painted_subject(SHARED_LABELS, name, 0.5)
    vol = load_label_volume(SHARED_LABELS / f"{name}.nii.gz")
    labels = resample(vol.array, 0.5, order=0, affine=vol.affine).array.astype(np.int64)
    rng = np.random.default_rng([7, int(name)])
    spacing = (SPACING_MM,) * 3
    out = {"image": window_normalize(image_hu), "labels": labels, "organs": organs}
    for k in range(TISSUE_DRAWS):
        out[f"tissues{k}"] = tissue_map(labels, spacing, rng)
    return out


def load_split(split: str, cache: Path) -> list[Any]:
    """The planes of one split (:class:`ranreg.data.slices.Slice`), cut once into
    ``cache/<split>.npz`` and read from there afterwards."""
    from ranreg.data.slices import subject_slices

    file = cache / f"{split}.npz"
    if not file.is_file():
        slices = []
        for name in split_subjects()[split]:
            slices += subject_slices(name, subject_volumes(name), COUNTS[split])
        write_split(file, slices)
    return read_split(file)


def write_split(file: Path, slices: list[Any]) -> None:
    """Planes in one ``.npz`` (keys ``i|subject|orientation|index|array``), atomically."""
    arrays = {
        f"{i}|{s.subject}|{s.orientation}|{s.index}|{k}": v
        for i, s in enumerate(slices)
        for k, v in s.arrays.items()
    }
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(file)


def read_split(file: Path) -> list[Any]:
    from ranreg.data.slices import Slice

    grouped: dict[tuple[str, str, str, str], dict[str, np.ndarray]] = {}
    with np.load(file) as data:
        for key in data.files:
            i, subject, orientation, index, name = key.split("|")
            grouped.setdefault((i, subject, orientation, index), {})[name] = data[key]
    ordered = sorted(grouped.items(), key=lambda kv: int(kv[0][0]))
    return [Slice(s, o, int(j), arrays) for (_, s, o, j), arrays in ordered]


def training_batch(slices: list[Any], seed: int, step: int, size: int) -> dict[str, torch.Tensor]:
    """The batch of ``step``: one orientation, ``size`` pairs; a function of
    ``(seed, step)`` alone, so a resumed run sees the batches an uninterrupted one sees."""
    from ranreg.data.pairs import make_pair

    rng = np.random.default_rng([seed, step])
    orientation = ("axial", "coronal")[int(rng.integers(2))]
    pool = [s for s in slices if s.orientation == orientation]
    pairs = []
    for _ in range(size):
        s = pool[int(rng.integers(len(pool)))]
        tissues = s.arrays[f"tissues{int(rng.integers(TISSUE_DRAWS))}"]
        spacing = (SPACING_MM, SPACING_MM)
        pairs.append(
            make_pair(s.arrays["image"], s.arrays["labels"], spacing, rng, recipe(), tissues)
        )
    batch = {k: torch.from_numpy(np.stack([p[k] for p in pairs])) for k in ("moving", "fixed")}
    batch = {k: v[:, None] for k, v in batch.items()}  # (B, 1, H, W)
    batch["ddf_true"] = torch.from_numpy(np.stack([p["ddf_true"] for p in pairs]))
    batch["image_weight"] = torch.tensor([float(p["image_weight"]) for p in pairs])
    return batch


def known_pairs(slices: list[Any], seed: int) -> list[dict[str, Any]]:
    """One sliding and one smooth pair per plane (CT look, independent noise): the moving
    plane, the fixed one under the known field, organs, body and (sliding) regions."""
    from ranreg.data.pairs import warp_array
    from ranreg.sliding import random_sliding_ddf
    from ranreg.synth import random_ddf

    out = []
    for i, s in enumerate(slices):
        a = s.arrays
        for j, kind in enumerate(("sliding", "smooth")):
            rng = np.random.default_rng([seed, i, j])
            if kind == "sliding":
                ddf, regions = random_sliding_ddf(a["labels"], rng, **SLIDE)
            else:
                ddf, regions = random_ddf(a["image"].shape, rng, **SMOOTH)[0], None
            noise = [NOISE * rng.standard_normal(ddf.shape[1:], dtype=np.float32) for _ in "mf"]
            out.append(
                {
                    "name": f"{s.subject}-{s.orientation}{s.index}-{kind}",
                    "kind": kind,
                    "orientation": s.orientation,
                    "moving": np.clip(a["image"] + noise[0], 0, 1),
                    "fixed": np.clip(warp_array(a["image"], ddf, False) + noise[1], 0, 1),
                    "moving_organs": a["organs"].astype(np.int64),
                    "fixed_organs": warp_array(a["organs"].astype(np.int64), ddf, True),
                    "body": warp_array((a["tissues0"] > 0).astype(np.int64), ddf, True) > 0,
                    "ddf": ddf.astype(np.float32),
                    "regions": regions,
                }
            )
    return out


def score(pair: dict[str, Any], ddf: np.ndarray) -> dict[str, float]:
    """End-point error (mm) in the body and, for sliding pairs, within
    :data:`BOUNDARY_WIDTH` pixels of a sliding boundary; Dice of each organ present in the
    fixed plane (warped moving organs, nearest neighbour); folding % and SD log J."""
    from ranreg.data.pairs import warp_array
    from ranreg.metrics import dice, jacobian_stats
    from ranreg.sliding import sliding_boundary_mask

    error = np.linalg.norm(ddf - pair["ddf"], axis=0) * SPACING_MM
    body = pair["body"]
    row: dict[str, float] = {"epe_mm": float(error[body].mean())}
    if pair["regions"] is not None:
        near = sliding_boundary_mask(pair["regions"], BOUNDARY_WIDTH) & body
        row["epe_boundary_mm"] = float(error[near].mean()) if near.any() else math.nan
    warped = warp_array(pair["moving_organs"], ddf, True)
    present = [o for o in ORGANS if (pair["fixed_organs"] == o).any()]
    for organ, value in dice(warped, pair["fixed_organs"], present).items():
        row[f"dice_{organ}"] = float(value)
    row["dice"] = float(np.mean([row[f"dice_{o}"] for o in present])) if present else math.nan
    row.update(jacobian_stats(ddf))
    return row
