"""Sliding motion on real anatomy, where the true DDF is known.

    python benchmarks/sliding.py --model ran3-abdomen-cpu --model ants-syn \\
        --model RAN3=runs/budget/RAN3/model ...          # docs/results/sliding.md
    python benchmarks/sliding.py --quick                 # < 10 min: 2 pairs, packaged model

Pairs: each unseen test subject (0027-0030, images painted from the shared label maps at
4 mm, 96x80x128) is the moving image; `ranreg.sliding.random_sliding_ddf` moves two organ
groups (liver, right kidney, gallbladder, IVC, right adrenal vs the other organs) with
independent rigid motions (up to 10 degrees, 5 % of the field of view) while the body wall
and background stay still, and the fixed image is the moving one warped by that field, so
the DDF is discontinuous at the organ-group and organ-wall boundaries. Every model then
registers moving -> fixed (`ranreg.pipeline.register_volumes`); scored inside the body
(fixed > -500 HU): end-point error (mm) overall, within 2 voxels (8 mm) of a sliding
boundary and away from them; Dice of the 9 organs (all of which move); folding %.
Writes ``docs/results/sliding.md``, ``.json`` and ``sliding.png`` with the command, the
date and the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, SHARED_LABELS, TEST_SUBJECTS, painted_subject, provenance
from scipy import ndimage

BOUNDARY_WIDTH = 2  # voxels each side of a sliding boundary (8 mm at 4 mm)


def sliding_pairs(n_motions: int, subjects: list[str], seed: int = 0) -> list[dict[str, Any]]:
    """Moving subject, fixed = moving warped by a random sliding DDF, the DDF and regions."""
    from ranreg.data.io import Volume
    from ranreg.sliding import random_sliding_ddf

    pairs = []
    for i, name in enumerate(subjects):
        image, labels, affine = painted_subject(SHARED_LABELS, name, 0.5)
        spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
        for j in range(n_motions):
            rng = np.random.default_rng([seed, i, j])
            ddf, regions = random_sliding_ddf(labels, rng, static_background=True)
            grid = np.indices(labels.shape, dtype=np.float64) + ddf
            fixed = ndimage.map_coordinates(image.astype(np.float32), grid, order=1, mode="nearest")
            fixed_lab = ndimage.map_coordinates(labels, grid, order=0, mode="nearest")
            pairs.append(
                {
                    "name": f"{name}#{j}",
                    "moving": Volume(image.astype(np.float32), affine, spacing),
                    "moving_labels": Volume(labels, affine, spacing),
                    "fixed": Volume(fixed.astype(np.float32), affine, spacing),
                    "fixed_labels": Volume(fixed_lab.astype(np.uint8), affine, spacing),
                    "ddf": ddf,
                    "regions": regions,
                }
            )
    return pairs


def score(pair: dict[str, Any], ddf_vox: np.ndarray, warped_labels: np.ndarray) -> dict:
    """EPE (mm) overall / near / away from the sliding boundaries, Dice of the organs."""
    from ranreg.metrics import PAPER_ORGANS, dice
    from ranreg.sliding import sliding_boundary_mask

    spacing = np.asarray(pair["fixed"].spacing).reshape(3, 1, 1, 1)
    err = np.linalg.norm((np.moveaxis(ddf_vox, -1, 0) - pair["ddf"]) * spacing, axis=0)
    body = pair["fixed"].array > -500.0
    near = sliding_boundary_mask(pair["regions"], BOUNDARY_WIDTH) & body
    fixed_lab = pair["fixed_labels"].array
    d = dice(warped_labels, fixed_lab, PAPER_ORGANS)
    present = [k for k in PAPER_ORGANS if (fixed_lab == k).any()]
    return {
        "epe_mm": float(err[body].mean()),
        "epe_boundary_mm": float(err[near].mean()),
        "epe_interior_mm": float(err[body & ~near].mean()),
        "dice": float(np.nanmean([d[k] for k in present])),
    }


def _mean_sd(values: list[float]) -> str:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if not v.size:
        return "n/a"
    sd = v.std(ddof=1) if v.size > 1 else 0.0
    return f"{v.mean():.2f} ± {sd:.2f}"


def figure(rows: list[dict[str, Any]], models: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("epe_mm", "EPE in the body (mm)"),
        ("epe_boundary_mm", f"EPE within {BOUNDARY_WIDTH} voxels of a sliding boundary (mm)"),
        ("dice", "mean Dice of the 9 organs"),
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4.0))
    for ax, (key, title) in zip(axes, keys, strict=True):
        data = [[r[key] for r in rows if r["model"] == m] for m in models]
        ax.boxplot(data, showfliers=False)
        for i, d in enumerate(data, start=1):
            ax.scatter(np.full(len(d), i) + np.linspace(-0.1, 0.1, len(d)), d, s=8, c="k")
        ax.set_xticks(range(1, len(models) + 1))
        ax.set_xticklabels(models, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Sliding organ motion on unseen abdomen anatomy (true DDF known)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        action="append",
        metavar="[LABEL=]MODEL",
        help="as `ranreg evaluate --model` (identity is always added)",
    )
    p.add_argument("--motions", type=int, default=3, help="random motions per subject")
    p.add_argument("--subjects", nargs="+", default=list(TEST_SUBJECTS))
    p.add_argument("--quick", action="store_true", help="2 pairs, the packaged model only")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "sliding.md")
    args = p.parse_args()

    from ranreg.errors import RanregError
    from ranreg.evaluate import model_runs
    from ranreg.options import RegistrationOptions
    from ranreg.pipeline import register_volumes

    if args.quick:
        args.subjects, args.motions = args.subjects[:2], 1
    try:
        base = RegistrationOptions(precision=args.precision)
        named = model_runs(args.model or ([None] if args.quick else None), base)
    except RanregError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pairs = sliding_pairs(args.motions, args.subjects)
    rows = []
    for pair in pairs:
        for label, net, opts in named:
            res = register_volumes(
                net,
                pair["moving"],
                pair["fixed"],
                pair["moving_labels"],
                pair["fixed_labels"],
                options=opts,
            )
            row = {
                "model": label,
                "pair": pair["name"],
                **score(pair, res.ddf_vox, res.warped_label),
                "folding_percent": res.jacobian_stats()["folding_percent"],
                "runtime_s": res.runtime_s,
            }
            rows.append(row)
            print(
                f"{pair['name']} {label}: EPE {row['epe_mm']:.2f} mm, boundary "
                f"{row['epe_boundary_mm']:.2f} mm, Dice {row['dice']:.3f}",
                file=sys.stderr,
                flush=True,
            )
    models = [r.name for r in named]
    keys = ["epe_mm", "epe_boundary_mm", "epe_interior_mm", "dice", "folding_percent"]
    lines = [
        "# Sliding motion on real anatomy",
        "",
        *provenance(),
        "",
        f"{len(pairs)} pairs: subjects {', '.join(args.subjects)} at 4 mm (96x80x128), "
        f"{args.motions} random sliding motion(s) each (`ranreg.sliding.random_sliding_ddf`, "
        "organ groups move rigidly, body wall still); mean ± sd over pairs. EPE: end-point "
        "error of the DDF in mm inside the body; *boundary*: within "
        f"{BOUNDARY_WIDTH} voxels of a sliding boundary; *interior*: the rest of the body. "
        f"Networks run in {args.precision}.",
        "",
        "| model | EPE (mm) | EPE boundary (mm) | EPE interior (mm) | Dice | folding % |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        cells = [_mean_sd([r[k] for r in rows if r["model"] == m]) for k in keys]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"![sliding]({args.out.with_suffix('.png').name})", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure(rows, models, args.out.with_suffix(".png"))
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
