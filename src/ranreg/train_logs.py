"""A training run's folder: its CSV logs (and TensorBoard), and the rule that an earlier
run is never destroyed by accident."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

from ranreg.checkpoint import recover_checkpoint
from ranreg.errors import RanregError

__all__ = ["BEST_DIR", "TRAIN_LOG", "VAL_LOG", "TrainLogs", "check_run_folder"]

#: the model with the highest validation Dice so far (the start counts), for model selection
BEST_DIR = "model-best"
TRAIN_LOG = "train_log.csv"
VAL_LOG = "val_log.csv"


class TrainLogs:
    """CSV logs (rewritten on resume to drop rows past the checkpoint) + TensorBoard."""

    def __init__(self, out: Path, step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.paths = {"train": out / TRAIN_LOG, "val": out / VAL_LOG}
        self.tb = None
        if not enabled:
            return
        for path in self.paths.values():
            if path.exists():
                rows = list(csv.DictReader(path.open(encoding="utf-8")))
                keep = [r for r in rows if int(r["step"]) <= step]
                with path.open("w", newline="", encoding="utf-8") as fh:
                    if keep:
                        writer = csv.DictWriter(fh, fieldnames=list(keep[0]))
                        writer.writeheader()
                        writer.writerows(keep)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1)
        except ImportError:  # a trimmed install without tensorboard: the CSV logs suffice
            self.tb = None

    def write(self, kind: str, row: dict[str, Any]) -> dict[str, Any]:
        if not self.enabled:
            return row
        path = self.paths[kind]
        new = not path.exists() or path.stat().st_size == 0
        fields = list(row)
        if not new:
            with path.open(encoding="utf-8") as fh:
                fields = next(csv.reader(fh))
            for key in row:
                if key not in fields:  # a later stage logs other terms: widen the file
                    rows = list(csv.DictReader(path.open(encoding="utf-8")))
                    fields = [*fields, *(k for k in row if k not in fields)]
                    with path.open("w", newline="", encoding="utf-8") as fh:
                        writer = csv.DictWriter(fh, fieldnames=fields)
                        writer.writeheader()
                        writer.writerows(rows)
                    break
        with path.open("a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, restval="")
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(f"{kind}/{key}", value, row["step"])
        return row

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def check_run_folder(out: Path, ckpt: Path, resume: bool, overwrite: bool) -> None:
    """Never destroy an earlier run: its checkpoint (also one a crash left aside, which is
    put back) is only continued with ``resume``; its logs are only replaced with
    ``overwrite``; ``resume`` without a checkpoint next to logs is an error, not step 0."""
    if out.exists() and not out.is_dir():
        raise RanregError(f"{out}: exists and is not a directory")
    recover_checkpoint(ckpt)
    logs = [n for n in (TRAIN_LOG, "train_summary.json") if (out / n).exists()]
    if ckpt.exists():
        if not resume and not overwrite:
            raise RanregError(
                f"{out}: holds a training checkpoint; use --resume, --overwrite or another --out"
            )
        if overwrite and not resume:
            shutil.rmtree(ckpt)
    elif logs and resume:
        raise RanregError(f"{out}: has the logs of a run ({logs[0]}) but no checkpoint to resume")
    elif logs and not overwrite:
        raise RanregError(
            f"{out}: holds an earlier run ({logs[0]}); use --overwrite or another --out"
        )
    if overwrite and not resume:  # a fresh run: the earlier run's logs and best model go
        for name in (TRAIN_LOG, VAL_LOG, "train_summary.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / BEST_DIR, ignore_errors=True)
