"""``ranreg register``: register two image files and write the results.

This module resolves models (packaged names, files, ``identity``, classical peers), runs
:func:`ranreg.pipeline.register_volumes` (affine -> network -> instance optimisation;
geometry and conventions are documented there) and writes the output folder atomically.
``ddf.nii.gz`` holds the whole mapping (affine included) as world displacements in mm
(:data:`DDF_CONVENTION`); ``affine.txt`` holds the affine stage alone as an ITK transform
(LPS), for tools that want it separately.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

from ranreg.affine import AFFINE_MODES, SIMILARITIES, write_itk_affine
from ranreg.checkpoint import load_model
from ranreg.data.formats import OUTPUT_FORMATS
from ranreg.data.formats import output_format as _output_format
from ranreg.data.io import Volume, check_out_dir, load_label_volume, load_nifti, save_image
from ranreg.errors import RanregError
from ranreg.labelnames import DEFAULT_TABLE, label_name, load_label_names
from ranreg.metrics import ORGAN_NAMES, PAPER_ORGANS, evaluate_pair
from ranreg.options import PRECISIONS, RegistrationOptions
from ranreg.peers import PEER_NAMES, build_peer
from ranreg.pipeline import (
    HU_THRESHOLD,
    RegistrationResult,
    _check_inputs,
    model_settings,
    register_volumes,
)
from ranreg.refine import DEFAULT_STEPS, DEFAULT_WEIGHT, RefineSettings
from ranreg.runtime import (
    default_channels_last,
    is_neural,
    resolve_device,
    resolve_precision,
    run_network,
)

__all__ = [
    "IDENTITY",
    "IdentityModel",
    "RegistrationResult",
    "RegistrationOptions",
    "DDF_CONVENTION",
    "HU_THRESHOLD",
    "resolve_model",
    "resolve_device",
    "model_settings",
    "model_label",
    "register_volumes",
    "score_labels",
    "register_files",
    "add_parser",
    "is_neural",
    "run_network",
    "default_channels_last",
]

#: Name of the reference "model" that does not move anything.
IDENTITY = "identity"
#: Output files of :func:`register_files`.
OUTPUT_FILES = (
    "warped.nii.gz",
    "ddf.nii.gz",
    "jacobian.nii.gz",
    "warped_labels.nii.gz",
    "affine.txt",
    "overlay.png",
    "head_masks.png",
    "metrics.json",
)
DDF_CONVENTION = (
    "ddf.nii.gz holds u(p) in mm along the world (RAS+) axes on the fixed grid, shape "
    "(X, Y, Z, 1, 3), NIfTI intent DISPVECT (1006, which ITK, ANTs, SimpleITK and 3D Slicer "
    "convert to their LPS frame on reading): the fixed voxel x at world point p = A_fixed x "
    "corresponds to the moving point p + u(p), i.e. to the moving voxel "
    "A_moving^-1 (p + u(p)); warped(x) = moving(A_moving^-1 (A_fixed x + u(A_fixed x)))."
)


# --------------------------------------------------------------------------------- models
class IdentityModel(torch.nn.Module):
    """A 'network' that returns a zero DDF: the reference (no registration) row."""

    def __init__(self, ndim: int = 3) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"name": IDENTITY, "ndim": ndim}

    def forward(self, moving: Tensor, fixed: Tensor, return_levels: bool = False) -> Tensor:
        b, spatial = fixed.shape[0], fixed.shape[2:]
        return torch.zeros(b, len(spatial), *spatial, dtype=fixed.dtype, device=fixed.device)


def _pretrained() -> tuple[dict[str, str], str | None, Path | None]:
    """(name -> file, default name, folder) of the packaged models; empty if none."""
    try:
        module = importlib.import_module("ranreg.pretrained")
    except ImportError:
        return {}, None, None
    table = dict(getattr(module, "PRETRAINED", {}) or {})
    default = getattr(module, "DEFAULT_MODEL", None)
    file = getattr(module, "__file__", None)
    return table, default, (Path(file).parent if file else None)


def _known_names() -> list[str]:
    return [IDENTITY, *_pretrained()[0], *PEER_NAMES]


def resolve_model(spec: str | os.PathLike[str] | None) -> torch.nn.Module:
    """The model named by ``spec``, in eval mode on the CPU.

    ``spec`` is a model file or a directory holding one (``model.safetensors``, see
    :mod:`ranreg.checkpoint`), the name ``identity`` (zero DDF), the name of a classical
    method (:data:`ranreg.peers.PEER_NAMES`, e.g. ``ants-syn``) or the name of a packaged
    pretrained model (``ranreg.pretrained.PRETRAINED``); ``None`` means the packaged
    default (``ranreg.pretrained.DEFAULT_MODEL``). The model gets a ``source`` attribute
    (the spec as given) used in messages and reports.
    """
    table, default, folder = _pretrained()
    known = ", ".join(_known_names())
    if spec is None:
        if default is None or default not in table:
            raise RanregError(
                f"no packaged default model is installed; pass --model (known: {known}, "
                "or a model file)"
            )
        spec = default
    text = os.fspath(spec)
    if text == IDENTITY:
        model: torch.nn.Module = IdentityModel()
    elif text in PEER_NAMES and not Path(text).exists():
        model = build_peer(text)  # classical method; RanregError if its extra is missing
    elif text in table and not Path(text).exists():
        assert folder is not None
        file = folder / table[text]
        if not file.is_file():
            raise RanregError(f"{file}: packaged model {text!r} is missing from the installation")
        model = load_model(file)
    elif Path(text).exists() or os.sep in text or text.endswith(".safetensors"):
        model = load_model(text)  # RanregError names the file for anything but a model file
    else:
        raise RanregError(
            f"unknown model {text!r}: not a model file or folder, and not a packaged model "
            f"name (known: {known})"
        )
    model.source = text  # type: ignore[attr-defined]
    return model.eval()


def model_label(model: torch.nn.Module) -> str:
    """A short name for reports: the spec for names, ``NAME (file or folder)`` for files."""
    source = str(getattr(model, "source", "") or "")
    name = str(model.config.get("name", "model"))
    if not source or source in _known_names():
        return source or name
    p = Path(source)
    part = p.parent.name if p.name in ("model.safetensors", "model") and p.parent.name else p.name
    part = part.removesuffix(".safetensors")
    return f"{name} ({part})" if part else name


def add_registration_options(p: Any, progress_flag: bool = True) -> None:
    """The pipeline options shared by ``register``, ``demo`` and ``evaluate``."""
    g = p.add_argument_group("registration pipeline (affine -> network -> optimisation)")
    g.add_argument(
        "--affine",
        choices=AFFINE_MODES,
        default=None,
        help="pre-alignment in world space before the network (default: affine for "
        "networks, none for identity and ants-syn); written as affine.txt (ITK, LPS)",
    )
    g.add_argument(
        "--similarity",
        choices=SIMILARITIES,
        default="auto",
        help="similarity of the affine stage: local NCC, mutual information, or auto "
        "(MI when exactly one image is CT)",
    )
    g.add_argument(
        "--fast",
        action="store_true",
        help="skip the instance optimisation: affine + network alone (about 1 s)",
    )
    g.add_argument(
        "--refine",
        type=int,
        default=None,
        metavar="N",
        help=f"instance-optimisation steps per level (default {DEFAULT_STEPS} for networks, "
        "0 for identity and ants-syn; 0 turns it off)",
    )
    g.add_argument(
        "--refine-weight",
        type=float,
        default=DEFAULT_WEIGHT,
        metavar="W",
        help=f"smoothness weight of the optimisation (default {DEFAULT_WEIGHT:g}; higher: "
        "smoother fields, less folding)",
    )
    g.add_argument(
        "--refine-levels",
        type=float,
        nargs="+",
        default=list(RefineSettings().levels),
        metavar="MM",
        help="grid spacings of the optimisation levels, coarse to fine (default "
        + " ".join(f"{s:g}" for s in RefineSettings().levels)
        + ")",
    )
    g.add_argument(
        "--diffeomorphic",
        action="store_true",
        help="optimise a stationary velocity field (scaling and squaring): no folding",
    )
    if progress_flag:
        g.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="progress bar while optimising (default: when stderr is a terminal)",
        )
    add_precision_options(g)


def options_from_args(args: Any) -> RegistrationOptions:
    """The :class:`RegistrationOptions` of parsed command-line arguments (checked)."""
    flag = getattr(args, "progress", False)
    progress = sys.stderr.isatty() if flag is None else bool(flag)
    return RegistrationOptions(
        affine=args.affine,
        similarity=args.similarity,
        fast=args.fast,
        refine=args.refine,
        refine_weight=args.refine_weight,
        refine_levels=tuple(args.refine_levels),
        diffeomorphic=args.diffeomorphic,
        precision=args.precision,
        channels_last=args.channels_last,
        progress=progress,
    )


def add_precision_options(p: Any) -> None:
    """``--precision`` and ``--channels-last`` for the commands that run a network."""
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="network arithmetic: auto (default: bf16 autocast where the CPU has "
        "AVX512-BF16/AMX or the GPU has bf16, else fp32), fp32 or bf16",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last memory layout for the network (default: on for the CPU and for bf16)",
    )


# --------------------------------------------------------------------------------- metrics
def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def score_labels(
    warped_label: np.ndarray,
    fixed_label: np.ndarray,
    labels: Sequence[int],
    spacing: Sequence[float],
) -> dict[int, dict[str, float]]:
    """``{label: {"dice", "asd_mm", "hd95_mm"}}`` on the fixed grid (NaN where undefined)."""
    scores = evaluate_pair(warped_label, fixed_label, list(labels), list(spacing))
    return {
        lab: {"dice": s["dice"], "asd_mm": s["asd"], "hd95_mm": s["hd95"]}
        for lab, s in scores["labels"].items()
    }


def _mean_scores(per_label: dict[int, dict[str, float]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in ("dice", "asd_mm", "hd95_mm"):
        vals = [s[key] for s in per_label.values() if math.isfinite(s[key])]
        out[key] = float(np.mean(vals)) if vals else None
    return out


def organ_name(label: int) -> str:
    return ORGAN_NAMES.get(int(label), f"label {int(label)}")


# --------------------------------------------------------------------------------- files
def save_ddf(path: Path, ddf_mm: np.ndarray, affine: np.ndarray) -> Path:
    """Write a world-mm DDF (X, Y, Z, 3) as a 5D NIfTI (X, Y, Z, 1, 3), intent DISPVECT.

    NIfTI vectors are RAS; ITK (hence ANTs, SimpleITK, Slicer) negates the first two
    components of a DISPVECT image on reading, so these tools apply the field as ranreg
    does (tests/test_itk_interop.py). With intent VECTOR they would not.
    """
    data = np.ascontiguousarray(ddf_mm, dtype=np.float32)[:, :, :, None, :]
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.header.set_intent("displacement vector", (), name="ddf_mm_world")
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _first_missing(path: Path) -> Path | None:
    missing = None
    p = path.absolute()
    while not p.exists():
        missing = p
        p = p.parent
    return missing


def atomic_output_dir(out_dir: Path) -> tuple[Path, Path | None]:
    """A temporary sibling of ``out_dir`` to write into (parents created) and the first
    folder this created (to remove on failure)."""
    check_out_dir(out_dir)
    created = _first_missing(out_dir.parent)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    return tmp, created


def finish_output_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished temporary folder onto ``out_dir`` (which may be an empty folder)."""
    check_out_dir(out_dir)
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(tmp, out_dir)


