"""Two-stage training of registration networks, resumable and data-parallel.

Stage ``synthetic`` (supplement section 3): the moving image is a real image, the fixed
image is it warped by a random synthetic DDF (rotation U(-pi/4, pi/4) about a random
axis + translation + TPS/gaussian deformation from 20 points, :func:`ranreg.synth.random_ddf`);
loss = w_ddf * MSE(ddf, ddf_true) + w_smooth * |grad ddf|^2 + w_image * MSE(warped, fixed).

Stage ``unsupervised``: ordered pairs of distinct training subjects; loss =
w_similarity * (-local NCC, or MSE) + w_smooth * edge-aware smoothness (+ w_dice * Dice
loss on warped one-hot labels when labels are given).

Every sample of step t comes from ``default_rng([seed, stage, t, rank, slot])``, so a run
resumed from a checkpoint sees exactly the batches the uninterrupted run would have seen;
with the optimizer state restored the weights agree to float tolerance. Under ``torchrun``
each rank draws its own samples and DistributedDataParallel averages the gradients
(NCCL on GPUs, gloo on CPU); rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ranreg import losses
from ranreg.checkpoint import load_checkpoint, recover_checkpoint, save_checkpoint, save_model
from ranreg.config import StageConfig, TrainConfig
from ranreg.data.datasets import crop_offsets, discover_splits, discover_subjects, load_subject
from ranreg.data.pairs import PairRecipe, augment_batch, make_pair, swapped
from ranreg.data.preprocess import preprocess_subject, select_labels
from ranreg.data.shapes import shapes_subjects
from ranreg.data.synth_images import synthesize_dataset
from ranreg.errors import RanregError
from ranreg.nn import build_model
from ranreg.nn.blocks import channels_last_format
from ranreg.runtime import fast_bf16
from ranreg.spatial import compose_ddf, one_hot, warp, warp_labels
from ranreg.synth import random_ddf
from ranreg.training_state import export_state, machine, restore_state
from ranreg.validation import (
    known_field_cases,
    validate,
    validate_known_fields,
    validation_pairs,
)

CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
#: the model with the highest validation Dice so far (the start counts), for model selection
BEST_DIR = "model-best"
TRAIN_LOG = "train_log.csv"
VAL_LOG = "val_log.csv"


@dataclass
class SubjectData:
    """A preprocessed subject: image in [0, 1] and optional label map, both (*S)."""

    name: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...] | None = None  # voxel size (mm) after preprocessing
    tissues: np.ndarray | None = None  # every label (organs and the rest), for painting


# ----------------------------------------------------------------------------- data
def load_subjects(cfg: TrainConfig, out_dir: Path) -> tuple[list[SubjectData], list[SubjectData]]:
    """Training and validation subjects of ``cfg.data``, preprocessed, in memory."""
    data = cfg.data
    if data.shapes is not None:
        count = int(data.shapes.get("count", 8))
        subjects = [
            SubjectData(n, i, lab.astype(np.int64))
            for n, i, lab in shapes_subjects(data.shapes["size"], count, seed=cfg.seed)
        ]
        return _split(cfg, subjects, None)

    root = Path(data.root) if data.root else _synthesised_root(cfg, out_dir)
    if not root.is_dir():
        raise RanregError(f"{root}: data folder not found")
    splits = discover_splits(root) if any((root / s).is_dir() for s in ("train", "val")) else {}
    if splits.get("train"):
        train_s, val_s = splits["train"], splits.get("val", [])
        if data.subjects:
            train_s = train_s[: data.subjects]
        return [_preprocess(cfg, s) for s in train_s], [_preprocess(cfg, s) for s in val_s]
    found = discover_subjects(root)
    if data.subjects:
        found = found[: data.subjects]
    return _split(cfg, [_preprocess(cfg, s) for s in found], root)


def _split(
    cfg: TrainConfig, subjects: list[SubjectData], root: Path | None
) -> tuple[list[SubjectData], list[SubjectData]]:
    n_train = cfg.data.train if cfg.data.train is not None else len(subjects) - cfg.data.val
    if n_train < 2 or n_train + cfg.data.val > len(subjects):
        where = root or "data.shapes"
        raise RanregError(
            f"{where}: {len(subjects)} subjects cannot give {n_train} training (>= 2) and "
            f"{cfg.data.val} validation subjects"
        )
    return subjects[:n_train], subjects[n_train : n_train + cfg.data.val]


def _preprocess(cfg: TrainConfig, subject: Any) -> SubjectData:
    image, label, affine = load_subject(subject)
    window = None if cfg.data.window is None else tuple(cfg.data.window)
    shape_in = image.shape
    try:
        image, every = preprocess_subject(
            image, label, factor=cfg.data.factor, window=window, keep=None
        )
    except RanregError as exc:
        raise RanregError(f"{subject.image}: {exc}") from None
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0) * np.divide(shape_in, image.shape)
    organs = None if every is None else select_labels(every, cfg.data.organs).astype(np.int64)
    return SubjectData(
        subject.name,
        image,
        organs,
        tuple(round(float(v), 4) for v in spacing),
        None if every is None else every.astype(np.int64),
    )


def _synthesised_root(cfg: TrainConfig, out_dir: Path) -> Path:
    """Images painted from ``data.labels`` (cached; built once, atomically)."""
    labels = Path(cfg.data.labels)
    if not labels.is_dir():
        raise RanregError(f"{labels}: labels folder not found")
    cache = Path(cfg.data.cache) if cfg.data.cache else out_dir / "synth-data"
    if (cache / "images").is_dir():
        return cache
    files = sorted(p for p in labels.glob("*.nii.gz") if not p.name.startswith("."))
    if cfg.data.subjects:
        files = files[: cfg.data.subjects]
    if not files:
        raise RanregError(f"{labels}: no *.nii.gz label maps found")
    with tempfile.TemporaryDirectory(
        prefix=".labels-", dir=cache.parent if cache.parent.exists() else None
    ) as tmp:
        for f in files:  # only the subjects the run uses
            os.symlink(f.resolve(), Path(tmp) / f.name)
        synthesize_dataset(tmp, cache, seed=cfg.data.synth_seed, progress=_is_main())
    return cache


class StepSamples(Dataset):
    """Item ``step * batch + slot`` of a stage: a deterministic function of its index."""

    def __init__(
        self, cfg: TrainConfig, stage_index: int, subjects: list[SubjectData], rank: int
    ) -> None:
        self.cfg, self.stage_index, self.rank = cfg, stage_index, rank
        self.stage = cfg.stages[stage_index]
        self.subjects = subjects
        options = {k: v for k, v in self.stage.pairs.items()}
        self.recipe = PairRecipe(deformation=dict(self.stage.deformation), **options)
        self._cache: tuple[tuple[int, int], dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return self.stage.steps * self.stage.batch_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        step, slot = divmod(index, self.stage.batch_size)
        if self.stage.kind == "synthetic" and _uses_pairs(self.stage):
            return _tensors(self._known_field_pair(step, slot))
        rng = np.random.default_rng([self.cfg.seed, self.stage_index, step, self.rank, slot])
        n = len(self.subjects)
        if self.stage.kind == "synthetic":
            picks = [self.subjects[int(rng.integers(n))]]
        else:
            i = int(rng.integers(n))
            j = int(rng.integers(n - 1))
            picks = [self.subjects[i], self.subjects[j + (j >= i)]]
        slices = self._crop(picks[0].image.shape, rng)
        out: dict[str, torch.Tensor] = {}
        names = ("moving", "fixed")
        for name, s in zip(names, picks, strict=False):
            out[name] = torch.from_numpy(np.ascontiguousarray(s.image[slices]))[None]
            if s.label is not None:
                out[name + "_label"] = torch.from_numpy(np.ascontiguousarray(s.label[slices]))[None]
        if self.stage.kind == "synthetic":
            ddf, _ = random_ddf(out["moving"].shape[1:], rng, **self.stage.deformation)
            out["ddf_true"] = torch.from_numpy(ddf)
        return out

    def _crop(self, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[slice, ...]:
        if self.cfg.data.crop is None:
            return tuple(slice(None) for _ in shape)
        return crop_offsets(shape, self.cfg.data.crop, rng)[0]

    def _known_field_pair(self, step: int, slot: int) -> dict[str, np.ndarray]:
        """A pair of one subject under a known field (:mod:`ranreg.data.pairs`); with
        ``swap`` odd slots hold the previous slot's pair turned round. Augmentation draws
        once per step, so every slot of a batch has the same shape."""
        base = slot - slot % 2 if self.stage.swap else slot
        key = (step, base)
        if self._cache is None or self._cache[0] != key:
            rng = np.random.default_rng([self.cfg.seed, self.stage_index, step, self.rank, base])
            s = self.subjects[int(rng.integers(len(self.subjects)))]
            sl = self._crop(s.image.shape, rng)
            tissue = None if s.tissues is None else np.ascontiguousarray(s.tissues[sl])
            pair = make_pair(
                np.ascontiguousarray(s.image[sl]),
                tissue,
                s.spacing or (1.0,) * 3,
                rng,
                self.recipe,
            )
            if s.label is not None and tissue is not None:  # Dice and losses see the organs
                pair["moving_label"] = np.ascontiguousarray(s.label[sl])
                pair["fixed_label"] = _warped_labels(pair["moving_label"], pair["ddf_true"])
            self._cache = (key, pair)
        pair = self._cache[1]
        if self.stage.swap and slot % 2:
            pair = swapped(pair)
        pair.setdefault("ddf_weight", np.ones(pair["moving"].shape, dtype=np.float32))
        if self.stage.augment:
            rng = np.random.default_rng([self.cfg.seed, self.stage_index, step, self.rank, 2**31])
            pair = augment_batch(pair, rng)
        return pair


def _uses_pairs(stage: StageConfig) -> bool:
    return bool(stage.pairs) or stage.swap or stage.augment


def _warped_labels(labels: np.ndarray, ddf: np.ndarray) -> np.ndarray:
    lab = torch.from_numpy(labels)[None, None]
    return warp_labels(lab, torch.from_numpy(ddf)[None])[0, 0].numpy()


def _tensors(pair: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Images and labels gain a channel axis (1, *S); fields keep theirs (d, *S)."""
    out = {}
    for key, value in pair.items():
        t = torch.from_numpy(np.ascontiguousarray(value))
        out[key] = t if key == "ddf_true" else t[None]
    return out


