"""Evaluating models on the pairs of a data set: ``ranreg evaluate``.

For each ordered pair (moving, fixed) of distinct subjects, or each pair of a list
(:mod:`ranreg.data.pair_lists`: a CSV file, or a Learn2Reg ``*_dataset.json`` key such as
``registration_val``), and each model (plus ``identity``, the no-registration reference),
the pair is registered in world space with :func:`ranreg.pipeline.register_volumes` and
scored on the fixed image's original grid:
Dice, ASD and HD95 (mm, :mod:`ranreg.metrics`) per organ, folding % and SD of log det J of
the world map, and the runtime. Outputs (written into a temporary sibling folder and
renamed into place):

* ``results.csv``: one row per model, pair and organ;
* ``summary.md`` (and ``summary.json``): mean ± sd over pairs per organ and model, the
  mean over organs, regularity and runtime, and paired Wilcoxon signed-rank tests of the
  per-pair mean Dice between the first model and each other one;
* ``boxplots/NN_<organ>.png`` per organ and ``boxplots.png`` with all organs;
* ``landmarks.png``, when the subjects have landmarks: the mean landmark error per pair.

A data set without label maps (Learn2Reg's keypoint tasks, such as NLST) is scored by its
landmarks alone: one row per pair, and the Wilcoxon tests compare the landmark error.

The statistics and the summaries are computed and rendered by :mod:`ranreg.evaluate_report`.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ranreg.atomic import check_out_dir, new_output_dir
from ranreg.data.datasets import Subject, discover_subjects, load_subject, ordered_pairs
from ranreg.data.io import Volume, spacing_from_affine
from ranreg.data.pair_lists import csv_pairs, default_pairs, is_pairs_file, learn2reg_pairs
from ranreg.errors import RanregError
from ranreg.evaluate_report import ModelRun, has_landmarks, pair_rows, summarise
from ranreg.grids import read_grid
from ranreg.labelnames import label_name, load_label_names
from ranreg.metrics import PAPER_ORGANS
from ranreg.models import IDENTITY, IdentityModel, model_label, resolve_model
from ranreg.options import PRECISIONS, RegistrationOptions
from ranreg.outputs import score_labels, write_json
from ranreg.pipeline import RegistrationResult, check_contrast, register_volumes
from ranreg.points import landmark_errors, read_points
from ranreg.refine import DEFAULT_STEPS
from ranreg.runtime import is_neural, resolve_device
from ranreg.transform import Grid, Transform

__all__ = ["FIELDS", "evaluate", "model_runs"]

FIELDS = (
    "model",
    "source",
    "moving",
    "fixed",
    "label",
    "organ",
    "dice",
    "asd_mm",
    "hd95_mm",
    "folding_percent",
    "sd_log_jacobian",
    "runtime_s",
    "network_s",
    "landmark_error_mm",
)


def _default_split(root: Path, split: str | None) -> str | None:
    """``None`` picks ``test`` unless the root directly holds ``images/`` (no splits)."""
    if split is not None:
        return split
    return None if (root / "images").is_dir() else "test"


def _subject_pairs(
    data: Path, split: str | None, pairs: str | None
) -> tuple[list[Subject], list[tuple[Subject, Subject]], str | None]:
    """The subjects, the (moving, fixed) pairs and the split they come from: every ordered
    pair of the split, the pairs of a CSV file among the split's subjects, or a Learn2Reg
    key's pairs (:mod:`ranreg.data.pair_lists`; no split)."""
    if pairs is not None and not is_pairs_file(pairs):
        if split is not None:
            raise RanregError(f"pairs {pairs!r} name their own images: leave out the split")
        chosen = learn2reg_pairs(data, pairs)
    else:
        split = _default_split(data, split)
        subjects = discover_subjects(data, split)
        if pairs is None and len(subjects) < 2:
            raise RanregError(
                f"{data}: need at least 2 subjects to form pairs, found {len(subjects)}"
            )
        chosen = ordered_pairs(subjects) if pairs is None else csv_pairs(pairs, subjects)
    used: dict[str, Subject] = {}
    for s in (s for pair in chosen for s in pair):
        if used.setdefault(s.name, s) != s:
            raise RanregError(f"{s.image} and {used[s.name].image}: two images named {s.name!r}")
    _check_scores(list(used.values()))
    return list(used.values()), chosen, split


