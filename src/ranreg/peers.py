"""Classical, optimisation-based registration methods wrapped as ranreg "models".

They need no training and run in the same harness as the networks: ``ranreg register
--model ants-syn`` and ``ranreg evaluate --model ants-syn`` (:func:`ranreg.models.resolve_model`
knows the names in :data:`PEER_NAMES`). Like a network, a peer is a ``torch.nn.Module`` with a
``config`` dict, called as ``model(moving, fixed)`` on ``(B, 1, *S)`` images normalised to
[0, 1] on the network grid, and returns the DDF ``(B, 3, *S)`` in voxels of that grid with
``warped(x) = moving(x + ddf(x))``, channel ``i`` along array axis ``i``
(:func:`ranreg.spatial.warp`). They have no parameters and run on the CPU whatever the
device of the inputs (the DDF comes back on the inputs' device).

ANTs SyN (:class:`AntsSyN`, name ``ants-syn``, optional extra ``peers``: antspyx)
-----------------------------------------------------------------------------------
``ants.registration(fixed, moving, type_of_transform="SyN")`` with every parameter at its
default, i.e. the recommended setting of ANTsPy: centre-of-mass initialisation, an affine
stage (Mattes MI, 2100x1200x1200x0 iterations, shrink 4x2x2x1) and a symmetric
normalisation stage (Mattes MI, ``SyN[0.2, 3, 0]``, 40x20x0 iterations, shrink 4x2x1).

* Grid: the harness resamples both images to 4 mm voxels (config ``spacing``), the
  working grid of the paper's networks, and windows CT to [-100, 300] HU (config
  ``window``), exactly as for a network. ANTs gets the two arrays with unit spacing, zero
  origin and identity direction, so its physical coordinates are voxel indices along the
  array axes (the array is not transposed: ``ants.from_numpy`` keeps axis ``i`` as image
  axis ``i``). With the isotropic 4 mm grid this is the same problem up to a global scale;
  ANTs' smoothing sigmas and SyN step are in voxels here (``smoothing_in_mm`` is off).
* Field: the whole forward transform (affine + SyN warp) is composed into one dense
  displacement field on the fixed grid by ``antsApplyTransforms`` (``compose``). ANTs' forward
  transform maps a fixed point ``x`` to the moving point ``x + d(x)`` and the warped image is
  ``moving(x + d(x))``, so ``d`` (components in physical = array-axis order) is the ranreg
  DDF as it is. Checked by ``tests/test_peers.py`` with known shifts along axes 0 and 2.
* Determinism: the random sampling of the affine metric uses a fixed seed (ANTs
  ``--random-seed``, config ``random_seed``), and ITK runs single-threaded unless told
  otherwise: before the first ANTs call in the process ranreg sets the environment variable
  ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1`` if neither it nor ``ITK_NUMBER_OF_THREADS`` is
  set. With several threads the result changes from run to run even with the seed (the
  multi-threaded metric sums in a varying order). ITK reads the variable once, when the
  process creates its first ANTs image, so to use more threads (faster, not reproducible)
  set it in the shell, e.g. ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=8 ranreg evaluate ...``.
  Config ``itk_threads`` records the value in force when the model was built.
* Runtime: 11.6 s of ANTs (the ``network_s`` of the reports) for the packaged demo pair at
  96x80x128 with one ITK thread, measured once at the lowest priority (``nice -n 19``) on a
  busy 2-core machine, so an upper figure; about 0.5 s at 32x28x36. Peak memory of the whole
  ``ranreg register`` run: about 0.7 GB. Images without contrast (constant) give a zero DDF.

ConvexAdam (:class:`ConvexAdam`, name ``convex-adam``, optional extra ``peers``: convexAdam)
---------------------------------------------------------------------------------------------
The Learn2Reg method of Siebert, Hansen and Heinrich (MICCAI 2021; IEEE TMI 2024): MIND-SSC
features, a discrete search of displacements on a coarse grid made smooth by coupled convex
optimisation and inverse consistency, then Adam on a finer grid with a diffusion penalty.
``convex_adam_pt(fixed, moving)`` of the package runs with every setting at its default
(``grid_sp=6``, ``disp_hw=4``, ``lambda_weight=1.25``, 80 Adam steps, ``ic=True``), in
float32 on the CPU.

* Grid: 2 mm voxels (config ``spacing``), the resolution of Learn2Reg's abdomen CT task
  for which those defaults were made (at the networks' 4 mm the coarse search grid would be
  24 mm); CT windowed as for the networks. The arrays go in as they are (axis ``i`` of the
  array is axis ``i`` of the field).
* Field: the package returns ``(*S, 3)`` displacements in voxels with ``warped(x) =
  moving(x + d(x))``, channel ``i`` along array axis ``i``: the ranreg DDF after moving the
  channel axis first (checked by ``tests/test_convex_adam.py`` with known shifts).
* Deterministic on the CPU; images without contrast give a zero DDF (MIND is undefined).
"""