# ----------------------------------------------------------------------------- losses
def init_weights(model: torch.nn.Module, spec: str) -> None:
    """Copy the weights of a trained model (file, folder or packaged name) into ``model``:
    fine-tuning. The architecture must match (name, ndim, heads)."""
    from ranreg.models import resolve_model

    source = resolve_model(spec)
    want = {k: model.config.get(k) for k in ("name", "ndim", "heads")}
    got = {k: source.config.get(k) for k in want}
    if got != want:
        raise RanregError(f"init {spec}: a {got} model, the config builds {want}")
    model.load_state_dict(source.state_dict(), strict=True)


def stage_loss(
    stage: StageConfig,
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: dict[str, torch.Tensor],
    classes: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted loss of one batch and its terms (as floats, for the logs).

    ``classes`` maps label values to Dice classes (0 = background, 1..K = the organs).
    """
    w = stage.weights
    moving = batch["moving"]
    terms: dict[str, torch.Tensor] = {}
    if stage.kind == "synthetic":
        ddf_true = batch["ddf_true"]
        fixed = batch.get("fixed")
        if fixed is None:  # the paper's stage 1: the moving image under the known field
            with torch.no_grad():
                fixed = warp(moving, ddf_true, padding_mode="zeros")
        ddf = model(moving, fixed).float()
        terms["ddf"] = losses.mse_loss(ddf, ddf_true, batch.get("ddf_weight"))
        terms["smooth"] = losses.gradient_l2(ddf)
        if w["image"] > 0:
            terms["image"] = losses.mse_loss(warp(moving, ddf, padding_mode="zeros"), fixed)
        if stage.swap and w["inverse"] > 0:
            terms["inverse"] = inverse_consistency(ddf)
    else:
        fixed = batch["fixed"]
        ddf = model(moving, fixed)
        warped = warp(moving, ddf)
        if stage.similarity == "ncc":
            terms["similarity"] = losses.local_ncc_loss(
                fixed, warped, window=stage.ncc_window, mask_threshold=stage.mask_threshold
            )
        else:
            mask = None if stage.mask_threshold is None else fixed > stage.mask_threshold
            terms["similarity"] = losses.mse_loss(warped, fixed, mask)
        terms["smooth"] = losses.edge_aware_smoothness(ddf, fixed, alpha=stage.edge_alpha)
        if w["dice"] > 0 and "moving_label" in batch:
            k = int(classes.max()) + 1
            moved = warp(one_hot(classes[batch["moving_label"]], k), ddf)
            terms["dice"] = losses.dice_loss(moved, one_hot(classes[batch["fixed_label"]], k))
    total = sum(w[k] * v for k, v in terms.items())
    return total, {k: float(v.detach()) for k, v in terms.items()}


def inverse_consistency(ddf: torch.Tensor) -> torch.Tensor:
    """Mean squared round trip ``|u_ab(x) + u_ba(x + u_ab(x))|^2`` (voxels^2) over the
    batch's pairs of slots ``(a, b), (b, a)``, both ways: zero when the two fields are
    each other's inverse."""
    ab, ba = ddf[0::2], ddf[1::2]
    there = compose_ddf(ba, ab).square().sum(1).mean()
    back = compose_ddf(ab, ba).square().sum(1).mean()
    return 0.5 * (there + back)


# ----------------------------------------------------------------------------- distributed
def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _setup_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_pref == "auto":
        device_pref = "cuda" if torch.cuda.is_available() else "cpu"
    if device_pref.startswith("cuda") and not torch.cuda.is_available():
        raise RanregError(f"device {device_pref!r}: CUDA is not available on this machine")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device_pref.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device_pref.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local if world > 1 else torch.device(device_pref).index or 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _param_checksum(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum((p.double() * (i + 1)).sum() for i, p in enumerate(model.parameters())))


# ----------------------------------------------------------------------------- logs
class _Logs:
    """CSV logs (rewritten on resume to drop rows past the checkpoint) + TensorBoard."""

    def __init__(self, out: Path, step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.paths = {"train": out / TRAIN_LOG, "val": out / VAL_LOG}
        self.tb = None
        if not enabled:
            return
        for path in self.paths.values():
            if path.exists():
                rows = list(csv.DictReader(path.open()))
                keep = [r for r in rows if int(r["step"]) <= step]
                with path.open("w", newline="") as fh:
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
            with path.open() as fh:
                fields = next(csv.reader(fh))
            for key in row:
                if key not in fields:  # a later stage logs other terms: widen the file
                    rows = list(csv.DictReader(path.open()))
                    fields = [*fields, *(k for k in row if k not in fields)]
                    with path.open("w", newline="") as fh:
                        writer = csv.DictWriter(fh, fieldnames=fields)
                        writer.writeheader()
                        writer.writerows(rows)
                    break
        with path.open("a", newline="") as fh:
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


# ----------------------------------------------------------------------------- trainer
def _check_run_folder(out: Path, ckpt: Path, resume: bool, overwrite: bool) -> None:
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


def train(
    cfg: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    max_steps: int | None = None,
    time_limit: float | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    overwrite: bool = False,
    state: str | os.PathLike[str] | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Run (or continue) the stages of ``cfg``; returns a summary dict.

    A folder that holds an earlier run (its checkpoint or logs) is refused unless
    ``resume`` (continue it) or ``overwrite`` (start again over it).

    ``max_steps``/``time_limit`` (seconds) end this invocation early with a checkpoint, so
    long trainings run in chunks (``--resume`` continues). ``on_step(global_step)`` is
    called after every optimizer step (tests use it to simulate a crash). ``state``: a
    folder that keeps the run across machines (:mod:`ranreg.training_state`): read when
    the run folder has no checkpoint, replaced at the end of the chunk; ``command`` is
    logged with the chunk.
    """
    out = Path(out_dir)
    rank, world, device = _setup_distributed(cfg.device)
    main = rank == 0
    ckpt = out / CHECKPOINT_DIR
    chunk_started = (time.time(), time.monotonic())
    state_dir = None if state is None else Path(state)
    if main and state_dir is not None and restore_state(state_dir, out):
        resume = True
    if main:
        _check_run_folder(out, ckpt, resume, overwrite)
        out.mkdir(parents=True, exist_ok=True)
    _barrier()

    train_subjects, val_subjects = load_subjects(cfg, out) if main else (None, None)
    if world > 1:  # every rank needs the arrays; rank 0 built any synthesised cache
        _barrier()
        if not main:
            train_subjects, val_subjects = load_subjects(cfg, out)
    assert train_subjects is not None and val_subjects is not None
    shapes = {s.image.shape for s in train_subjects}
    if len(shapes) > 1 and cfg.data.crop is None:
        raise RanregError(
            f"training subjects differ in shape {sorted(shapes)}; set data.crop "
            "or resample them to one grid"
        )
    present = sorted(
        {int(v) for s in train_subjects if s.label is not None for v in np.unique(s.label)} - {0}
    )
    organs = cfg.data.organs or present
    # the Dice term compares one-hot maps of the organs only: label value -> class 1..K
    classes = torch.zeros(max([0, *present, *organs]) + 1, dtype=torch.long)
    for k, organ in enumerate(organs, start=1):
        classes[organ] = k
    classes = classes.to(device)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, ndim=cfg.model.ndim, heads=cfg.model.heads).to(device)
    # channels-last: oneDNN's fast layout on the CPU (1.5-1.8x faster training steps of RAN3
    # and RAN4+ at 48x32x64 on 2 cores); safetensors files stay contiguous (save_model)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cpu"
    if channels_last:
        model.to(memory_format=channels_last_format(cfg.model.ndim + 2))
    total_steps = sum(s.steps for s in cfg.stages)
    step = 0
    state: dict[str, Any] = {}
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt, model)
        step = int(state["global_step"])
    elif cfg.init is not None:
        init_weights(model, cfg.init)
    best_val = float(state.get("best_val", -math.inf))
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    # what a user of the trained model needs to bring images onto its grid (ranreg register)
    spacings = {s.spacing for s in train_subjects if s.spacing is not None}
    provenance = {
        "config_source": cfg.source,
        **_window_provenance(cfg),
        "organs": list(organs),
        **({"spacing": list(next(iter(spacings)))} if len(spacings) == 1 else {}),
        **({"init": cfg.init} if cfg.init is not None else {}),
    }
    if main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    logs = _Logs(out, step, main)
    vpairs = validation_pairs(val_subjects, cfg.val_pairs)
    cases = []
    if main and cfg.data.val_scans:
        if len(spacings) != 1:
            raise RanregError("data.val_scans needs training subjects on one voxel grid")
        grid_mm = float(np.mean(next(iter(spacings))))
        cases = known_field_cases(cfg.data.val_scans, grid_mm, cfg.data.window, seed=cfg.seed)

    def measure(row: dict[str, Any]) -> dict[str, Any]:
        row["dice"] = validate(model, val_subjects, vpairs, organs, device)
        if cases:
            row["epe_mm"] = validate_known_fields(model, cases, device)
        return row

    if main and vpairs and step == 0:
        before = validate(model, val_subjects, vpairs, organs, device, identity=True)
        row = measure({"step": 0, "dice_identity": before})
        if cases:  # no registration: the error is the true field itself
            row["epe_mm_identity"] = float(np.mean([c.identity_error() for c in cases]))
        logs.write("val", row)
        best_val = row["dice"]
        _save_best(model, out, 0, best_val, provenance)

    started = time.monotonic()
    steps_this_run = 0
    stopped_early = False
    last_loss = float("nan")
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="train",
        file=sys.stderr,
        disable=not (progress and main),
        dynamic_ncols=True,
    )
    bf16 = fast_bf16(device) if cfg.amp is None else cfg.amp

    def forward(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        # the network under bf16 autocast where asked; losses and warps stay in float32
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return net(moving, fixed).float()

    stage_start = 0
    for stage_index, stage in enumerate(cfg.stages):
        stage_end = stage_start + stage.steps
        if step >= stage_end:
            stage_start = stage_end
            continue
        optimizer = torch.optim.Adam(net.parameters(), lr=stage.lr)
        if state.get("stage_index") == stage_index and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        samples = StepSamples(cfg, stage_index, train_subjects, rank)
        b = stage.batch_size
        loader = DataLoader(
            samples,
            batch_size=b,
            sampler=range((step - stage_start) * b, len(samples)),
            num_workers=cfg.num_workers,
            drop_last=False,
        )
        net.train()
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if channels_last:
                batch = {
                    k: v.to(memory_format=fmt) if (fmt := channels_last_format(v.dim())) else v
                    for k, v in batch.items()
                }
            loss, terms = stage_loss(stage, forward, batch, classes)
            if not torch.isfinite(loss):
                raise RanregError(
                    f"stage {stage.name!r} step {step + 1}: loss is {float(loss)}; "
                    "lower the learning rate or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            steps_this_run += 1
            last_loss = float(loss.detach())
            bar.update(1)
            bar.set_postfix(stage=stage.name, loss=f"{last_loss:.4f}")
            logs.write(
                "train",
                {
                    "step": step,
                    "stage": stage.name,
                    "lr": stage.lr,
                    "loss": last_loss,
                    **terms,
                    "seconds": round(time.monotonic() - started, 3),
                },
            )
            if main and vpairs and (step % cfg.val_every == 0 or step == total_steps):
                val_dice = logs.write("val", measure({"step": step}))["dice"]
                if val_dice > best_val:
                    best_val = val_dice
                    _save_best(model, out, step, val_dice, provenance)
                bar.set_postfix(
                    stage=stage.name, loss=f"{last_loss:.4f}", val_dice=f"{val_dice:.3f}"
                )
            out_of_budget = (max_steps is not None and steps_this_run >= max_steps) or (
                time_limit is not None and time.monotonic() - started >= time_limit
            )
            if step % cfg.checkpoint_every == 0 or step == stage_end or out_of_budget:
                if main:
                    train_state = {
                        "global_step": step,
                        "stage_index": stage_index,
                        "optimizer": optimizer.state_dict(),
                        "best_val": best_val,
                    }
                    save_checkpoint(
                        ckpt, model, train_state, extra={"trained_steps": step, **provenance}
                    )
                _barrier()
            if on_step is not None:
                on_step(step)
            if out_of_budget and step < total_steps:
                stopped_early = True
                break
        if stopped_early:
            break
        stage_start = stage_end
    bar.close()

    checksums = _gather_checksums(model, world)
    if len(set(checksums)) > 1:
        raise RuntimeError(f"data-parallel replicas diverged: checksums {checksums}")
    summary = {
        "global_step": step,
        "total_steps": total_steps,
        "finished": step >= total_steps,
        "last_loss": last_loss,
        "world_size": world,
        "replica_checksums": checksums,
        "device": str(device),
    }
    if main:
        if summary["finished"]:
            save_model(model, out / MODEL_DIR, extra={"trained_steps": step, **provenance})
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if state_dir is not None and steps_this_run:
            wall = time.monotonic() - chunk_started[1]
            chunk = {
                "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(chunk_started[0])),
                "first_step": step - steps_this_run + 1,
                "last_step": step,
                "wall_s": round(wall, 1),
                "s_per_step": round((time.monotonic() - started) / steps_this_run, 3),
                "last_loss": round(last_loss, 5),
                "best_val_dice": round(best_val, 4),
                "bf16": bf16,
                "machine": machine(),
                "command": command,
            }
            export_state(out, state_dir, chunk)
    logs.close()
    return summary


def _window_provenance(cfg: TrainConfig) -> dict[str, Any]:
    """The intensity rule stored with the model (see ranreg.pipeline.model_settings):
    absent = "auto" (window for CT, min-max otherwise)."""
    if cfg.data.shapes is not None:
        return {"window": None}
    if cfg.data.model_window == "auto":
        return {}
    return {"window": cfg.data.window}


def _save_best(
    model: torch.nn.Module, out: Path, step: int, val_dice: float, provenance: dict[str, Any]
) -> None:
    """Keep the model of the best validation Dice so far in ``out/model-best``."""
    extra = {"trained_steps": step, "val_dice": val_dice, **provenance}
    save_model(model, out / BEST_DIR, extra=extra)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather_checksums(model: torch.nn.Module, world: int) -> list[float]:
    mine = _param_checksum(model)
    if world == 1:
        return [mine]
    values = [0.0] * world
    dist.all_gather_object(values, mine)
    return values


# ----------------------------------------------------------------------------- CLI
def _run(args: Any) -> int:
    from ranreg.config import load_config

    cfg = load_config(args.config)
    if args.device:
        cfg.device = args.device
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    try:
        summary = train(
            cfg,
            out,
            resume=args.resume,
            max_steps=args.max_steps,
            time_limit=None if args.time_limit is None else 60 * args.time_limit,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            state=args.state,
            command=" ".join(["ranreg", *sys.argv[1:]]),
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if _is_main():
        state = "finished" if summary["finished"] else "paused (resume with --resume)"
        print(
            f"{state} at step {summary['global_step']}/{summary['total_steps']}, "
            f"last loss {summary['last_loss']:.4f}; outputs in {out}"
        )
    return 0


def add_parser(sub: Any) -> None:
    from ranreg.cli import command_help

    p = sub.add_parser(
        "train",
        help=command_help("train"),
        description="Synthetic pre-training, then unsupervised training.",
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--out", help="output folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in an OUT that holds an earlier run (its files are replaced)",
    )
    p.add_argument(
        "--state",
        help="keep the run's latest state here across machines (training-state/NAME): "
        "resumed from when OUT has no checkpoint, replaced after the chunk",
    )
    p.add_argument("--max-steps", type=int, help="stop after this many steps (a chunk)")
    p.add_argument("--time-limit", type=float, help="stop after this many minutes (a chunk)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides the config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
