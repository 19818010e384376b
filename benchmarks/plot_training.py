"""Plot a training run's loss curves and validation Dice.

python benchmarks/plot_training.py RUN_DIR --out docs/figures/NAME.png [--title T]
"""

from __future__ import annotations

import argparse

from ranreg.figures_training import plot_training


def main() -> int:
    p = argparse.ArgumentParser(description="Plot a ranreg training run.")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--title")
    args = p.parse_args()
    print(plot_training(args.run_dir, args.out, args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