def abandon_output_dir(tmp: Path, created: Path | None) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return _finite_or_none(x)
    if isinstance(x, Path):
        return str(x)
    return x


def register_files(
    fixed: str | os.PathLike[str],
    moving: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    model: torch.nn.Module | str | None = None,
    moving_labels: str | os.PathLike[str] | None = None,
    fixed_labels: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    labels_to_score: Sequence[int] | None = None,
    *,
    head_masks: bool = False,
    label_names: str | os.PathLike[str] | dict[int, str] | None = None,
    output_format: str | None = None,
    options: RegistrationOptions | None = None,
    **changes: Any,
) -> dict[str, Any]:
    """Register two NIfTI files and write the results into the new folder ``out_dir``.

    Files (volumes in the fixed image's format, or ``output_format``: ``nii.gz``, ``nii``,
    ``nrrd``, ``mha``): ``warped.nii.gz``, ``ddf.nii.gz`` (:data:`DDF_CONVENTION`, the
    whole mapping, always NIfTI),
    ``affine.txt`` (the affine stage as an ITK transform, LPS; when it ran),
    ``jacobian.nii.gz``, ``warped_labels.nii.gz`` (with moving labels), ``overlay.png``,
    ``metrics.json`` (and ``head_masks.png`` with ``head_masks`` for RAN models).
    Everything is checked before anything is written, the folder is written as a temporary
    sibling and renamed into place, and a failure leaves nothing behind. ``out_dir`` must
    not exist or be empty. ``model`` is a model or a spec for :func:`resolve_model`;
    ``options`` and ``changes`` as for :func:`register_volumes`. Returns the metrics dict
    (as in ``metrics.json``).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    check_out_dir(out)
    opts = (options or RegistrationOptions()).with_(**changes)
    net = model if isinstance(model, torch.nn.Module) else resolve_model(model)
    resolve_device(device)
    fix = load_nifti(fixed)
    mov = load_nifti(moving)
    mov_lab = None if moving_labels is None else load_label_volume(moving_labels)
    fix_lab = None if fixed_labels is None else load_label_volume(fixed_labels)
    _check_inputs(net, mov, fix, mov_lab, fix_lab)
    model_settings(net.config)
    names = label_names if isinstance(label_names, dict) else load_label_names(label_names)
    labels = _labels_to_score(labels_to_score, label_names, fix_lab)

    result = register_volumes(
        net, mov, fix, mov_lab, fix_lab, device, options=opts, return_levels=head_masks
    )
    metrics = _metrics(result, net, opts, fix, mov, fix_lab, mov_lab, device)
    if mov_lab is not None and fix_lab is not None:
        metrics.update(_label_scores(result, fix_lab, labels, fix.spacing, names))
    tmp, created = atomic_output_dir(out)
    try:
        fmt = _output_format(fixed, output_format).lstrip(".")
        args = (tmp, result, metrics, net, opts, fix, mov, fix_lab, labels, head_masks)
        _write_outputs(*args, fmt=fmt)
        metrics["total_s"] = time.perf_counter() - t0
        write_json(tmp / "metrics.json", metrics)
        finish_output_dir(tmp, out)
    except BaseException:
        abandon_output_dir(tmp, created)
        raise
    return _jsonable(metrics)


def _metrics(
    result: RegistrationResult,
    net: torch.nn.Module,
    opts: RegistrationOptions,
    fix: Volume,
    mov: Volume,
    fix_lab: Volume | None,
    mov_lab: Volume | None,
    device: str | torch.device,
) -> dict[str, Any]:
    """What ran, how long each step took, and the field's regularity."""
    neural = is_neural(net)
    aff = opts.affine_settings(neural)
    rs = opts.refine_settings(neural)
    rep = result.refine_report
    return {
        "fixed": str(fix.path),
        "moving": str(mov.path),
        "fixed_labels": None if fix_lab is None else str(fix_lab.path),
        "moving_labels": None if mov_lab is None else str(mov_lab.path),
        "model": {
            "label": model_label(net),
            "source": getattr(net, "source", None),
            "config": dict(net.config),
        },
        "device": str(resolve_device(device)),
        "precision": resolve_precision(opts.precision, resolve_device(device)) if neural else "n/a",
        "runtime_s": result.runtime_s,
        "network_s": result.network_s,
        "affine": {
            "mode": aff.mode,
            "similarity": aff.similarity,
            "seconds": result.affine_s,
            "world_matrix_ras": None if result.world_map is None else result.world_map.tolist(),
        },
        "refine": {
            "steps": rs.steps,
            "weight": rs.weight,
            "diffeomorphic": rs.diffeomorphic,
            "seconds": result.refine_s,
            "levels_mm": None if rep is None else [lv[0] for lv in rep.levels],
            "network_start": None if rep is None else ("kept" if rep.start_kept else "rejected"),
            "local_ncc": None
            if rep is None
            else {"start": rep.ncc_affine, "end": rep.ncc_final, "level_mm": rep.levels[-1][0]},
        },
        **result.jacobian_stats(),
        "fixed_shape": list(fix.shape),
        "fixed_spacing_mm": list(fix.spacing),
        "fixed_grid": {"shape": list(fix.shape), "affine": np.asarray(fix.affine).tolist()},
        "moving_grid": {"shape": list(mov.shape), "affine": np.asarray(mov.affine).tolist()},
        "network_shape": list(result.network_shape),
        "network_spacing_mm": list(result.network_spacing),
        "ddf_convention": DDF_CONVENTION,
    }