from __future__ import annotations

import importlib
import os
import tempfile
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ranreg.data.preprocess import DEFAULT_WINDOW
from ranreg.errors import RanregError
from ranreg.registry import get_method, register_method

__all__ = [
    "ANTS_SYN",
    "CONVEX_ADAM",
    "PEER_NAMES",
    "THREADS_ENV",
    "AntsSyN",
    "ArrayPeer",
    "ConvexAdam",
    "import_ants",
    "import_convex_adam",
    "build_peer",
]

#: Name of the ANTs SyN peer.
ANTS_SYN = "ants-syn"
#: Name of the ConvexAdam peer and the spacing (mm) of its grid.
CONVEX_ADAM = "convex-adam"
CONVEX_ADAM_SPACING = 2.0
#: Names of the classical methods :func:`build_peer` knows.
PEER_NAMES: tuple[str, ...] = (ANTS_SYN, CONVEX_ADAM)
#: The environment variable that sets ITK's (hence ANTs') number of threads.
THREADS_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
_OTHER_THREADS_ENV = "ITK_NUMBER_OF_THREADS"
INSTALL_HINT = "install the peers extra: pip install 'ranreg[peers]'"


def _itk_threads() -> str:
    """The ITK thread setting in force (sets 1 when the environment has none)."""
    if THREADS_ENV not in os.environ and _OTHER_THREADS_ENV not in os.environ:
        os.environ[THREADS_ENV] = "1"
    return os.environ.get(THREADS_ENV) or os.environ[_OTHER_THREADS_ENV]


def _require(module: str, method: str) -> Any:
    """Import ``module`` of the ``peers`` extra, or say which extra ``method`` needs."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.partition(".")[0]
        raise RanregError(f"model {method!r} needs {package} ({exc}); {INSTALL_HINT}") from None


def import_ants(name: str = ANTS_SYN) -> Any:
    """The ``ants`` module (antspyx), after fixing ITK's thread count (see the module docs)."""
    _itk_threads()
    return _require("ants", name)