def _check_scores(subjects: Sequence[Subject]) -> None:
    """Every subject has a label map, or none has and every one has landmarks (Learn2Reg's
    keypoint tasks): something to score each pair with."""
    unlabelled = [s for s in subjects if s.label is None]
    if unlabelled and len(unlabelled) < len(subjects):
        raise RanregError(
            f"{unlabelled[0].image}: no label map, while other subjects have one (evaluation "
            "needs label maps for all subjects or for none)"
        )
    for s in unlabelled:
        if s.landmarks is None:
            raise RanregError(
                f"{s.image}: no label map and no landmarks (evaluation needs one of them)"
            )


def _load(subject: Subject) -> tuple[Volume, Volume | None]:
    image, label, affine = load_subject(subject)  # checks shapes, names both files
    spacing = spacing_from_affine(affine)
    volume = Volume(image, affine, spacing, subject.image)
    check_contrast(volume)  # here, before the long loop, not at the pair that uses it
    return volume, None if label is None else Volume(label, affine, spacing, subject.label)


def split_precision(spec: str | None, default: str) -> tuple[str | None, str]:
    """``"MODEL@bf16"`` -> ``("MODEL", "bf16")``; without a suffix the ``default`` precision."""
    if spec is not None:
        for p in PRECISIONS:
            if spec.endswith("@" + p):
                return spec[: -len(p) - 1], p
    return spec, default


def split_label(spec: str | None) -> tuple[str | None, str | None]:
    """``"LABEL=MODEL"`` -> ``("LABEL", "MODEL")``: a name for the tables; else no label."""
    if spec is None or "=" not in spec:
        return None, spec
    label, _, rest = spec.partition("=")
    if not label or os.sep in label or not rest:
        return None, spec
    return label, rest


#: ``+SUFFIX`` of a model spec -> the pipeline settings it changes
SUFFIXES: dict[str, dict[str, Any]] = {
    "fast": {"fast": True},
    "noaffine": {"affine": "none"},
    "rigid": {"affine": "rigid"},
    "affine": {"affine": "affine"},
    "diffeo": {"diffeomorphic": True},
}


def split_pipeline(spec: str | None) -> tuple[str | None, dict[str, Any]]:
    """``"MODEL+fast"`` -> ``("MODEL", {"fast": True})``; ``+refineN`` sets N optimisation
    steps per level (``+refine``: the default number), ``+rigid``/``+noaffine``/``+affine``
    the affine stage, ``+diffeo`` the diffeomorphic mode (see :data:`SUFFIXES`)."""
    if spec is None or "+" not in spec:
        return spec, {}
    head, *tokens = spec.split("+")
    changes: dict[str, Any] = {}
    for tok in tokens:
        count = tok.removeprefix("refine")
        if tok in SUFFIXES:
            changes.update(SUFFIXES[tok])
        elif tok.startswith("refine") and (count == "" or count.isdigit()):
            changes["refine"] = int(count) if count else DEFAULT_STEPS
        else:
            known = ", ".join(f"+{k}" for k in [*SUFFIXES, "refine[N]"])
            raise RanregError(f"model {spec!r}: unknown suffix +{tok} (known: {known})")
    if not head:
        raise RanregError(f"model {spec!r}: a suffix needs a model before it")
    return head, changes


def model_runs(
    specs: Sequence[str] | None, base: RegistrationOptions | None = None
) -> list[ModelRun]:
    """One :class:`ModelRun` per spec, identity added. A spec is
    ``[LABEL=]MODEL[@P][+SUFFIX...]``: ``LABEL`` names the model in the tables; a
    ``@bf16``/``@fp32`` suffix sets one model's precision (and marks its label), so that
    both precisions can share one table; ``+fast``, ``+refineN``, ... change the pipeline
    (:func:`split_pipeline`). Without a spec: the packaged default with the default
    pipeline (affine + network + instance optimisation)."""
    base = base or RegistrationOptions()
    runs = []
    for spec in list(specs) if specs else [None]:
        label, rest = split_label(spec)
        rest, changes = split_pipeline(rest)
        model_spec, prec = split_precision(rest, base.precision)
        net = resolve_model(model_spec)
        name = label or model_label(net)
        if model_spec != rest and is_neural(net):
            name += f"@{prec}"
        if changes:
            name += spec[spec.index("+") :] if spec and "+" in spec else ""
        runs.append(ModelRun(name, net, base.with_(precision=prec, **changes)))
    # an identity row with the base pipeline is the reference (precision means nothing there)
    plain = [r.options.with_(precision=base.precision) == base for r in runs]
    if not any(isinstance(r.net, IdentityModel) and p for r, p in zip(runs, plain, strict=True)):
        runs.append(ModelRun(IDENTITY, resolve_model(IDENTITY), base))
    named: list[ModelRun] = []
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run = run._replace(name=f"{run.name} #{seen[run.name]}")
        named.append(run)
    return named