def _labels_to_score(
    labels: Sequence[int] | None, names: object, fix_lab: Volume | None
) -> list[int]:
    """The labels given; by default the paper's 9 organs with the abdomen names, else every
    label of the fixed label map."""
    if labels:
        return [int(v) for v in labels]
    if names is None or names == DEFAULT_TABLE or fix_lab is None:
        return list(PAPER_ORGANS)
    return [int(v) for v in np.unique(fix_lab.array) if v != 0]


def _label_scores(
    result: RegistrationResult,
    fix_lab: Volume,
    labels: list[int],
    spacing: Sequence[float],
    names: dict[int, str],
) -> dict[str, Any]:
    assert result.moving_label_on_fixed is not None and result.warped_label is not None
    before = score_labels(result.moving_label_on_fixed, fix_lab.array, labels, spacing)
    after = score_labels(result.warped_label, fix_lab.array, labels, spacing)
    return {
        "labels": {
            str(lab): {"organ": label_name(names, lab), "before": before[lab], "after": after[lab]}
            for lab in labels
        },
        "mean_before": _mean_scores(before),
        "mean_after": _mean_scores(after),
    }


def _title(mov: Volume, fix: Volume, net: torch.nn.Module, result: RegistrationResult) -> str:
    steps = (
        [] if result.world_map is None or np.allclose(result.world_map, np.eye(4)) else ["affine"]
    )
    steps.append(model_label(net))
    if result.refine_report is not None:
        steps.append("optimisation")
    return f"{Path(str(mov.path)).name} -> {Path(str(fix.path)).name} ({' + '.join(steps)})"


