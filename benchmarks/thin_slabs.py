"""Thin slabs of a real scan: registered to themselves and under known in-plane motion.

    python benchmarks/thin_slabs.py --out docs/results/thin-slabs-validation.md
    python benchmarks/thin_slabs.py --ranreg OTHER_RANREG   # another install, same cases

The validation scan (the shared chest CT, 1.5 mm) cut into axial slabs of :data:`SLICES`
slices from slice :data:`FIRST_SLICE` (earlier where they would not fit; the last is the
whole scan, for reference): a few slices of a CT, or a thick-slice MR, are what some users
have. Each slab is registered with the default
``ranreg register`` (its subprocess, as a user runs it) to itself and to
:data:`MOTIONS` copies moved in its plane: the moving slab is the whole scan resampled on
the slab's grid under a rigid map T (a rotation of up to :data:`MAX_DEGREES` about the
slab's normal through its centre and a shift of up to :data:`MAX_SHIFT_MM` in its
plane), so the true displacement is ``T(p) - p`` with nothing cut off at the slab's faces.
Both images get independent noise of SD :data:`NOISE_HU`. Scores, in the body
(> -500 HU) where ``T(p)`` lies inside the moving slab (elsewhere the moving image has no
data for ``p``): the affine stage's error ``|A(p) - T(p)|`` (``affine.txt``) and the whole
registration's end-point error ``|u(p) - (T(p) - p)|`` (``ddf.nii.gz``), in mm.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance  # noqa: E402
from real_scans import SHARED_SCANS, case_arguments, load_ddf  # noqa: E402

SLICES = (3, 6, 12, 20, 40, 164)  # 164: the whole scan, for reference
FIRST_SLICE, MOTIONS, MAX_DEGREES, MAX_SHIFT_MM, NOISE_HU = 80, 3, 10.0, 8.0, 10.0
SCAN = SHARED_SCANS / "chest-ct-1p5mm.nii.gz"


def in_plane_rigid(rng: np.random.Generator, centre: np.ndarray, normal: np.ndarray):
    """A 4x4 world map: rotation about ``normal`` through ``centre``, shift in the plane."""
    from scipy.spatial.transform import Rotation

    m = np.eye(4)
    m[:3, :3] = Rotation.from_rotvec(
        normal * np.radians(rng.uniform(-1, 1) * MAX_DEGREES)
    ).as_matrix()
    shift = rng.uniform(-1, 1, 3) * MAX_SHIFT_MM
    shift -= normal * (shift @ normal)
    m[:3, 3] = centre - m[:3, :3] @ centre + shift
    return m


def make_pair(scan: np.ndarray, affine: np.ndarray, slices: int, motion: int, work: Path):
    """Fixed and moving slab files and the true world map (the identity for motion 0)."""
    rng = np.random.default_rng([slices, motion])
    slab_affine = affine.copy()
    first = min(FIRST_SLICE, scan.shape[2] - slices)
    slab_affine[:3, 3] = affine[:3, :3] @ [0, 0, first] + affine[:3, 3]
    shape = (*scan.shape[:2], slices)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = idx @ slab_affine[:3, :3].T + slab_affine[:3, 3]
    normal = slab_affine[:3, 2] / np.linalg.norm(slab_affine[:3, 2])
    truth = np.eye(4)
    if motion:
        truth = in_plane_rigid(rng, world.reshape(-1, 3).mean(0), normal)
    fixed = scan[:, :, first : first + slices]
    moved = world @ truth[:3, :3].T + truth[:3, 3]
    vox = moved @ np.linalg.inv(slab_affine)[:3, :3].T + np.linalg.inv(slab_affine)[:3, 3]
    overlap = ((vox >= -0.5) & (vox <= np.asarray(shape) - 0.5)).all(-1)
    # moving(q) = scan(T^-1 q), so that fixed(p) = moving(T p)
    src = (world @ np.linalg.inv(truth)[:3, :3].T + np.linalg.inv(truth)[:3, 3]) @ np.linalg.inv(
        affine
    )[:3, :3].T + np.linalg.inv(affine)[:3, 3]
    moving = ndimage.map_coordinates(scan, np.moveaxis(src, -1, 0), order=1, mode="nearest")
    case = work / f"slab{slices}-m{motion}"
    case.mkdir(parents=True, exist_ok=True)
    for name, image in (("fixed", fixed), ("moving", moving)):
        noisy = image + rng.normal(0.0, NOISE_HU, image.shape)
        nib.save(nib.Nifti1Image(noisy.astype(np.float32), slab_affine), case / f"{name}.nii.gz")
    return case, truth, world, (fixed > -500) & overlap


def score(out: Path, truth: np.ndarray, world: np.ndarray, body: np.ndarray) -> dict:
    from ranreg.affine import read_itk_affine

    p = world[body]
    found = read_itk_affine(out / "affine.txt")
    affine_err = np.linalg.norm(p @ (found - truth)[:3, :3].T + (found - truth)[:3, 3], axis=1)
    true_u = p @ truth[:3, :3].T + truth[:3, 3] - p
    epe = np.linalg.norm(load_ddf(out / "ddf.nii.gz")[body] - true_u, axis=1)
    return {"affine_mm": float(affine_err.mean()), "epe_mm": float(epe.mean())}


def main() -> int:
    args = case_arguments(__doc__, "thin-slabs")
    exe, work = args.ranreg, Path(args.work)
    img = nib.load(SCAN)
    scan = np.asarray(img.dataobj, dtype=np.float32)
    rows = []
    for slices in SLICES:
        for motion in range(MOTIONS + 1):
            case, truth, world, body = make_pair(scan, img.affine, slices, motion, work)
            out = case / "out"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [exe, "register", "--fixed", str(case / "fixed.nii.gz")]
            cmd += ["--moving", str(case / "moving.nii.gz"), "--out", str(out), "--no-progress"]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            row = {"slices": slices, "motion": motion, "s": time.perf_counter() - start}
            rows.append(row | score(out, truth, world, body))
            print(json.dumps(rows[-1]), flush=True)
    write(Path(args.out), rows)
    return 0


def write(path: Path, rows: list[dict]) -> None:
    lines = ["# Thin slabs of a real scan", "", *provenance(), ""]
    lines += [__doc__.split("\n\n", 2)[2].strip(), ""]
    lines += [
        "| slices (mm) | to itself: affine / EPE (mm) | moved: affine (mm) | "
        "moved: EPE (mm) | s per pair |",
        "|---|---:|---:|---:|---:|",
    ]
    for slices in SLICES:
        sel = [r for r in rows if r["slices"] == slices]
        self_row = next(r for r in sel if r["motion"] == 0)
        moved = [r for r in sel if r["motion"] > 0]
        lines.append(
            f"| {slices} ({slices * 1.5:g}) | {self_row['affine_mm']:.2f} / "
            f"{self_row['epe_mm']:.2f} | {np.mean([r['affine_mm'] for r in moved]):.2f} | "
            f"{np.mean([r['epe_mm'] for r in moved]):.2f} | "
            f"{np.mean([r['s'] for r in sel]):.1f} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
