"""Real scans registered to copies deformed by known fields, and the painted abdomen pairs.

    python benchmarks/real_scans.py --split validation     # the only split to tune on
    python benchmarks/real_scans.py --split test --out docs/results/real-scans.md
    python benchmarks/real_scans.py --quick --split validation    # smoke run, a few minutes
    python benchmarks/real_scans.py --method default --method refine50="--refine 50"

Every method is one ``ranreg register`` command line, run as a user runs it (a subprocess
of ``.venv/bin/ranreg``, timed from process start to exit). Built-in methods: ``default``
(no extra arguments), ``fast`` (``--fast``), ``ants-syn`` (``--model ants-syn``),
``convex-adam`` (``--model convex-adam --affine affine``), ``identity`` (``--model
identity``); ``--method NAME="ARGS"`` adds any other setting. A
method whose arguments the installed ``ranreg`` rejects (exit 2, "unrecognized
arguments") is recorded as skipped, not fatal.

Real-scan cases (true field exact, no inversion): a real scan S (world affine A) is the
MOVING image, unchanged. The FIXED image is S resampled on its own grid under a known world
map T, fixed(p) = S(T(p)) (linear; labels nearest) plus Gaussian noise, so the true
``ranreg`` displacement (docs/registration.md, DDF convention) is u(p) = T(p) - p in world
mm. T(p) = R (q - c) + c + t with q = p + d(p) + v 1_B(p): a rotation R about a random axis
through the body centre c, a shift t, a Gaussian-smoothed random field d, and, in sliding
cases, a shift v of the region B on one side of a curved surface through c, tangential to
the surface everywhere, so the motion jumps by |v| across it (see :data:`KINDS`). Everything
is drawn from ``numpy.random.default_rng([seed, crc32(scan name), crc32(kind)])``. Kinds:
*smooth* (rotation 3-15 degrees, shift 5-15 mm, d at most 8-15 mm, width 25-35 mm),
*sliding* (the same plus a 5-10 mm slide), *large* (rotation 15-30 degrees, shift 15-40 mm,
smooth and sliding parts as before); seeds 0 and 1 of each (6 cases per scan), ``--quick``:
sliding seed 0. Fixed-image noise: SD 10 HU (CT), 1 % of the body's 99th percentile (MR).

Body: CT > -500 HU, MR above an Otsu threshold; largest component, holes filled in 3D and
per axial slice. Labels: the scan's label file, plus (``Scan.derive``, or no file) classes
derived from the image 2 voxels inside the body after 1-voxel smoothing: CT *bright*
> 200 HU (bone, contrast-filled vessels and heart; 201) and *air* < -400 HU (lungs, bowel
gas; 202) where the file has background; MR intensity terciles (211-213).

Scores: end-point error |u_pred - u| (mm) inside the fixed image's body (mean, 95th
percentile, and the mean within :data:`BOUNDARY_WIDTH` voxels of the sliding surface),
Dice of the warped moving labels against the fixed labels (mean over labels with at least
:data:`MIN_LABEL_VOXELS` voxels in the fixed map), folding % and SD log det J (from
``metrics.json``), and wall time. Self-registration: each scan registered to itself (mean
and 99th percentile of |u| in the body). Painted pairs: ordered pairs of the shared
abdomen subjects painted as in ``benchmarks/accuracy.py`` (4 mm), Dice over the 9 organs.

Split: validation = the shared chest CT and abdominal MR, painted 0025 <-> 0026; test = the
held-out scans in ``benchmarks/data/`` (README there) and painted 0027-0030. Tune settings
on validation only. Cases are written once to ``--work`` and reused.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from common import ROOT, SHARED_LABELS, TEST_SUBJECTS, command_line, painted_subject, provenance
from scipy import ndimage

SHARED_SCANS = ROOT.parent / "shared" / "data" / "real-scans"
DATA = ROOT / "benchmarks" / "data"
#: Bump when the case generator changes: cached cases of another version are remade.
GENERATOR_VERSION = 1
BOUNDARY_WIDTH = 2  # voxels each side of the sliding surface
MIN_LABEL_VOXELS = 100  # labels smaller than this in the fixed map are not scored
CT_BODY_HU, CT_BRIGHT_HU, CT_AIR_HU = -500.0, 200.0, -400.0
#: Values of the labels derived from the image (above every TotalSegmentator class).
BRIGHT, AIR, MR_CLASSES = 201, 202, (211, 212, 213)
DERIVED_MARGIN = 2  # voxels: derived labels stay this far inside the body (no skin rim)
CT_NOISE_HU = 10.0  # SD of the noise added to a fixed CT
MR_NOISE = 0.01  # SD of the noise added to a fixed MR, times the body's 99th percentile
SMOOTH_SIGMA_MM = (25.0, 35.0)  # Gaussian width of the smooth random field
CURVATURE_PER_MM = (1 / 500, 1 / 200)  # of the sliding surface (either sign)
VALIDATION_PAINTED, TEST_PAINTED = ("0025", "0026"), TEST_SUBJECTS
BUILTIN_METHODS = {
    "default": (),
    "fast": ("--fast",),
    "ants-syn": ("--model", "ants-syn"),
    # ConvexAdam has no affine stage of its own: without ranreg's it failed on a validation
    # case with large motion (docs/benchmarks.md)
    "convex-adam": ("--model", "convex-adam", "--affine", "affine"),
    "identity": ("--model", "identity"),
}
DEFAULT_METHODS = ("default", "fast", "ants-syn", "identity")


@dataclass(frozen=True)
class Scan:
    """A real scan and where its labels come from."""

    name: str
    image: Path
    labels: Path | None  # label file on the image's grid, or None
    modality: str  # "CT" or "MR"
    split: str  # "validation" or "test"
    derive: bool  # add labels derived from the image where the file has background
    about: str


SCANS = (
    Scan(
        "chest-ct",
        SHARED_SCANS / "chest-ct-1p5mm.nii.gz",
        SHARED_SCANS / "chest-ct-1p5mm-aorta.nii.gz",
        "CT",
        "validation",
        True,
        "contrast chest CT, 120x126x164, 1.5 mm, LPS; aorta label + derived bright and air",
    ),
    Scan(
        "abdomen-mr",
        SHARED_SCANS / "abdomen-mr-3mm.nii.gz",
        DATA / "abdomen-mr-3mm-totalseg.nii.gz",
        "MR",
        "validation",
        False,
        "abdominal MR, 117x91x20, 3 mm, LPS; TotalSegmentator total_mr labels (24 classes)",
    ),
    Scan(
        "abdomen-ct",
        DATA / "abdomen-ct-3mm.nii.gz",
        DATA / "abdomen-ct-3mm-vertebrae.nii.gz",
        "CT",
        "test",
        True,
        "abdominal CT pelvis to T11, 122x101x112, 3 mm, RAS; 8 vertebrae + derived bright, air",
    ),
    Scan(
        "abdomen-ct-slab",
        DATA / "abdomen-ct-slab-3mm.nii.gz",
        DATA / "abdomen-ct-slab-3mm-totalseg.nii.gz",
        "CT",
        "test",
        False,
        "upper-abdomen slab of the same CT, 122x101x30, 3 mm, RAS; TotalSegmentator labels "
        "(41 classes)",
    ),
)


@dataclass(frozen=True)
class Motion:
    """Ranges (low, high) of one kind of known motion."""

    name: str
    angle_deg: tuple[float, float]
    shift_mm: tuple[float, float]
    smooth_mm: tuple[float, float]  # maximum of the smooth field inside the body
    slide_mm: tuple[float, float] | None  # jump across the sliding surface, None: no sliding


KINDS = {
    "smooth": Motion("smooth", (3.0, 15.0), (5.0, 15.0), (8.0, 15.0), None),
    "sliding": Motion("sliding", (3.0, 15.0), (5.0, 15.0), (8.0, 15.0), (5.0, 10.0)),
    "large": Motion("large", (15.0, 30.0), (15.0, 40.0), (8.0, 15.0), (5.0, 10.0)),
}
FULL_CASES = tuple(itertools.product(KINDS, (0, 1)))  # 6 cases per scan
QUICK_CASES = (("sliding", 0),)


@dataclass(frozen=True)
class Method:
    """A named ``ranreg register`` setting: the arguments added to the base command."""

    name: str
    args: tuple[str, ...]


@dataclass
class Job:
    """One registration to run with every method, and what to score it against."""

    dataset: str
    split: str
    case: str
    kind: str  # motion kind, "painted" or "self"
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    truth: Path | None = None  # case folder with true_ddf, body, region
    organs: tuple[int, ...] | None = None  # labels to score (None: all large enough)
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ volumes
def load(path: Path, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) of a 3D NIfTI file."""
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=dtype).reshape(img.shape[:3]), img.affine.astype(float)


