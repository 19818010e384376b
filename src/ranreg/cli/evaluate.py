"""``ranreg evaluate``: score methods on every pair of a data set."""

from __future__ import annotations

from typing import Any

from ranreg.cli.options import (
    add_device_option,
    add_label_options,
    add_landmark_coordinates_option,
    add_registration_options,
    options_from_args,
)
from ranreg.evaluate import evaluate
from ranreg.evaluate_report import mean_sd
from ranreg.refine import DEFAULT_STEPS


def _run(args: Any) -> int:
    summary = evaluate(
        args.data,
        args.out,
        models=args.model,
        split=args.split,
        labels=args.labels,
        device=args.device,
        progress=not args.no_progress,
        options=options_from_args(args),
        label_names=args.label_names,
        landmark_coordinates=args.landmark_coordinates,
        pairs=args.pairs,
    )
    info = summary["info"]
    print(
        f"evaluated {len(summary['models'])} models on {info['pairs']} ordered pairs of "
        f"{info['subjects']} subjects; outputs in {args.out}/ "
        "(results.csv, summary.md, boxplots.png, boxplots/)"
    )
    for name, scores in summary["models"].items():
        d, tre = scores["mean_over_organs"]["dice"], scores["per_pair"]["landmark_error_mm"]
        parts = []
        if info["labels"]:
            parts.append(f"mean Dice over organs {mean_sd(d['mean'], d['sd'], 3)}")
        if tre["n"]:
            parts.append(f"landmark error {mean_sd(tre['mean'], tre['sd'], 2)} mm")
        print(f"  {name}: " + "; ".join(parts))
    return 0


def add_parser(sub: Any) -> None:
    from ranreg.cli import command_help

    p = sub.add_parser(
        "evaluate",
        help=command_help("evaluate"),
        description="Register every ordered pair of distinct subjects (or the --pairs "
        "listed) with each model and 'identity' (the reference) and write results.csv, "
        "summary.md and box plots.",
    )
    p.add_argument("--data", required=True, help="data set folder (DeepReg or Learn2Reg layout)")
    p.add_argument(
        "--split",
        default=None,
        help="train, val or test (default: test, or none for a folder holding images/; "
        "a Learn2Reg folder without --split or --pairs: its registration_val pairs)",
    )
    p.add_argument(
        "--pairs",
        default=None,
        metavar="CSV|KEY",
        help="evaluate these pairs, not every ordered pair: a CSV file with the columns "
        "moving and fixed (subject names of the split), or a key of a Learn2Reg "
        "*_dataset.json (registration_val, registration_test, training_paired_images; its "
        "keypoints are landmarks, and a task without label maps is scored by them)",
    )
    p.add_argument(
        "--model",
        nargs="+",
        action="extend",
        metavar="MODEL",
        help="model files/folders or names (default: the packaged default); identity is "
        "always added as the reference; LABEL=MODEL names a model in the tables, a suffix "
        "@bf16 or @fp32 sets one model's precision; +fast (no instance optimisation), "
        f"+refineN (N optimisation steps per level, +refine: {DEFAULT_STEPS}), +rigid, "
        "+noaffine, +affine and +diffeo change one model's pipeline",
    )
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    add_label_options(p)
    add_landmark_coordinates_option(p)
    add_device_option(p)
    add_registration_options(p, progress_flag=False)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