def _write_outputs(
    tmp: Path,
    result: RegistrationResult,
    metrics: dict[str, Any],
    net: torch.nn.Module,
    opts: RegistrationOptions,
    fix: Volume,
    mov: Volume,
    fix_lab: Volume | None,
    labels: list[int],
    head_masks: bool,
    *,
    fmt: str = "nii.gz",
) -> None:
    """Every output file into ``tmp``; volumes in the format ``fmt`` (the field is always
    ``ddf.nii.gz``: NIfTI DISPVECT is what ITK-based tools read as a displacement field)."""
    aff = result.fixed_affine
    volumes = {"warped": result.warped, "jacobian": result.jacobian}
    if result.warped_label is not None:
        volumes["warped_labels"] = result.warped_label
    # the volumes are written on worker threads while the figures are drawn (gzip releases
    # the GIL): on 2 cores this hides most of the writing time
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(save_ddf, tmp / "ddf.nii.gz", result.ddf_mm, aff)]
        for stem, array in volumes.items():
            jobs.append(pool.submit(save_image, tmp / f"{stem}.{fmt}", array, aff))
        if result.world_map is not None and metrics["affine"]["mode"] != "none":
            write_itk_affine(tmp / "affine.txt", result.world_map)
        _draw_figures(tmp, result, metrics, net, fix, mov, fix_lab, labels, head_masks)
        for job in jobs:
            job.result()  # re-raises a failed write


