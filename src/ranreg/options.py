"""Settings of one registration run, validated once and passed through every entry point.

``ranreg register``, ``demo``, ``evaluate`` and the Python API
(:func:`ranreg.pipeline.register_volumes`) all take a :class:`RegistrationOptions`. The
default pipeline for a network is: affine pre-alignment, the network, instance
optimisation (:mod:`ranreg.affine`, :mod:`ranreg.refine`); ``fast`` keeps the affine and
the network only. For ``identity`` and classical peers (``ants-syn``) nothing is added
unless asked for explicitly (``affine``/``refine`` set), so they stay what they are.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from ranreg.affine import (
    AFFINE_MODES,
    SIMILARITIES,
    AffineSettings,
    check_world_map,
    read_itk_affine,
)
from ranreg.errors import RanregError
from ranreg.refine import DEFAULT_STEPS, DEFAULT_WEIGHT, RefineSettings

__all__ = ["FAST_SPACING_FACTOR", "PRECISIONS", "RegistrationOptions"]

#: ``fast`` runs the network on a grid this much finer than it was trained on: an 8 mm
#: network at 4 mm left 1.64 mm instead of 2.17 mm on the validation scans
#: (docs/registration.md), its receptive field still covering the motion left after the
#: affine stage
FAST_SPACING_FACTOR = 0.5

#: network arithmetic; ``auto``: bf16 where the hardware has it (ranreg.runtime.fast_bf16)
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class RegistrationOptions:
    """How to register a pair.

    ``affine``: ``none | rigid | affine``; None: ``affine`` for networks, ``none`` for
    identity and classical peers. ``similarity``: of the affine stage (``auto``: mutual
    information when exactly one image is CT). ``refine``: instance-optimisation steps per
    level; None: :data:`~ranreg.refine.DEFAULT_STEPS` for networks (0 with ``fast``), 0 for
    identity and peers. ``refine_weight``, ``refine_levels`` (mm, coarse to fine),
    ``diffeomorphic``: see :class:`~ranreg.refine.RefineSettings`. ``precision``
    (``auto | fp32 | bf16``; ``auto``: bf16 on CPUs with AVX512-BF16 or AMX and on GPUs with
    bf16, where it costs no measured accuracy) and ``channels_last`` choose how the network
    runs. ``tta``: test-time augmentation, the network's field averaged over the flips of
    both images along every subset of axes (8 forward passes in 3D; lower error on
    validation, at 8 times the network's time). ``network_spacing`` (mm): the grid the
    network runs on; None: the model's own (config ``spacing``), and with ``fast`` that
    spacing times :data:`FAST_SPACING_FACTOR` (finer than trained: lower error on
    validation). ``progress`` shows a progress bar while optimising. ``initial_affine``:
    a fixed-to-moving affine to start from, an ITK transform file (ANTs'
    ``0GenericAffine.mat``, ranreg's ``affine.txt``) or a 4x4 world (RAS+) matrix: the
    affine stage starts there instead of at the centres of mass, and with ``affine="none"``
    it is the affine stage.
    """

    affine: str | None = None
    similarity: str = "auto"
    refine: int | None = None
    refine_weight: float = DEFAULT_WEIGHT
    refine_levels: tuple[float, ...] = RefineSettings().levels
    diffeomorphic: bool = False
    fast: bool = False
    tta: bool = False
    network_spacing: float | None = None
    precision: str = "auto"
    channels_last: bool | None = None
    progress: bool = False
    initial_affine: str | tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        init = self.initial_affine
        if isinstance(init, os.PathLike):
            init = os.fspath(init)
        elif init is not None and not isinstance(init, str):  # a matrix, kept hashable
            init = tuple(tuple(float(v) for v in row) for row in check_world_map(init))
        object.__setattr__(self, "initial_affine", init)
        self.check()

    def check(self) -> None:
        """One-line errors (naming the setting) for anything that cannot work."""
        if self.affine is not None and self.affine not in AFFINE_MODES:
            raise RanregError(
                f"affine must be one of {', '.join(AFFINE_MODES)}, got {self.affine!r}"
            )
        if self.similarity not in SIMILARITIES:
            raise RanregError(
                f"similarity must be one of {', '.join(SIMILARITIES)}, got {self.similarity!r}"
            )
        if self.precision not in PRECISIONS:
            raise RanregError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.network_spacing is not None and not (
            math.isfinite(self.network_spacing) and self.network_spacing > 0
        ):
            raise RanregError(f"network spacing must be a positive mm, got {self.network_spacing}")
        if self.fast and self.refine:
            raise RanregError("fast means no instance optimisation; do not also set refine")
        if isinstance(self.initial_affine, str) and not Path(self.initial_affine).is_file():
            raise RanregError(f"{self.initial_affine}: initial affine file not found")
        self._refine_settings(self.refine or 0).check()

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> RegistrationOptions:
        """The options named in ``settings`` (keyword arguments of the Python API), with one
        error line that lists the known names for a name that is not one."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise RanregError(
                f"unknown registration option(s) {', '.join(unknown)}; known: "
                f"{', '.join(sorted(known))}"
            )
        if settings.get("refine_levels") is not None:  # a list from JSON or a caller
            levels = tuple(float(s) for s in settings["refine_levels"])
            settings = {**settings, "refine_levels": levels}
        return cls(**settings)

    def with_(self, **changes: Any) -> RegistrationOptions:
        """A copy with some settings changed (checked again)."""
        return replace(self, **changes)

    def initial_map(self) -> np.ndarray | None:
        """``initial_affine`` as a 4x4 world (RAS+) matrix (its file read), or None."""
        if isinstance(self.initial_affine, str):
            return read_itk_affine(self.initial_affine)  # register_affine checks it
        return None if self.initial_affine is None else np.array(self.initial_affine)

    def affine_settings(self, neural: bool) -> AffineSettings:
        mode = self.affine if self.affine is not None else ("affine" if neural else "none")
        return AffineSettings(mode=mode, similarity=self.similarity)

    def grid_spacing(
        self, trained: tuple[float, float, float] | None, neural: bool
    ) -> tuple[float, float, float] | None:
        """The grid in mm per axis that a model runs on, from its ``trained`` spacing
        (None: the fixed image's own grid); a network's follows ``network_spacing`` and
        ``fast``, any other model's stays ``trained``."""
        if not neural:
            return trained
        if self.network_spacing is not None:
            return (float(self.network_spacing),) * 3
        if self.fast and trained is not None:
            return tuple(s * FAST_SPACING_FACTOR for s in trained)  # type: ignore[return-value]
        return trained

    def refine_steps(self, neural: bool) -> int:
        if self.refine is not None:
            return self.refine
        return DEFAULT_STEPS if neural and not self.fast else 0

    def refine_settings(self, neural: bool) -> RefineSettings:
        return self._refine_settings(self.refine_steps(neural))

    def describe(self, neural: bool) -> str:
        """The steps this pipeline runs, e.g. ``affine + network + optimisation 50 x 2``."""
        aff = self.affine_settings(neural).mode
        steps = [] if self.initial_affine is None else ["initial affine"]
        steps += [] if aff == "none" else [aff]
        steps.append(("network, flips averaged" if self.tta else "network") if neural else "model")
        rs = self.refine_settings(neural)
        if rs.steps:
            kind = "diffeomorphic optimisation" if rs.diffeomorphic else "optimisation"
            steps.append(f"{kind} {rs.steps} x {len(rs.levels)}")
        return " + ".join(steps)

    def _refine_settings(self, steps: int) -> RefineSettings:
        return RefineSettings(
            steps=steps,
            weight=self.refine_weight,
            levels=tuple(float(s) for s in self.refine_levels),
            diffeomorphic=self.diffeomorphic,
        )
