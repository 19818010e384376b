"""Training-curve figure of one run: loss per stage and validation Dice, read from the run's
``train_log.csv`` and ``val_log.csv``. Files only (matplotlib's Agg backend).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ranreg.figures import save_figure  # noqa: E402

__all__ = ["plot_training", "running_mean"]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over ``window`` points, the ends padded with the end values; a curve
    shorter than ``window`` comes back unchanged."""
    if len(values) < window or window < 2:
        return values
    kernel = np.ones(window) / window
    pad = np.pad(values, (window // 2, window - 1 - window // 2), mode="edge")
    return np.convolve(pad, kernel, mode="valid")


def plot_training(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Loss per stage (raw and running mean) and validation Dice of a training run."""
    run = Path(run_dir)
    rows = _read_csv(run / "train_log.csv")
    val = _read_csv(run / "val_log.csv") if (run / "val_log.csv").exists() else []
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    fig, axes = plt.subplots(1, len(stages) + 1, figsize=(4.2 * (len(stages) + 1), 3.6))
    for ax, stage in zip(axes, stages, strict=False):
        sel = [r for r in rows if r["stage"] == stage]
        steps = np.array([int(r["step"]) for r in sel])
        loss = np.array([float(r["loss"]) for r in sel])
        ax.plot(steps, loss, color="0.75", lw=0.8, label="loss per step")
        ax.plot(
            steps,
            running_mean(loss, max(5, len(loss) // 20)),
            color="C0",
            lw=1.8,
            label="running mean",
        )
        ax.set_title(f"stage '{stage}'")
        ax.set_xlabel("step")
        ax.set_ylabel("weighted loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    if val:
        vsteps = [int(r["step"]) for r in val]
        vdice = [float(r["dice"]) for r in val]
        ax.plot(vsteps, vdice, "o-", color="C2", label="after registration")
        ident = [float(r["dice_identity"]) for r in val if r.get("dice_identity")]
        if ident:
            ax.axhline(ident[0], color="C3", ls="--", label="no registration")
        for s in stages[1:]:
            first = min(int(r["step"]) for r in rows if r["stage"] == s)
            ax.axvline(first - 0.5, color="0.5", ls=":", lw=1)
        ax.legend(fontsize=8)
    ax.set_title("validation: mean Dice over organs")
    ax.set_xlabel("step")
    ax.set_ylabel("Dice")
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out, dpi=120)