def _draw_figures(
    tmp: Path,
    result: RegistrationResult,
    metrics: dict[str, Any],
    net: torch.nn.Module,
    fix: Volume,
    mov: Volume,
    fix_lab: Volume | None,
    labels: list[int],
    head_masks: bool,
) -> None:
    from ranreg import figures

    assert result.moving_on_fixed is not None and result.ddf_vox is not None
    figures.overlay_figure(
        fix.array,
        result.moving_on_fixed,
        result.warped,
        result.ddf_vox,
        None if fix_lab is None else fix_lab.array,
        result.warped_label,
        tmp / "overlay.png",
        spacing=fix.spacing,
        affine=fix.affine,
        labels=labels,
        title=_title(mov, fix, net, result),
    )
    if head_masks:
        if result.levels is not None and any(
            lv.head_masks is not None for lv in result.levels.levels
        ):
            assert result.network_fixed is not None
            figures.head_mask_figure(result.levels, result.network_fixed, tmp / "head_masks.png")
            metrics["head_masks"] = "head_masks.png"
        else:
            metrics["head_masks"] = "not available: the model has no multi-head masks"


# --------------------------------------------------------------------------------- CLI
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _run(args: Any) -> int:
    if args.pairs:
        return _run_pairs(args)
    if not args.fixed or not args.moving:
        raise RanregError("register: give --fixed and --moving, or --pairs CSV")
    metrics = register_files(
        args.fixed,
        args.moving,
        args.out,
        args.model,
        moving_labels=args.moving_labels,
        fixed_labels=args.fixed_labels,
        device=args.device,
        labels_to_score=args.labels,
        head_masks=args.head_masks,
        options=options_from_args(args),
        label_names=args.label_names,
        output_format=args.format,
    )
    print_report(metrics, Path(args.out), args.moving, args.fixed)
    return 0


