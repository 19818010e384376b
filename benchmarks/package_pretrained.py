"""Copy a trained model into the package as a named pretrained model.

    python benchmarks/package_pretrained.py RUN_DIR NAME [--best]

Reads RUN_DIR/model/model.safetensors (weights + config; with --best the model of the
highest validation Dice, RUN_DIR/model-best), adds the name and its validation Dice
to its config, and writes src/ranreg/pretrained/NAME.safetensors
(+ NAME.json). The model card (NAME.md) and the entry in
src/ranreg/pretrained/__init__.py are written by hand, with the numbers and commands.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from ranreg.checkpoint import load_model, save_model

DEST = Path(__file__).resolve().parents[1] / "src" / "ranreg" / "pretrained"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("name")
    p.add_argument("--best", action="store_true", help="the model-best of the run")
    args = p.parse_args()
    model = load_model(args.run_dir / ("model-best" if args.best else "model"))
    rows = list(csv.DictReader((args.run_dir / "val_log.csv").open()))
    extra = {
        "pretrained_name": args.name,
        "val_dice_identity": float(rows[0]["dice_identity"]),
        "val_dice_final": float(model.config["val_dice"] if args.best else rows[-1]["dice"]),
    }
    tmp = DEST / f".{args.name}"
    save_model(model, tmp, extra=extra)
    (tmp / "model.safetensors").replace(DEST / f"{args.name}.safetensors")
    (tmp / "model.json").replace(DEST / f"{args.name}.json")
    tmp.rmdir()
    print(json.dumps(model.config | extra, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
