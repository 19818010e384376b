"""What a registration writes: the files of a result folder, written atomically, and the
metrics that describe it (``metrics.json``).

Used by ``ranreg register`` (:func:`ranreg.infer.register_files`), cohorts, ``evaluate``,
``demo`` and the Python API (:meth:`ranreg.api.Registration.save`), so every entry point
writes the same files the same way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import torch

from ranreg import __version__
from ranreg.affine import write_itk_affine
from ranreg.data.io import Volume, save_image
from ranreg.labelnames import DEFAULT_TABLE, label_name
from ranreg.metrics import PAPER_ORGANS, evaluate_pair
from ranreg.models import model_label
from ranreg.options import RegistrationOptions
from ranreg.pipeline import RegistrationResult
from ranreg.runtime import is_neural, resolve_device, resolve_precision

if TYPE_CHECKING:
    from ranreg.transform import Transform

__all__ = [
    "OUTPUT_FILES",
    "INVERSE_FILE",
    "write_inverse",
    "DDF_CONVENTION",
    "score_labels",
    "save_ddf",
    "write_json",
    "jsonable",
    "result_metrics",
    "choose_labels",
    "label_scores",
    "write_outputs",
]

OUTPUT_FILES = (
    "warped.nii.gz",
    "ddf.nii.gz",
    "jacobian.nii.gz",
    "warped_labels.nii.gz",
    "affine.txt",
    "overlay.png",
    "head_masks.png",
    "inverse_ddf.nii.gz",
    "metrics.json",
)
#: the inverse mapping's field, on the moving grid (with ``--save-inverse``)
INVERSE_FILE = "inverse_ddf.nii.gz"
DDF_CONVENTION = (
    "ddf.nii.gz holds u(p) in mm along the world (RAS+) axes on the fixed grid, shape "
    "(X, Y, Z, 1, 3), NIfTI intent DISPVECT (1006, which ITK, ANTs, SimpleITK and 3D Slicer "
    "convert to their LPS frame on reading): the fixed voxel x at world point p = A_fixed x "
    "corresponds to the moving point p + u(p), i.e. to the moving voxel "
    "A_moving^-1 (p + u(p)); warped(x) = moving(A_moving^-1 (A_fixed x + u(A_fixed x)))."
)


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


def write_inverse(folder: Path, forward: Transform) -> dict[str, Any]:
    """Write :data:`INVERSE_FILE`, the inverse of the registration's mapping ``forward`` (a
    :class:`ranreg.transform.Transform` that knows the moving grid) as a field on the moving
    grid (moving points to fixed points, as ANTs' ``InverseWarp``; same convention as
    ``ddf.nii.gz``), and return what ``metrics.json`` says of it: round-trip error and how
    the inversion went (:meth:`ranreg.transform.Transform.inverse`)."""
    inverse = forward.inverse()
    save_ddf(folder / INVERSE_FILE, inverse.ddf_mm, inverse.grid.affine)
    return {
        "file": INVERSE_FILE,
        "round_trip_mm": inverse.round_trip_mm,
        "inversion": inverse.inversion,
    }


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


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return _finite_or_none(x)
    if isinstance(x, Path):
        return str(x)
    return x


def result_metrics(
    result: RegistrationResult,
    net: torch.nn.Module,
    opts: RegistrationOptions,
    fix: Volume,
    mov: Volume,
    fix_lab: Volume | None,
    mov_lab: Volume | None,
    device: str | torch.device,
    labels: list[int],
    names: dict[int, str],
) -> dict[str, Any]:
    """What ran, how long each step took, the field's regularity, the names of ``labels``
    and, with both label maps, their scores before and after."""
    metrics = _run_metrics(result, net, opts, fix, mov, fix_lab, mov_lab, device)
    metrics["label_names"] = {str(lab): label_name(names, lab) for lab in labels}
    if mov_lab is not None and fix_lab is not None:
        metrics.update(label_scores(result, fix_lab, labels, fix.spacing, names))
    return metrics


def _initial(opts: RegistrationOptions, result: RegistrationResult) -> dict[str, Any] | None:
    """Where the affine stage started: the file (or matrix) given, as a world matrix."""
    if result.initial_map is None:
        return None
    source = opts.initial_affine if isinstance(opts.initial_affine, str) else "matrix"
    return {"source": source, "world_matrix_ras": result.initial_map.tolist()}


def _run_metrics(
    result: RegistrationResult,
    net: torch.nn.Module,
    opts: RegistrationOptions,
    fix: Volume,
    mov: Volume,
    fix_lab: Volume | None,
    mov_lab: Volume | None,
    device: str | torch.device,
) -> dict[str, Any]:
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
        "software": {"ranreg": __version__, "torch": torch.__version__},
        "precision": resolve_precision(opts.precision, resolve_device(device)) if neural else "n/a",
        "runtime_s": result.runtime_s,
        "network_s": result.network_s,
        "affine": {
            "mode": aff.mode,
            "similarity": aff.similarity,
            "seconds": result.affine_s,
            "world_matrix_ras": None if result.world_map is None else result.world_map.tolist(),
            "initial": _initial(opts, result),
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


def choose_labels(labels: Sequence[int] | None, names: object, fix_lab: Volume | None) -> list[int]:
    """The labels given; by default the paper's 9 organs with the abdomen names, else every
    label of the fixed label map."""
    if labels:
        return [int(v) for v in labels]
    if names is None or names == DEFAULT_TABLE or fix_lab is None:
        return list(PAPER_ORGANS)
    return [int(v) for v in np.unique(fix_lab.array) if v != 0]


def label_scores(
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


def write_outputs(
    tmp: Path,
    result: RegistrationResult,
    metrics: dict[str, Any],
    net: torch.nn.Module,
    fix: Volume,
    mov: Volume,
    *,
    fix_lab: Volume | None = None,
    labels: Sequence[int] = (),
    head_masks: bool = False,
    fmt: str = "nii.gz",
) -> None:
    """Every output file into ``tmp``; volumes in the format ``fmt`` (the field is always
    ``ddf.nii.gz``: NIfTI DISPVECT is what ITK-based tools read as a displacement field).
    The overlay scores ``labels`` of ``fix_lab``; ``head_masks`` adds the RA heads' masks."""
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
        aff_ran = metrics["affine"]["mode"] != "none" or metrics["affine"].get("initial")
        if result.world_map is not None and aff_ran:
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
    labels: Sequence[int],
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
        labels=list(labels),
        title=_title(mov, fix, net, result),
        names={int(k): v for k, v in metrics["label_names"].items()},
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