def _run_pairs(args: Any) -> int:
    """``--pairs``: the model loaded once, one folder per pair, a summary (ranreg.batch)."""
    from ranreg.batch import read_pairs, run_batch

    if args.fixed or args.moving or args.moving_labels or args.fixed_labels:
        raise RanregError("register: --pairs takes the images from the CSV, not --fixed etc.")
    pairs = read_pairs(args.pairs)
    opts = options_from_args(args).with_(progress=False)
    net = resolve_model(args.model)
    resolve_device(args.device)
    names = load_label_names(args.label_names)

    def one(pair: Any, folder: Path) -> dict[str, Any]:
        return register_files(
            pair.fixed,
            pair.moving,
            folder,
            net,
            moving_labels=pair.moving_labels,
            fixed_labels=pair.fixed_labels,
            device=args.device,
            labels_to_score=args.labels,
            options=opts,
            label_names=names if args.label_names else None,
            output_format=args.format,
        )

    rows = run_batch(pairs, args.out, one, progress=sys.stderr.isatty())
    failed = [r for r in rows if r["status"] != "done"]
    print(f"{len(rows) - len(failed)} of {len(rows)} pairs registered; {args.out}/summary.csv")
    if failed:
        raise RanregError(
            f"{len(failed)} of {len(rows)} pairs failed (first: {failed[0]['name']}: "
            f"{failed[0]['error']}); see {args.out}/summary.csv"
        )
    return 0