def _load_all(subjects: Sequence[Subject]) -> dict[str, tuple[Volume, Volume | None]]:
    """Image and label volumes by subject name: each read once, and all of them before the
    long loop so that a bad file stops the run at once."""
    volumes: dict[str, tuple[Volume, Volume | None]] = {}
    for s in subjects:
        if s.name not in volumes:
            volumes[s.name] = _load(s)
    return volumes


def _voxel_grid(subject: Subject, coordinates: str | None) -> Grid | None:
    """The grid of a subject's image, through which voxel-index landmarks are read."""
    return read_grid(subject.image) if coordinates == "voxel" else None


def _load_landmarks(
    subjects: Sequence[Subject],
    pairs: Sequence[tuple[Subject, Subject]],
    coordinates: str | None,
) -> dict[str, np.ndarray]:
    """The landmarks (RAS, ``(N, 3)``) of the subjects that have them, all read before the
    long loop; the two subjects of a pair must list the same number of points (they are
    paired in order; Learn2Reg's keypoints differ in number from patient to patient). A
    CSV's axes are the data set's (:attr:`Subject.coordinates`), else ``coordinates``."""
    marks = {}
    for s in subjects:
        if s.landmarks:
            axes = s.coordinates or coordinates
            marks[s.name] = read_points(s.landmarks, axes, _voxel_grid(s, axes)).ras
    for moving, fixed in pairs:
        counts = [len(marks[s.name]) for s in (moving, fixed) if s.name in marks]
        if len(counts) == 2 and counts[0] != counts[1]:
            raise RanregError(
                f"landmarks: {moving.landmarks} and {fixed.landmarks} list different numbers "
                f"of points ({counts[0]} and {counts[1]}); the points of a pair are matched "
                "in order, so both files must list the same landmarks"
            )
    return marks


def _landmark_error(
    result: RegistrationResult, fix: Volume, fixed: np.ndarray | None, moving: np.ndarray | None
) -> float:
    """Mean distance (mm) between the fixed landmarks mapped by ``result`` and the moving
    ones (NaN when a subject of the pair has none)."""
    if fixed is None or moving is None:
        return math.nan
    errors = landmark_errors(Transform(result.ddf_mm, Grid.of(fix)), fixed, moving)
    return errors["after_mm"]["mean"]


#: the per-organ scores of a row (NaN on the one row of a pair without label maps)
_LABEL_SCORES = ("dice", "asd_mm", "hd95_mm")


def _score_pair(
    run: ModelRun,
    moving: Subject,
    fixed: Subject,
    volumes: dict[str, tuple[Volume, Volume | None]],
    organs: Sequence[int],
    table: dict[int, str],
    dev: torch.device,
    landmarks: dict[str, np.ndarray],
) -> list[dict[str, Any]]:
    """Register one pair with one model: a row of ``results.csv`` per organ (one row with
    no organ when the data set has no label maps)."""
    name, net, opts = run
    mov, mov_lab = volumes[moving.name]
    fix, fix_lab = volumes[fixed.name]
    result = register_volumes(net, mov, fix, mov_lab, fix_lab, dev, options=opts)
    marks = landmarks.get(fixed.name), landmarks.get(moving.name)
    scores: dict[Any, dict[str, float]] = {"": dict.fromkeys(_LABEL_SCORES, math.nan)}
    if organs:
        assert result.warped_label is not None and fix_lab is not None
        scores = score_labels(result.warped_label, fix_lab.array, organs, fix.spacing)
    common = {
        "model": name,
        "source": str(getattr(net, "source", "")),
        "moving": moving.name,
        "fixed": fixed.name,
        **result.jacobian_stats(),
        "runtime_s": result.runtime_s,
        "network_s": result.network_s,
        "landmark_error_mm": _landmark_error(result, fix, *marks),
    }
    return [
        {**common, "label": lab, "organ": label_name(table, lab) if organs else "", **scores[lab]}
        for lab in (organs or [""])
    ]


