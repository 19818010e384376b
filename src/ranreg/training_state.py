"""A long training run kept across machines: one small folder, overwritten after every chunk.

``ranreg train --state training-state/NAME`` keeps in ``training-state/NAME/``:

* ``checkpoint/``: the latest resumable state (weights and optimizer in safetensors, step,
  RNG states), exactly what ``--resume`` reads;
* ``model-best/``: the weights of the best validation score so far;
* ``val_log.csv``: the learning curve (validation Dice, real-scan end-point error);
* ``chunks.csv``: one row per chunk: steps, wall time, seconds per step, machine, command.

The folder is written to a temporary sibling and swapped in, so a killed chunk leaves the
previous chunk's state; its size is checked against :data:`MAX_STATE_BYTES` (a git
repository keeps it, overwritten, never accumulated). On a fresh machine the next chunk
copies it into the run folder and resumes from it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ranreg.checkpoint import recover_checkpoint
from ranreg.errors import RanregError

__all__ = ["CHUNKS_LOG", "MAX_STATE_BYTES", "export_state", "machine", "restore_state"]

MAX_STATE_BYTES = 30 * 1024 * 1024
CHUNKS_LOG = "chunks.csv"
_KEPT = ("checkpoint", "model-best", "val_log.csv")


def machine() -> str:
    """The CPU model (and GPU, where one is used) and the torch build, for the chunk log."""
    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    flags = ",".join(f for f in ("amx_bf16", "avx512_bf16") if f in text)
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    cores = os.cpu_count()
    return f"{cpu} ({flags or 'no bf16 units'}, {cores} cores){gpu}, torch {torch.__version__}"


def _step(checkpoint: Path) -> int:
    """The step a checkpoint folder reached (-1 without a readable one)."""
    try:
        return int(
            json.loads((checkpoint / "model.json").read_text(encoding="utf-8"))["trained_steps"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def restore_state(state_dir: Path, out: Path) -> bool:
    """Copy a kept state into a run folder whose checkpoint is missing or older (another
    machine went on); returns whether it did."""
    recover_checkpoint(state_dir)  # a chunk killed while replacing the state
    recover_checkpoint(out / "checkpoint")
    kept = _step(state_dir / "checkpoint")
    if kept < 0 or _step(out / "checkpoint") >= kept:
        return False
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in _KEPT:
        source = state_dir / name
        if source.is_dir():
            shutil.copytree(source, out / name, dirs_exist_ok=True)
        elif source.is_file():
            shutil.copy2(source, out / name)
    return True


def export_state(out: Path, state_dir: Path, chunk: dict[str, Any]) -> Path:
    """Replace ``state_dir`` by the run's checkpoint, best model and validation log, with
    ``chunk`` appended to its chunk log."""
    if not (out / "checkpoint").is_dir():
        raise RanregError(f"{out}: no checkpoint to keep in {state_dir}")
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(state_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{state_dir.name}.", dir=state_dir.parent))
    try:
        for name in _KEPT:
            source = out / name
            if source.is_dir():
                shutil.copytree(source, tmp / name)
            elif source.is_file():
                shutil.copy2(source, tmp / name)
        (tmp / CHUNKS_LOG).write_text(_chunk_log(state_dir / CHUNKS_LOG, chunk), encoding="utf-8")
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        if size > MAX_STATE_BYTES:
            raise RanregError(
                f"{state_dir}: the state would take {size / 2**20:.1f} MB, over the "
                f"{MAX_STATE_BYTES / 2**20:.0f} MB a kept state may take"
            )
        old = state_dir.with_name(f".{state_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if state_dir.exists():
            os.replace(state_dir, old)
        os.replace(tmp, state_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return state_dir


def _chunk_log(path: Path, row: dict[str, Any]) -> str:
    rows = list(csv.DictReader(path.open(encoding="utf-8"))) if path.is_file() else []
    rows.append({k: str(v) for k, v in row.items()})
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
