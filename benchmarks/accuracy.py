"""Accuracy on unseen real anatomy: every ordered pair of the test subjects, every model.

    python benchmarks/accuracy.py --model ran3-abdomen-cpu --model ants-syn \\
        --model RAN3=runs/budget/RAN3/model ...           # docs/results/accuracy.md
    python benchmarks/accuracy.py --quick                 # < 10 min: 2 pairs, packaged model

The test subjects 0027-0030 (no compared model trains or validates on them) with images
painted from the shared label maps (`ranreg data synth --seed 0`) at the paper's 4 mm grid
(96x80x128) are written once to ``runs/abdomen-test-4mm``; `ranreg evaluate` then
registers all 12 ordered pairs with every model (identity added) and scores the paper's 9
organs: Dice, ASD, HD95, folding, SD log|J|, runtime, Wilcoxon tests. The summary and the
box plots are copied to ``docs/results/accuracy.md`` / ``accuracy-boxplots.png`` under a
header with the command, date and machine; the full outputs stay in ``--work``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
from pathlib import Path

from common import ROOT, SHARED_LABELS, TEST_SUBJECTS, painted_subject, provenance


def test_data(folder: Path, subjects: list[str]) -> Path:
    from ranreg.data.io import save_nifti

    for name in subjects:
        if (folder / "labels" / f"{name}.nii.gz").is_file():
            continue
        image, labels, affine = painted_subject(SHARED_LABELS, name, 0.5)
        save_nifti(folder / "images" / f"{name}.nii.gz", image, affine)
        save_nifti(folder / "labels" / f"{name}.nii.gz", labels, affine)
    return folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", metavar="[LABEL=]MODEL[@bf16]")
    p.add_argument("--quick", action="store_true", help="subjects 0027/0028, packaged model")
    p.add_argument("--work", type=Path, default=ROOT / "runs")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "accuracy.md")
    args = p.parse_args()

    from ranreg.errors import RanregError
    from ranreg.evaluate import evaluate

    subjects = list(TEST_SUBJECTS[:2] if args.quick else TEST_SUBJECTS)
    data = test_data(
        args.work / ("abdomen-test-4mm-quick" if args.quick else "abdomen-test-4mm"), subjects
    )
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run = args.work / f"eval-accuracy-{stamp}"
    try:
        evaluate(data, run, models=args.model)
    except RanregError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = (run / "summary.md").read_text().splitlines()
    body = [line for line in summary[1:] if "boxplots" not in line]  # drop the title
    shown = run.relative_to(ROOT) if run.is_relative_to(ROOT) else run
    png = args.out.with_name(args.out.stem + "-boxplots.png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "boxplots.png", png)
    lines = [
        "# Accuracy on unseen abdomen anatomy",
        "",
        *provenance(),
        f"Full outputs (results.csv, per-organ box plots): `{shown}`.",
        *body,
        "",
        f"![box plots]({png.name})",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