def _run_all(
    named: list[ModelRun],
    pairs: list[tuple[Subject, Subject]],
    volumes: dict[str, tuple[Volume, Volume | None]],
    organs: Sequence[int],
    table: dict[int, str],
    dev: torch.device,
    progress: bool,
    landmarks: dict[str, np.ndarray],
) -> list[dict[str, Any]]:
    """The rows of every model on every pair, pair by pair (the order of ``results.csv``)."""
    rows: list[dict[str, Any]] = []
    bar = tqdm(
        total=len(pairs) * len(named),
        desc="evaluate",
        unit="reg",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    for mov_s, fix_s in pairs:
        for run in named:
            bar.set_postfix_str(f"{run.name}: {mov_s.name} -> {fix_s.name}")
            rows += _score_pair(run, mov_s, fix_s, volumes, organs, table, dev, landmarks)
            bar.update(1)
    bar.close()
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``results.csv``: floats with 6 significant digits."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(FIELDS))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _write_outputs(
    out: Path,
    rows: list[dict[str, Any]],
    names: Sequence[str],
    text: str,
    summary: dict[str, Any],
) -> None:
    """Write every output into a temporary sibling of ``out`` and rename it into place (or
    remove it on any error, so that ``out`` is never left half written)."""
    from ranreg import figures  # already loaded by evaluate: no cost here

    info = summary["info"]
    with new_output_dir(out) as tmp:
        _write_csv(tmp / "results.csv", rows)
        (tmp / "summary.md").write_text(text, encoding="utf-8")
        write_json(tmp / "summary.json", summary)
        if info["labels"]:
            figures.boxplot_figure(
                rows,
                info["labels"],
                list(names),
                tmp / "boxplots",
                tmp / "boxplots.png",
                names={int(k): v for k, v in info["label_names"].items()},
            )
        if has_landmarks(rows):
            per_pair = [r for name in names for r in pair_rows(rows, name)]
            figures.landmark_boxplot(per_pair, names, tmp / "landmarks.png")


def evaluate(
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    models: Sequence[str] | None = None,
    split: str | None = None,
    labels: Sequence[int] | None = None,
    device: str = "cpu",
    progress: bool = True,
    *,
    options: RegistrationOptions | None = None,
    label_names: str | os.PathLike[str] | None = None,
    landmark_coordinates: str | None = None,
    pairs: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Evaluate ``models`` (default: the packaged default) and ``identity`` on every ordered
    pair of the subjects of ``data`` (``split`` default: ``test``, or none for a folder that
    directly holds ``images/``), or on the ``pairs`` of a CSV file among them or of a
    Learn2Reg key such as ``"registration_val"`` (:mod:`ranreg.data.pair_lists`; a data set
    without label maps is then scored by its landmarks alone). A Learn2Reg folder with
    neither ``split`` nor ``pairs`` is evaluated on its ``registration_val`` list
    (:func:`ranreg.data.pair_lists.default_pairs`). The outputs go into the new folder
    ``out_dir`` (see the module docstring). ``options`` is the pipeline every
    model runs with (a ``MODEL@bf16`` or ``MODEL+fast`` spec changes it for one model).
    ``label_names``: the table naming the labels (:func:`ranreg.labelnames.load_label_names`;
    default the abdomen organs). Subjects with landmarks (``landmarks/``,
    :mod:`ranreg.data.datasets`; a CSV's axes are ``landmark_coordinates``, Learn2Reg
    keypoints are voxel indices) add each pair's mean landmark error. Returns the summary dict
    (as ``summary.json``)."""
    table = load_label_names(label_names)
    # matplotlib loads only for evaluate, but before the long loop: a broken install fails early
    from ranreg import figures  # noqa: F401

    out = Path(out_dir)
    check_out_dir(out)
    root = Path(data)
    dev = resolve_device(device)
    named = model_runs(models, options)
    spec = None if pairs is None else str(pairs)
    if spec is None and split is None:
        spec = default_pairs(root)  # a Learn2Reg folder: the challenge's validation pairs
    subjects, chosen, split = _subject_pairs(root, split, spec)
    organs = [int(v) for v in (labels if labels else PAPER_ORGANS)]
    if subjects[0].label is None:
        organs = []  # a Learn2Reg keypoint task: scored by its landmarks
    volumes = _load_all(subjects)
    landmarks = _load_landmarks(subjects, chosen, landmark_coordinates)
    rows = _run_all(named, chosen, volumes, organs, table, dev, progress, landmarks)
    info = {
        "data": str(root),
        "split": split,
        "pairs_from": spec,
        "subjects": len(subjects),
        "subject_names": [s.name for s in subjects],
        "pairs": len(chosen),
        "labels": organs,
        "label_names": {str(lab): label_name(table, lab) for lab in organs},
        "device": str(dev),
    }
    text, summary = summarise(rows, named, organs, info)
    _write_outputs(out, rows, [r.name for r in named], text, summary)
    return summary
