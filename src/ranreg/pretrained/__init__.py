"""Pretrained models shipped inside the package, by name.

Each entry is a safetensors model file in this folder (weights + config in its metadata,
see :mod:`ranreg.checkpoint`) with a model card ``NAME.md`` beside it. ``ranreg register``,
``ranreg evaluate`` and ``ranreg demo`` use :data:`DEFAULT_MODEL` when no ``--model`` is
given.
"""

from __future__ import annotations

from pathlib import Path

#: ``ARCH.TAG`` name -> file in this folder (timm's naming: architecture, then the
#: training recipe of the weights)
PRETRAINED: dict[str, str] = {
    "ran3.abdomen-cpu": "ran3-abdomen-cpu.safetensors",
    "ran3.abdomen-weak": "ran3-abdomen-weak.safetensors",
    "ran3.abdomen-synth": "ran3-abdomen-synth.safetensors",
}

#: names of ranreg 0.2, still accepted
ALIASES: dict[str, str] = {
    "ran3-abdomen-cpu": "ran3.abdomen-cpu",
    "ran3-abdomen-weak": "ran3.abdomen-weak",
}

#: the model used when none is named
DEFAULT_MODEL = "ran3.abdomen-synth"


def path_of(name: str) -> Path:
    """The file of a packaged model (``ARCH.TAG`` or an alias)."""
    return Path(__file__).resolve().parent / PRETRAINED[ALIASES.get(name, name)]
