"""What a fixed or moving mask does on a real scan: an artefact in the moving image.

    python benchmarks/masks.py --out docs/results/masks-validation.md

The validation scan (the shared chest CT) under known motions, as in
``benchmarks/real_scans.py`` (its cases: smooth and sliding, seeds 0 and 1). The moving
image gets an artefact the fixed image does not have: a ball of radius
:data:`ARTEFACT_MM` at +1500 HU (metal, or contrast that arrived between the scans) at a
random point of the body. Each case is registered three times with the default
``ranreg register`` (its subprocess, as a user runs it): the clean moving image, the
moving image with the artefact, the same with ``--fixed-mask`` = the fixed image without a
ball of radius :data:`ARTEFACT_MM` + :data:`MARGIN_MM` around where the artefact lies in
the fixed image (known here from the true motion; a user must guess it), and with
``--moving-mask`` = the moving image without that ball around the artefact itself (what a
user sees and would draw). The similarities keep to the body by themselves. Scores:
end-point error (mm) in the body and within :data:`NEAR_MM` of the artefact.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance  # noqa: E402
from real_scans import (  # noqa: E402
    SCANS,
    body_mask,
    case_arguments,
    load,
    load_ddf,
    make_case,
    prepare_scan,
    save,
    spacing_of,
    world_points,
)

ARTEFACT_MM, MARGIN_MM, NEAR_MM, ARTEFACT_HU = 12.0, 8.0, 30.0, 1500.0
CASES = (("smooth", 0), ("smooth", 1), ("sliding", 0), ("sliding", 1))


def _artefact(case: Path, moving: Path, seed: int) -> tuple[Path, Path, Path, np.ndarray]:
    """The moving image with the artefact, the fixed and moving masks leaving it out, and
    the artefact's centre in the fixed image (world mm)."""
    image, affine = load(moving)
    points = world_points(image.shape, affine)  # the moving grid is the fixed one here
    depth = ndimage.distance_transform_edt(
        body_mask(image, affine, "CT"), sampling=spacing_of(affine)
    )
    rng = np.random.default_rng([seed, 77])
    inner = np.argwhere(depth > ARTEFACT_MM)  # the whole ball inside the body
    centre_m = points[tuple(inner[rng.integers(len(inner))])]
    ball = np.linalg.norm(points - centre_m, axis=-1) <= ARTEFACT_MM
    with_artefact = image.copy()
    with_artefact[ball] = ARTEFACT_HU
    save(case / "moving_artefact.nii.gz", with_artefact.astype(np.float32), affine)
    around = np.linalg.norm(points - centre_m, axis=-1) > ARTEFACT_MM + MARGIN_MM
    save(case / "moving_mask.nii.gz", around.astype(np.uint8), affine)
    # where the artefact lies in the fixed image: the fixed point that the true map sends
    # nearest to its centre
    u = load_ddf(case / "true_ddf.nii.gz")
    hit = np.linalg.norm(points + u - centre_m, axis=-1)
    centre_f = points[np.unravel_index(np.argmin(hit), hit.shape)]
    keep = np.linalg.norm(points - centre_f, axis=-1) > ARTEFACT_MM + MARGIN_MM
    save(case / "mask.nii.gz", keep.astype(np.uint8), affine)
    return (
        case / "moving_artefact.nii.gz",
        case / "mask.nii.gz",
        case / "moving_mask.nii.gz",
        centre_f,
    )


def _register(exe: str, fixed: Path, moving: Path, out: Path, extra: list[str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [exe, "register", "--fixed", str(fixed), "--moving", str(moving), "--out", str(out)]
    start = time.perf_counter()
    subprocess.run([*cmd, "--no-progress", *extra], check=True, capture_output=True)
    return time.perf_counter() - start


def _scores(out: Path, case: Path, centre_f: np.ndarray) -> dict[str, float]:
    true = load_ddf(case / "true_ddf.nii.gz")
    pred = load_ddf(out / "ddf.nii.gz")
    _, affine = load(case / "fixed.nii.gz")
    body = load(case / "body.nii.gz", np.uint8)[0] > 0
    near = np.linalg.norm(world_points(body.shape, affine) - centre_f, axis=-1) <= NEAR_MM
    err = np.linalg.norm(pred - true, axis=-1)
    return {"body": float(err[body].mean()), "near": float(err[body & near].mean())}


def main() -> int:
    args = case_arguments(__doc__, "masks")
    exe, work = args.ranreg, Path(args.work)
    scan = next(s for s in SCANS if s.name == "chest-ct")
    labels = prepare_scan(scan, work)
    rows = []
    for kind, seed in CASES:
        case = work / "cases" / f"{kind}-{seed}"
        if not (case / "case.json").is_file():
            make_case(scan, labels, kind, seed, case)
        moving_a, mask, moving_mask, centre = _artefact(case, scan.image, seed)
        fixed = case / "fixed.nii.gz"
        runs = {
            "clean moving image": (scan.image, []),
            "artefact": (moving_a, []),
            "artefact, --fixed-mask": (moving_a, ["--fixed-mask", str(mask)]),
            "artefact, --moving-mask": (moving_a, ["--moving-mask", str(moving_mask)]),
        }
        for name, (moving, extra) in runs.items():
            out = work / "out" / f"{kind}-{seed}-{len(rows)}"
            seconds = _register(exe, fixed, moving, out, extra)
            row = {"case": f"{kind} {seed}", "run": name, "s": seconds}
            rows.append(row | _scores(out, case, centre))
            print(json.dumps(rows[-1]), flush=True)
    _write(Path(args.out), rows)
    return 0


def _write(path: Path, rows: list[dict]) -> None:
    names = list(dict.fromkeys(r["run"] for r in rows))
    lines = ["# Masks on a real scan with an artefact", "", *provenance(), ""]
    lines += [__doc__.split("\n\n", 2)[2].strip(), ""]
    lines += ["| case | run | EPE in the body (mm) | EPE near the artefact (mm) | s |"]
    lines += ["|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['run']} | {r['body']:.2f} | {r['near']:.2f} | {r['s']:.1f} |"
        )
    lines += ["", "Means over the cases:", "", "| run | body | near the artefact |"]
    lines += ["|---|---:|---:|"]
    for n in names:
        sel = [r for r in rows if r["run"] == n]
        body, near = (np.mean([r[k] for r in sel]) for k in ("body", "near"))
        lines.append(f"| {n} | {body:.2f} | {near:.2f} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