def save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write ``array`` with ``affine`` (qform and sform) to ``path``."""
    img = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def save_ddf(path: Path, ddf_mm: np.ndarray, affine: np.ndarray) -> None:
    """Write a world-mm field (X, Y, Z, 3) as ``ranreg`` does: (X, Y, Z, 1, 3), VECTOR."""
    img = nib.Nifti1Image(ddf_mm.astype(np.float32)[:, :, :, None, :], affine)
    img.header.set_intent("vector", (), name="ddf_mm_world")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def load_ddf(path: Path) -> np.ndarray:
    """The (X, Y, Z, 3) world-mm field of a ``ddf.nii.gz``."""
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32).reshape(*img.shape[:3], 3)


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel size along each array axis (mm)."""
    return np.linalg.norm(affine[:3, :3], axis=0)


def world_points(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World coordinates (mm) of every voxel centre, shape (*shape, 3)."""
    idx = np.indices(shape, dtype=np.float64)
    return np.einsum("ij,j...->...i", affine[:3, :3], idx) + affine[:3, 3]


def to_voxels(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel coordinates (3, *shape) of world points (*shape, 3), for map_coordinates."""
    inv = np.linalg.inv(affine)
    return np.einsum("ij,...j->i...", inv[:3, :3], points) + inv[:3, 3].reshape(3, 1, 1, 1)


# ---------------------------------------------------------------------- body and labels
def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that maximises the between-class variance of ``values``."""
    hist, edges = np.histogram(values, bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (mu0 - mu1) ** 2)])


def axial_axis(affine: np.ndarray) -> int:
    """The array axis closest to the world S axis (slices are filled along it)."""
    directions = affine[:3, :3] / spacing_of(affine)
    return int(np.argmax(np.abs(directions[2])))


def body_mask(image: np.ndarray, affine: np.ndarray, modality: str) -> np.ndarray:
    """Threshold (CT > -500 HU, MR Otsu), largest component, holes filled in 3D and per
    axial slice (so the lungs count as body)."""
    from ranreg.data.preprocess import largest_component

    threshold = CT_BODY_HU if modality == "CT" else otsu_threshold(image)
    mask = ndimage.binary_opening(image > threshold)
    mask = ndimage.binary_fill_holes(largest_component(mask))
    axis = axial_axis(affine)
    slices = [ndimage.binary_fill_holes(s) for s in np.moveaxis(mask, axis, 0)]
    return np.moveaxis(np.stack(slices), 0, axis)


def derived_labels(image: np.ndarray, body: np.ndarray, modality: str) -> np.ndarray:
    """Labels from the image (smoothed by 1 voxel), :data:`DERIVED_MARGIN` voxels inside
    the body. CT: :data:`BRIGHT` (> 200 HU: bone, contrast-filled vessels and heart) and
    :data:`AIR` (< -400 HU: lungs, bowel gas); MR: intensity terciles (:data:`MR_CLASSES`,
    dark to bright)."""
    smooth = ndimage.gaussian_filter(image, 1.0)
    inner = ndimage.binary_erosion(body, iterations=DERIVED_MARGIN)
    out = np.zeros(image.shape, np.uint8)
    if modality == "CT":
        out[inner & (smooth > CT_BRIGHT_HU)] = BRIGHT
        out[inner & (smooth < CT_AIR_HU)] = AIR
        return out
    edges = np.quantile(smooth[inner], [1 / 3, 2 / 3])
    out[inner] = np.asarray(MR_CLASSES, np.uint8)[np.searchsorted(edges, smooth[inner])]
    return out


def scan_labels(scan: Scan, image: np.ndarray, body: np.ndarray) -> np.ndarray:
    """The scan's label map: its file (if present), plus derived labels on its background
    when ``scan.derive`` or when there is no file."""
    labels = np.zeros(image.shape, np.uint8)
    if scan.labels is not None and scan.labels.is_file():
        labels = load(scan.labels, np.int64)[0].astype(np.uint8)
    if scan.derive or scan.labels is None or not scan.labels.is_file():
        extra = derived_labels(image, body, scan.modality)
        labels = np.where(labels == 0, extra, labels)
    return labels


# --------------------------------------------------------------------------- known motion
def rotation_matrix(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotation by ``angle_deg`` about the unit vector ``axis`` (Rodrigues)."""
    a = math.radians(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


def unit(rng: np.random.Generator) -> np.ndarray:
    """A random direction."""
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def smooth_field(
    shape: tuple[int, ...],
    affine: np.ndarray,
    body: np.ndarray,
    rng: np.random.Generator,
    max_mm: float,
    sigma_mm: float,
) -> np.ndarray:
    """Gaussian-smoothed white noise (world mm, (*shape, 3)) whose largest length inside
    the body is ``max_mm``."""
    sigma = sigma_mm / spacing_of(affine)
    noise = rng.standard_normal((3, *shape)).astype(np.float32)
    comps = [ndimage.gaussian_filter(n, sigma, mode="nearest") for n in noise]
    d = np.stack(comps, axis=-1)
    return d * (max_mm / float(np.linalg.norm(d, axis=-1)[body].max()))


def sliding_region(
    points: np.ndarray, centre: np.ndarray, rng: np.random.Generator, slide_mm: float
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The side of a curved surface through ``centre`` that slides, and its shift.

    The surface is a parabolic cylinder n.r = k (w.r)^2 (r = p - c) whose straight lines
    run along the shift v (n, w, v orthonormal, random; curvature k random): v is tangent
    to the surface everywhere, so the region slides along it without gap or overlap."""
    direction = unit(rng)
    normal = np.cross(direction, unit(rng))
    normal /= np.linalg.norm(normal)
    across = np.cross(direction, normal)
    lo, hi = CURVATURE_PER_MM
    curvature = float(rng.uniform(lo, hi) * rng.choice([-1.0, 1.0]))
    rel = points - centre
    region = rel @ normal - curvature * (rel @ across) ** 2 > 0
    surface = {"normal": normal.tolist(), "curvature_per_mm": curvature}
    return region, direction * slide_mm, surface


def known_map(
    points: np.ndarray,
    body: np.ndarray,
    affine: np.ndarray,
    motion: Motion,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """T(p) for every voxel (world mm), the sliding region (or None) and the parameters."""
    centre = points[body].mean(axis=0)
    axis, angle = unit(rng), float(rng.uniform(*motion.angle_deg) * rng.choice([-1.0, 1.0]))
    shift = unit(rng) * rng.uniform(*motion.shift_mm)
    smooth_max, sigma = float(rng.uniform(*motion.smooth_mm)), float(rng.uniform(*SMOOTH_SIGMA_MM))
    q = points + smooth_field(body.shape, affine, body, rng, smooth_max, sigma)
    params: dict[str, Any] = {
        "centre_mm": centre.tolist(),
        "rotation_axis": axis.tolist(),
        "rotation_deg": angle,
        "shift_mm": shift.tolist(),
        "smooth_max_mm": smooth_max,
        "smooth_sigma_mm": sigma,
    }
    region = None
    if motion.slide_mm is not None:
        size = float(rng.uniform(*motion.slide_mm))
        region, slide, surface = sliding_region(points, centre, rng, size)
        q[region] += slide
        params.update(surface, slide_mm=slide.tolist())
    rot = rotation_matrix(axis, angle)
    return (q - centre) @ rot.T + centre + shift, region, params


def folding_percent(u: np.ndarray, affine: np.ndarray) -> float:
    """% of voxels where det(d(p + u)/dp) <= 0 (central differences; at a sliding surface
    the jump of u makes some voxels count even for the true field)."""
    lin_inv = np.linalg.inv(affine[:3, :3])
    grads = np.stack([np.stack(np.gradient(u[..., i]), axis=-1) for i in range(3)], axis=-2)
    jac = np.eye(3) + grads @ lin_inv  # d u_i / d x_j  ->  d u_i / d p_k
    return float(100.0 * np.mean(np.linalg.det(jac) <= 0))


# ------------------------------------------------------------------------------- cases
def case_rng(scan: Scan, kind: str, seed: int) -> np.random.Generator:
    """The generator of one case: fixed by the seed, the scan's name and the motion kind."""
    return np.random.default_rng([seed, zlib.crc32(scan.name.encode()), zlib.crc32(kind.encode())])


def prepare_scan(scan: Scan, work: Path) -> Path:
    """Write the scan's label map (:func:`scan_labels`) to ``work`` once; return its path."""
    path = work / "scans" / f"{scan.name}-labels-v{GENERATOR_VERSION}.nii.gz"
    if not path.is_file():
        image, affine = load(scan.image)
        body = body_mask(image, affine, scan.modality)
        save(path, scan_labels(scan, image, body), affine)
    return path


def make_case(scan: Scan, labels_path: Path, kind: str, seed: int, folder: Path) -> None:
    """Generate one known-motion case into ``folder`` (see the module docstring)."""
    rng = case_rng(scan, kind, seed)
    image, affine = load(scan.image)
    labels = load(labels_path, np.int64)[0].astype(np.uint8)
    body = body_mask(image, affine, scan.modality)
    points = world_points(image.shape, affine)
    target, region, params = known_map(points, body, affine, KINDS[kind], rng)
    coords = to_voxels(target, affine)
    fixed = ndimage.map_coordinates(image, coords, order=1, cval=float(image.min()))
    noise_sd = CT_NOISE_HU if scan.modality == "CT" else MR_NOISE * np.percentile(image[body], 99)
    fixed = fixed + rng.normal(0.0, noise_sd, fixed.shape).astype(np.float32)
    fixed_labels = ndimage.map_coordinates(labels, coords, order=0, cval=0)
    u = (target - points).astype(np.float32)
    fixed_body = body_mask(fixed, affine, scan.modality)
    folder.mkdir(parents=True, exist_ok=True)
    save(folder / "fixed.nii.gz", fixed.astype(np.float32), affine)
    save(folder / "fixed_labels.nii.gz", fixed_labels.astype(np.uint8), affine)
    save(folder / "body.nii.gz", fixed_body.astype(np.uint8), affine)
    save_ddf(folder / "true_ddf.nii.gz", u, affine)
    if region is not None:
        save(folder / "region.nii.gz", region.astype(np.uint8), affine)
    size = np.linalg.norm(u, axis=-1)[fixed_body]
    info = {
        "version": GENERATOR_VERSION,
        "scan": scan.name,
        "kind": kind,
        "seed": seed,
        **params,
        "noise_sd": float(noise_sd),
        "true_mean_mm": float(size.mean()),
        "true_max_mm": float(size.max()),
        "true_folding_percent": folding_percent(u, affine),
    }
    (folder / "case.json").write_text(json.dumps(info, indent=1) + "\n")


def case_jobs(scan: Scan, work: Path, cases: tuple[tuple[str, int], ...]) -> list[Job]:
    """The known-motion jobs of one scan (cases made or reused) and its self-registration."""
    labels_path = prepare_scan(scan, work)
    jobs = []
    for kind, seed in cases:
        folder = work / "cases" / scan.name / f"{kind}-s{seed}"
        meta = folder / "case.json"
        if not meta.is_file() or json.loads(meta.read_text()).get("version") != GENERATOR_VERSION:
            print(f"making case {scan.name}/{folder.name}", file=sys.stderr, flush=True)
            make_case(scan, labels_path, kind, seed, folder)
        info = json.loads(meta.read_text())
        jobs.append(
            Job(
                scan.name,
                scan.split,
                f"{scan.name}/{folder.name}",
                kind,
                folder / "fixed.nii.gz",
                scan.image,
                folder / "fixed_labels.nii.gz",
                labels_path,
                truth=folder,
                info=info,
            )
        )
    jobs.append(self_job(scan.name, scan.split, scan.image, scan.modality))
    return jobs


def self_job(dataset: str, split: str, image: Path, modality: str) -> Job:
    """A scan registered to itself (scored by the size of the field it returns)."""
    case = f"{dataset}/self"
    return Job(dataset, split, case, "self", image, image, info={"modality": modality})


def painted_jobs(work: Path, subjects: tuple[str, ...], split: str, quick: bool) -> list[Job]:
    """Ordered pairs of painted subjects (4 mm; two with ``quick``) and one self-pair."""
    from ranreg.metrics import PAPER_ORGANS

    folder = work / "painted"
    for name in subjects:
        if not (folder / f"{name}-labels.nii.gz").is_file():
            image, labels, affine = painted_subject(SHARED_LABELS, name, 0.5)
            save(folder / f"{name}.nii.gz", image, affine)
            save(folder / f"{name}-labels.nii.gz", labels, affine)
    dataset = f"painted {subjects[0]}-{subjects[-1]}"
    pairs = list(itertools.permutations(subjects, 2))[: 2 if quick else None]
    jobs = [
        Job(
            dataset,
            split,
            f"painted/{m}->{f}",
            "painted",
            folder / f"{f}.nii.gz",
            folder / f"{m}.nii.gz",
            folder / f"{f}-labels.nii.gz",
            folder / f"{m}-labels.nii.gz",
            organs=tuple(PAPER_ORGANS),
        )
        for m, f in pairs
    ]
    self_pair = self_job(dataset, split, folder / f"{subjects[0]}.nii.gz", "CT")
    self_pair.case = f"painted/{subjects[0]}-self"
    return [*jobs, self_pair]


def all_jobs(args: argparse.Namespace) -> list[Job]:
    """Every job of the chosen split (validation first)."""
    splits = ["validation", "test"] if args.split == "all" else [args.split]
    cases = QUICK_CASES if args.quick else FULL_CASES
    wanted = set(args.dataset or [s.name for s in SCANS] + ["painted"])
    jobs: list[Job] = []
    for split in splits:
        for scan in SCANS:
            if scan.split != split or scan.name not in wanted:
                continue
            if not scan.image.is_file():
                print(f"warning: {scan.image} missing, {scan.name} left out", file=sys.stderr)
                continue
            jobs += case_jobs(scan, args.work, cases)
        if "painted" in wanted:
            subjects = VALIDATION_PAINTED if split == "validation" else TEST_PAINTED
            jobs += painted_jobs(args.work, subjects, split, args.quick)
    return jobs


# ------------------------------------------------------------------------------ methods
def parse_method(text: str) -> Method:
    """``NAME`` (a built-in) or ``NAME=ARGS`` (extra ``ranreg register`` arguments)."""
    name, sep, extra = text.partition("=")
    if sep:
        return Method(name.strip(), tuple(shlex.split(extra)))
    if name not in BUILTIN_METHODS:
        known = ", ".join(BUILTIN_METHODS)
        raise argparse.ArgumentTypeError(
            f"unknown method {name!r} (built-in: {known}; or NAME=ARGS)"
        )
    return Method(name, BUILTIN_METHODS[name])


def case_arguments(doc: str, name: str) -> argparse.Namespace:
    """``--work`` (default ``runs/NAME``), ``--out`` and ``--ranreg`` of a benchmark that
    registers cases of the validation scans with the ``ranreg`` command."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "runs" / name))
    parser.add_argument("--out", default=str(ROOT / "runs" / name / f"{name}.md"))
    parser.add_argument("--ranreg", default=None, help="the ranreg executable")
    args = parser.parse_args()
    args.ranreg = ranreg_executable(args.ranreg)
    return args


def ranreg_executable(given: str | None) -> str:
    """The ``ranreg`` command: ``--ranreg``, else the project's venv, else the PATH."""
    if given:
        return given
    venv = ROOT / ".venv" / "bin" / "ranreg"
    return str(venv) if venv.is_file() else (shutil.which("ranreg") or "ranreg")


def command(exe: str, method: Method, job: Job, out: Path, common: list[str]) -> list[str]:
    """The ``ranreg register`` command line of one method and job."""
    cmd = [exe, "register", "--fixed", str(job.fixed), "--moving", str(job.moving)]
    cmd += ["--out", str(out)]
    # moving labels only: Dice is computed here from warped_labels.nii.gz, so no command
    # spends time on the surface distances `register` computes when given fixed labels
    if job.moving_labels is not None and job.fixed_labels is not None:
        cmd += ["--moving-labels", str(job.moving_labels)]
    return cmd + list(method.args) + common


def run_command(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run one command; status ok / skipped (arguments rejected) / failed, and wall time."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "message": f"timed out after {timeout:.0f} s"}
    seconds = time.perf_counter() - start
    if proc.returncode == 0:
        return {"status": "ok", "seconds": seconds}
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()] or ["(no output)"]
    message = lines[-1].strip()
    status = "skipped" if proc.returncode == 2 and "unrecognized arguments" in message else "failed"
    return {"status": status, "message": f"exit {proc.returncode}: {message}", "seconds": seconds}


# ------------------------------------------------------------------------------- scoring
def boundary_band(region: np.ndarray, width: int) -> np.ndarray:
    """Voxels within ``width`` voxels (6-neighbour steps) of the region's surface."""
    return ndimage.binary_dilation(region, iterations=width) & ndimage.binary_dilation(
        ~region, iterations=width
    )


def epe_scores(pred: np.ndarray, folder: Path) -> dict[str, float]:
    """End-point error (mm) of a predicted field against the case's true field."""
    true = load_ddf(folder / "true_ddf.nii.gz")
    body = load(folder / "body.nii.gz", np.uint8)[0].astype(bool)
    err = np.linalg.norm(pred - true, axis=-1)
    out = {"epe_mm": float(err[body].mean()), "epe_p95_mm": float(np.percentile(err[body], 95))}
    if (folder / "region.nii.gz").is_file():
        region = load(folder / "region.nii.gz", np.uint8)[0].astype(bool)
        near = boundary_band(region, BOUNDARY_WIDTH) & body
        out["epe_boundary_mm"] = float(err[near].mean()) if near.any() else math.nan
    return out


def dice_mean(warped: np.ndarray, fixed: np.ndarray, organs: tuple[int, ...] | None) -> float:
    """Mean Dice over ``organs`` present in ``fixed``, or over every label with at least
    :data:`MIN_LABEL_VOXELS` voxels in ``fixed``."""
    values, counts = np.unique(fixed[fixed > 0], return_counts=True)
    if organs is None:
        chosen = [v for v, c in zip(values, counts, strict=True) if c >= MIN_LABEL_VOXELS]
    else:
        chosen = [v for v in values if v in organs]
    scores = []
    for v in chosen:
        a, b = warped == v, fixed == v
        scores.append(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    return float(np.mean(scores)) if scores else math.nan


def self_scores(pred: np.ndarray, job: Job) -> dict[str, float]:
    """Size of the field returned for a scan registered to itself, inside its body."""
    image, affine = load(job.fixed)
    body = body_mask(image, affine, job.info["modality"])
    size = np.linalg.norm(pred, axis=-1)[body]
    return {"self_mean_mm": float(size.mean()), "self_p99_mm": float(np.percentile(size, 99))}


def score(job: Job, out: Path) -> dict[str, float]:
    """Every score of one finished registration (outputs in ``out``)."""
    metrics = json.loads((out / "metrics.json").read_text())
    row = {
        "folding_percent": metrics.get("folding_percent", math.nan),
        "sd_log_jacobian": metrics.get("sd_log_jacobian", math.nan),
        "runtime_s": metrics.get("runtime_s", math.nan),
    }
    pred = load_ddf(out / "ddf.nii.gz")
    if job.kind == "self":
        return {**row, **self_scores(pred, job)}
    if job.truth is not None:
        row.update(epe_scores(pred, job.truth))
    if job.fixed_labels is not None and (out / "warped_labels.nii.gz").is_file():
        warped = load(out / "warped_labels.nii.gz", np.int64)[0]
        row["dice"] = dice_mean(warped, load(job.fixed_labels, np.int64)[0], job.organs)
    return row


def clean_outputs(out: Path) -> None:
    """Keep only ``metrics.json`` of a registration's outputs."""
    for path in out.iterdir():
        if path.name != "metrics.json":
            path.unlink()


def run_job(
    job: Job, methods: list[Method], args: argparse.Namespace, run_dir: Path, skipped: dict
) -> list[dict[str, Any]]:
    """Register one job with every method and score it."""
    rows = []
    for method in methods:
        row: dict[str, Any] = {
            "dataset": job.dataset,
            "split": job.split,
            "case": job.case,
            "kind": job.kind,
            "method": method.name,
        }
        if method.name in skipped:
            rows.append({**row, "status": "skipped", "message": skipped[method.name]})
            continue
        out = run_dir / method.name / job.case.replace("/", "__").replace("->", "-to-")
        cmd = command(args.exe, method, job, out, args.common)
        result = run_command(cmd, args.timeout)
        row.update(result, command=shlex.join(cmd))
        if result["status"] == "skipped":
            skipped[method.name] = result["message"]
        elif result["status"] == "ok":
            row.update(score(job, out))
            if not args.keep_outputs:
                clean_outputs(out)
        rows.append(row)
        print(progress_line(row), file=sys.stderr, flush=True)
    return rows


def progress_line(row: dict[str, Any]) -> str:
    """One line per registration for the log."""
    keys = ("seconds", "epe_mm", "epe_boundary_mm", "dice", "self_mean_mm", "folding_percent")
    shown = [f"{k} {row[k]:.3f}" for k in keys if isinstance(row.get(k), float)]
    extra = row.get("message", "")
    return f"{row['case']} {row['method']}: {row['status']} " + ", ".join(shown) + f" {extra}"


# ------------------------------------------------------------------------------- tables
def mean_of(rows: list[dict[str, Any]], key: str) -> float:
    """Mean of the finite values of ``key`` over ``rows`` (NaN if none)."""
    vals = [r[key] for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
    return float(np.mean(vals)) if vals else math.nan


def short(text: str, width: int = 90) -> str:
    """``text`` cut to ``width`` characters, safe in a table cell."""
    text = text.replace("|", "/")
    return text if len(text) <= width else text[: width - 3] + "..."


def fmt(x: Any, spec: str) -> str:
    """A number for a table, '–' for missing."""
    return "–" if not isinstance(x, float) or not math.isfinite(x) else format(x, spec)


SUMMARY_COLUMNS = (
    ("dice", "mean Dice", ".3f"),
    ("epe_mm", "mean EPE (mm)", ".2f"),
    ("epe_boundary_mm", "EPE near boundary (mm)", ".2f"),
    ("epe_p95_mm", "p95 EPE (mm)", ".2f"),
    ("folding_percent", "folding %", ".3f"),
    ("sd_log_jacobian", "SD log J", ".3f"),
    ("seconds", "s per pair", ".1f"),
)


def dataset_table(rows: list[dict[str, Any]], methods: list[Method]) -> list[str]:
    """Method x means over the pairs of one data set (self-registration excluded)."""
    head = "| method | " + " | ".join(c[1] for c in SUMMARY_COLUMNS) + " | pairs ok |"
    lines = [head, "|---|" + "---:|" * (len(SUMMARY_COLUMNS) + 1)]
    for m in methods:
        mine = [r for r in rows if r["method"] == m.name]
        ok = [r for r in mine if r["status"] == "ok"]
        cells = [fmt(mean_of(ok, k), spec) for k, _, spec in SUMMARY_COLUMNS]
        note = "" if ok or not mine else f" ({mine[0]['status']}: {short(mine[0]['message'])})"
        lines.append(f"| {m.name}{note} | " + " | ".join(cells) + f" | {len(ok)}/{len(mine)} |")
    return lines


def self_table(rows: list[dict[str, Any]]) -> list[str]:
    """Data set x method: the field returned for a scan registered to itself."""
    lines = [
        "| data set | method | mean abs u (mm) | p99 abs u (mm) | folding % | SD log J | s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['dataset']} | {r['method']} | {r['status']} | | | | |")
            continue
        cells = [
            fmt(r.get("self_mean_mm"), ".2f"),
            fmt(r.get("self_p99_mm"), ".2f"),
            fmt(r.get("folding_percent"), ".3f"),
            fmt(r.get("sd_log_jacobian"), ".3f"),
            fmt(r.get("seconds"), ".1f"),
        ]
        lines.append(f"| {r['dataset']} | {r['method']} | " + " | ".join(cells) + " |")
    return lines


def kind_table(rows: list[dict[str, Any]], methods: list[Method]) -> list[str]:
    """Method x motion kind: mean EPE (and near-boundary EPE) over the real scans."""
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    lines = ["| method | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for m in methods:
        cells = []
        for k in kinds:
            ok = [
                r for r in rows if r["method"] == m.name and r["kind"] == k and r["status"] == "ok"
            ]
            epe, near = mean_of(ok, "epe_mm"), mean_of(ok, "epe_boundary_mm")
            cells.append(fmt(epe, ".2f") + ("" if math.isnan(near) else f" ({near:.2f})"))
        lines.append(f"| {m.name} | " + " | ".join(cells) + " |")
    return lines


def case_table(cases: list[dict[str, Any]]) -> list[str]:
    """The known motions: parameters and size of the true field."""
    lines = [
        "| case | rotation (deg) | shift (mm) | smooth max / sigma (mm) | slide (mm) | "
        "true mean / max (mm) | true folding % | noise SD |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        slide = np.linalg.norm(c["slide_mm"]) if "slide_mm" in c else math.nan
        lines.append(
            f"| {c['scan']}/{c['kind']}-s{c['seed']} | {c['rotation_deg']:.1f} | "
            f"{np.linalg.norm(c['shift_mm']):.1f} | {c['smooth_max_mm']:.1f} / "
            f"{c['smooth_sigma_mm']:.0f} | {fmt(float(slide), '.1f')} | "
            f"{c['true_mean_mm']:.1f} / {c['true_max_mm']:.1f} | "
            f"{c['true_folding_percent']:.3f} | {c['noise_sd']:.1f} |"
        )
    return lines


def per_case_table(rows: list[dict[str, Any]]) -> list[str]:
    """Every registration that is not a self-registration."""
    cols = (*SUMMARY_COLUMNS[:-1], ("seconds", "s", ".1f"))
    lines = [
        "| case | method | " + " | ".join(c[1] for c in cols) + " | status |",
        "|---|---|" + "---:|" * len(cols) + "---|",
    ]
    for r in rows:
        cells = [fmt(r.get(k), spec) for k, _, spec in cols]
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {short(r['message'])}"
        lines.append(f"| {r['case']} | {r['method']} | " + " | ".join(cells) + f" | {status} |")
    return lines


def report(
    rows: list[dict[str, Any]], jobs: list[Job], methods: list[Method], args: argparse.Namespace
) -> list[str]:
    """The markdown results page."""
    pairs = [r for r in rows if r["kind"] != "self"]
    datasets = list(dict.fromkeys(r["dataset"] for r in pairs))
    method_lines = [
        f"- `{m.name}`: " + (f"`{shlex.join(m.args)}`" if m.args else "no extra arguments")
        for m in methods
    ]
    lines = [
        "# Real-scan registration benchmark",
        "",
        *provenance(),
        f"Split: {args.split}{' (quick)' if args.quick else ''}; whole run "
        f"{args.elapsed_min:.1f} min; `ranreg`: `{args.exe}`"
        + (f", every command with `{shlex.join(args.common)}`" if args.common else "")
        + ".",
        "",
        "Methods (each one `ranreg register --fixed F --moving M --out D "
        "[--moving-labels ML]` plus; Dice is computed here from `warped_labels.nii.gz`):",
        *method_lines,
        "",
        "Known-motion cases of real scans (fixed = scan under a known map T, moving = the "
        "scan; `benchmarks/real_scans.py` docstring): EPE = |u_pred - u_true| in mm inside "
        "the fixed image's body; *near boundary*: within "
        f"{BOUNDARY_WIDTH} voxels of the sliding surface (sliding and large cases); Dice: mean "
        f"over labels with >= {MIN_LABEL_VOXELS} voxels in the fixed map (painted pairs: the 9 "
        "organs); folding % and SD log J from `metrics.json`; seconds: wall time of the "
        "whole command (process start included). Means over the pairs of each data set.",
    ]
    for name in datasets:
        mine = [r for r in pairs if r["dataset"] == name]
        lines += ["", f"## {name} ({mine[0]['split']})", "", *dataset_table(mine, methods)]
    real = [r for r in pairs if r["kind"] in KINDS]
    if real:
        lines += ["", "## Mean EPE by motion kind, real scans (mm; near boundary)", ""]
        lines += kind_table(real, methods)
    lines += ["", "## Self-registration (each image registered to itself)", ""]
    lines += self_table([r for r in rows if r["kind"] == "self" and r["status"] != "skipped"])
    cases = [j.info for j in jobs if j.truth is not None]
    if cases:
        lines += ["", "## Cases", "", *case_table(cases)]
    lines += [
        "",
        "## Per case",
        "",
        *per_case_table([r for r in pairs if r["status"] != "skipped"]),
    ]
    skipped = {r["method"]: r["message"] for r in rows if r["status"] == "skipped"}
    lines += ["", *[f"Skipped: `{m}` ({msg})." for m, msg in skipped.items()], ""]
    return lines


# --------------------------------------------------------------------------------- main
def jsonable(x: Any) -> Any:
    """``x`` with NumPy scalars as Python numbers and NaN/inf as None (ranreg's rule)."""
    from ranreg.outputs import jsonable as ranreg_jsonable

    return ranreg_jsonable(x)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", choices=("validation", "test", "all"), default="validation")
    p.add_argument(
        "--method",
        action="append",
        type=parse_method,
        metavar='NAME | NAME="ARGS"',
        help=f"repeatable; built-in: {', '.join(BUILTIN_METHODS)} (default: "
        f"{', '.join(DEFAULT_METHODS)})",
    )
    p.add_argument("--quick", action="store_true", help="one case per scan, two painted pairs")
    p.add_argument(
        "--dataset",
        action="append",
        choices=[s.name for s in SCANS] + ["painted"],
        help="repeatable: only these data sets of the split (default: all)",
    )
    p.add_argument("--work", type=Path, default=ROOT / "work-data" / "real-scans")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "real-scans.md")
    p.add_argument("--ranreg", dest="exe", help="the ranreg command (default .venv/bin/ranreg)")
    p.add_argument("--common-args", default="", help='added to every command, e.g. "--device cuda"')
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per command")
    p.add_argument("--keep-outputs", action="store_true", help="keep every registration's files")
    args = p.parse_args(argv)
    args.method = args.method or [parse_method(m) for m in DEFAULT_METHODS]
    names = [m.name for m in args.method]
    if len(set(names)) != len(names):
        p.error(f"method names must differ: {names}")
    args.exe = ranreg_executable(args.exe)
    args.common = shlex.split(args.common_args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    jobs = all_jobs(args)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = args.work / "runs" / stamp
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for job in jobs:
        rows += run_job(job, args.method, args, run_dir, skipped)
    args.elapsed_min = (time.perf_counter() - start) / 60
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report(rows, jobs, args.method, args)))
    payload = {
        "command": command_line(),
        "provenance": provenance(),
        "split": args.split,
        "quick": args.quick,
        "elapsed_min": args.elapsed_min,
        "methods": {m.name: list(m.args) for m in args.method},
        "common_args": args.common,
        "scans": [{"name": s.name, "image": str(s.image), "about": s.about} for s in SCANS],
        "cases": [j.info for j in jobs if j.truth is not None],
        "rows": rows,
    }
    json_path = args.out.with_suffix(".json")
    json_path.write_text(json.dumps(jsonable(payload), indent=1, allow_nan=False) + "\n")
    print(f"wrote {args.out} and {json_path} ({args.elapsed_min:.1f} min)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
