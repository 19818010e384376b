"""Helpers shared by the benchmark scripts: machine description, provenance header, data."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_LABELS = ROOT.parent / "shared" / "data" / "abdomen-ct-labels"
#: Subjects no shipped or benchmarked model trains on (file order: 14 train, 2 validation,
#: these 4 test).
TEST_SUBJECTS = ("0027", "0028", "0029", "0030")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> str:
    """The CPU's bf16-relevant vector extensions (what makes bf16 fast or not)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]
    return ", ".join(f for f in wanted if f in flags) or "no AVX2"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu_name()} ({cpu_flags()}), {os.cpu_count()} cores visible, {gpu}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}"
    )


def command_line() -> str:
    """The command that is running, as a user would type it."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def provenance() -> list[str]:
    """Markdown lines: the command, the date and the machine."""
    return [
        f"Made by `{command_line()}` on {dt.date.today().isoformat()},",
        f"machine: {machine()}.",
    ]


def painted_subject(labels_dir: Path, name: str, factor: float, seed: int = 0) -> tuple:
    """(image int16 HU, labels uint8 with the 9 evaluated organs, affine) of one subject,
    painted exactly as `ranreg data synth --seed 0` paints it, resampled by ``factor``
    (0.5: the paper's 4 mm grid, 96x80x128; 1: the 2 mm source grid, 192x160x256)."""
    from ranreg.data.io import load_label_volume
    from ranreg.data.preprocess import resample, select_labels
    from ranreg.data.synth_images import labels_to_image, sample_organ_hu, subject_rng

    vol = load_label_volume(labels_dir / f"{name}.nii.gz")
    rng = subject_rng(seed, name)
    organ_hu = sample_organ_hu(rng, max(int(vol.array.max(initial=0)) + 1, 14), 1.0)
    image = labels_to_image(vol.array, rng, spacing=vol.spacing, organ_hu=organ_hu)
    if factor != 1.0:
        img = resample(image, factor, order=1, affine=vol.affine)
        lab = resample(vol.array, factor, order=0, affine=vol.affine)
        image, labels, affine = img.array, lab.array, img.affine
    else:
        labels, affine = vol.array, vol.affine
    return (
        np.rint(image).astype(np.int16),
        select_labels(labels).astype(np.uint8),
        np.asarray(affine, dtype=np.float64),
    )