def _steps_text(metrics: dict[str, Any]) -> str:
    parts = []
    aff = metrics.get("affine", {})
    if aff.get("mode", "none") != "none":
        parts.append(f"{aff['mode']} {aff['seconds']:.2f} s")
    parts.append(f"network {metrics['network_s']:.2f} s")
    ref = metrics["refine"]
    if ref["steps"]:
        ncc = ref["local_ncc"] or {}
        parts.append(
            f"optimisation {ref['steps']} steps x {len(ref['levels_mm'] or [])} levels "
            f"{ref['seconds']:.2f} s, network start {ref['network_start']}, local NCC "
            f"{_fmt(ncc.get('start'))} -> {_fmt(ncc.get('end'))}"
        )
    return ", ".join(parts)


def print_report(metrics: dict[str, Any], out: Path, moving: Any, fixed: Any) -> None:
    """Print what :func:`register_files` did: runtime, files, folding, Dice before/after."""
    files = sorted(p.name for p in out.iterdir())
    print(
        f"registered {moving} to {fixed} with {metrics['model']['label']} in "
        f"{metrics['runtime_s']:.2f} s ({_steps_text(metrics)})"
    )
    print(f"outputs in {out}/: {', '.join(files)}")
    print(
        f"folding {_fmt(metrics['folding_percent'], '.3f')} %, "
        f"SD log|J| {_fmt(metrics['sd_log_jacobian'], '.4f')}"
    )
    if "labels" in metrics:
        mb, ma = metrics["mean_before"]["dice"], metrics["mean_after"]["dice"]
        print(f"Dice before -> after (mean over labels present): {_fmt(mb)} -> {_fmt(ma)}")
        for lab, s in metrics["labels"].items():
            b, a = s["before"]["dice"], s["after"]["dice"]
            if b is None and a is None:
                continue
            print(f"  {lab:>3} {s['organ']:<24} {_fmt(b)} -> {_fmt(a)}")
    sys.stdout.flush()


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "register",
        help="register a moving NIfTI image to a fixed one",
        description="Register MOVING to FIXED: affine pre-alignment in world space, the "
        "network, then instance optimisation (--fast: without it). Writes the warped image, "
        "the DDF of the whole mapping (mm, world axes), affine.txt (ITK), the Jacobian, an "
        "overlay figure and metrics into a new folder. " + DDF_CONVENTION,
    )
    p.add_argument("--fixed", help="fixed image (NIfTI, NRRD, MHA/MHD or a DICOM folder)")
    p.add_argument("--moving", help="moving image (same formats)")
    p.add_argument(
        "--pairs",
        metavar="CSV",
        help="register a cohort instead: a CSV with columns fixed, moving [, moving_labels, "
        "fixed_labels, name]; one folder per pair in --out and a summary.csv; finished "
        "pairs are skipped when run again",
    )
    p.add_argument(
        "--label-names",
        metavar="NAME|FILE",
        help="names of label values in reports: abdomen (default), totalseg, totalseg-mr, "
        "or a JSON/CSV file of id,name; with a table other than abdomen, every label of the "
        "fixed map is scored unless --labels says otherwise",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model file or folder, 'identity', or a packaged model name (default: the "
        "packaged default)",
    )
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument(
        "--format",
        choices=OUTPUT_FORMATS,
        default=None,
        help="format of the output volumes (default: the fixed image's; NIfTI for DICOM); "
        "the field is always ddf.nii.gz",
    )
    p.add_argument("--moving-labels", help="moving label map (warped with nearest neighbour)")
    p.add_argument("--fixed-labels", help="fixed label map (Dice/ASD/HD95 before and after)")
    p.add_argument(
        "--labels",
        type=int,
        nargs="+",
        metavar="L",
        help="label values to score (default the paper's 9 organs)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    add_registration_options(p)
    p.add_argument(
        "--head-masks", action="store_true", help="also draw the RA head masks (RAN models)"
    )
    p.set_defaults(func=_run)