class ArrayPeer(torch.nn.Module):
    """A classical method run on each pair of a batch as numpy arrays, on the CPU: the
    subclass gives :meth:`register_arrays`."""

    config: dict[str, Any]

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        if moving.shape != fixed.shape or moving.dim() not in (4, 5) or moving.shape[1] != 1:
            raise ValueError(
                f"{self.config['name']}: need moving and fixed of the same shape (B, 1, *S) "
                f"with 2 or 3 spatial axes, got {tuple(moving.shape)} and {tuple(fixed.shape)}"
            )
        out = [
            torch.from_numpy(self.register_arrays(m[0], f[0]))
            for m, f in zip(
                moving.detach().float().cpu().numpy(),
                fixed.detach().float().cpu().numpy(),
                strict=True,
            )
        ]
        return torch.stack(out).to(device=fixed.device, dtype=fixed.dtype)

    def register_arrays(self, moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
        """The DDF ``(ndim, *S)`` float32 (voxels, ranreg convention) of two arrays ``S``."""
        raise NotImplementedError


class AntsSyN(ArrayPeer):
    """ANTs SyN (affine + symmetric normalisation) at its default settings, as a model.

    See the module docstring for the grid, the conventions and determinism.
    ``random_seed``: seed of ANTs' metric sampling; ``type_of_transform``: kept at ``"SyN"``
    for the benchmarks (any ``ants.registration`` transform type works).
    """

    def __init__(self, random_seed: int = 1, type_of_transform: str = "SyN") -> None:
        super().__init__()
        self._ants = import_ants()
        self.config: dict[str, Any] = {
            "name": ANTS_SYN,
            "ndim": 3,
            "spacing": [4.0, 4.0, 4.0],
            "window": list(DEFAULT_WINDOW),
            "type_of_transform": type_of_transform,
            "random_seed": int(random_seed),
            "itk_threads": _itk_threads(),
            "antspyx": str(getattr(self._ants, "__version__", "unknown")),
        }

    def register_arrays(self, moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
        """The DDF ``(ndim, *S)`` float32 (voxels, ranreg convention) of two arrays ``S``."""
        return self.register_arrays_with_warped(moving, fixed)[0]

    def register_arrays_with_warped(
        self, moving: np.ndarray, fixed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The DDF as :meth:`register_arrays` and ANTs' own warped moving image (``S``,
        ANTs' linear resampling; the moving image itself when nothing is registered)."""
        ants = self._ants
        ndim = fixed.ndim
        if np.ptp(moving) <= 0 or np.ptp(fixed) <= 0:  # nothing to align
            return np.zeros((ndim, *fixed.shape), np.float32), moving.astype(np.float32)
        fix_img = ants.from_numpy(np.ascontiguousarray(fixed, dtype=np.float32))
        mov_img = ants.from_numpy(np.ascontiguousarray(moving, dtype=np.float32))
        config = getattr(ants, "config", None)
        with tempfile.TemporaryDirectory(prefix="ranreg-ants-") as tmp:
            old_seed = getattr(config, "_random_seed", None)
            if config is not None:
                config._random_seed = self.config["random_seed"]
            try:
                reg = ants.registration(
                    fix_img,
                    mov_img,
                    type_of_transform=self.config["type_of_transform"],
                    outprefix=os.path.join(tmp, "reg_"),
                )
                field_file = ants.apply_transforms(
                    fix_img, mov_img, reg["fwdtransforms"], compose=os.path.join(tmp, "fwd_")
                )
                if not field_file or not os.path.isfile(field_file):
                    raise RuntimeError("antsApplyTransforms wrote no composite field")
                field = np.asarray(ants.image_read(field_file).numpy(), dtype=np.float32)
                warped = np.asarray(reg["warpedmovout"].numpy(), dtype=np.float32)
            except (RuntimeError, ValueError) as exc:
                raise RanregError(
                    f"{ANTS_SYN}: ANTs failed on a grid of shape {fixed.shape}: {exc}"
                ) from exc
            finally:
                if config is not None:
                    config._random_seed = old_seed
        if field.shape != (*fixed.shape, ndim):
            raise RanregError(
                f"{ANTS_SYN}: ANTs returned a field of shape {field.shape}, expected "
                f"{(*fixed.shape, ndim)}"
            )
        return np.ascontiguousarray(np.moveaxis(field, -1, 0)), warped


@register_method(ANTS_SYN, kind="peer", summary="ANTs SyN (extra: peers)")
def _ants_syn(**options: Any) -> torch.nn.Module:
    return AntsSyN()


def import_convex_adam() -> Any:
    """The function ``convex_adam_pt`` of the package ``convexAdam``."""
    return _require("convexAdam.convex_adam_MIND", CONVEX_ADAM).convex_adam_pt


class ConvexAdam(ArrayPeer):
    """ConvexAdam (MIND features, coupled convex optimisation, then Adam), as the package
    ``convexAdam`` runs it with every setting at its default, on a grid of ``spacing`` mm.

    See the module docstring for the grid and the conventions.
    """

    def __init__(self, spacing: float = CONVEX_ADAM_SPACING) -> None:
        super().__init__()
        self._register = import_convex_adam()
        from importlib.metadata import version

        self.config: dict[str, Any] = {
            "name": CONVEX_ADAM,
            "ndim": 3,
            "spacing": [float(spacing)] * 3,
            "window": list(DEFAULT_WINDOW),
            "convexAdam": version("convexAdam"),
        }

    def register_arrays(self, moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
        if fixed.ndim != 3:
            raise RanregError(f"{CONVEX_ADAM}: 3D images only, got shape {fixed.shape}")
        if np.ptp(moving) <= 0 or np.ptp(fixed) <= 0:  # nothing to align (MIND would be NaN)
            return np.zeros((3, *fixed.shape), np.float32)
        # its Adam stage needs gradients, which the harness turns off around the network;
        # torch warns at each of its affine_grid calls about a default changed in 2018
        with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Default grid_sample and affine_grid")
            field = self._register(
                torch.from_numpy(np.ascontiguousarray(fixed, dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(moving, dtype=np.float32)),
                dtype=torch.float32,
                device=torch.device("cpu"),
            )
        return np.ascontiguousarray(np.moveaxis(np.asarray(field, np.float32), -1, 0))


@register_method(
    CONVEX_ADAM, kind="peer", summary="ConvexAdam, MIND + convex + Adam (extra: peers)"
)
def _convex_adam(**options: Any) -> torch.nn.Module:
    return ConvexAdam()


def build_peer(name: str) -> torch.nn.Module:
    """The classical method called ``name`` (one of :data:`PEER_NAMES`)."""
    if name in PEER_NAMES:
        return get_method(name).build()
    raise RanregError(f"unknown classical method {name!r} (known: {', '.join(PEER_NAMES)})")
