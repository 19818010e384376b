"""Two-stage training of registration networks, resumable and data-parallel.

The stages (supplement section 3): ``synthetic`` pre-training on images under known fields
(the paper's Eq. 11; :mod:`ranreg.train_data` draws the samples, :mod:`ranreg.objectives`
holds the losses), then ``unsupervised`` training on pairs of distinct subjects. A run
keeps a checkpoint (weights, Adam state, RNG states, step) so that ``--resume`` reaches
the weights an uninterrupted run would have (float tolerance), stops early for chunks
(``--max-steps``, ``--time-limit``), keeps its best model by validation
(:mod:`ranreg.validation`) and, with ``--state``, a copy of its state that continues on
another machine (:mod:`ranreg.training_state`). Under ``torchrun`` each rank draws its
own samples and DistributedDataParallel averages the gradients (NCCL on GPUs, gloo on
CPU); rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from ranreg.checkpoint import load_checkpoint, save_checkpoint, save_model
from ranreg.config import StageConfig, TrainConfig, mix_source
from ranreg.errors import RanregError
from ranreg.nn import build_model
from ranreg.nn.blocks import channels_last_format
from ranreg.objectives import organ_classes, stage_loss
from ranreg.runtime import fast_bf16
from ranreg.signals import stop_signals
from ranreg.train_data import load_subjects, load_train_scans, stage_samples
from ranreg.train_logs import BEST_DIR, TrainLogs, check_run_folder
from ranreg.training_state import export_state, machine, restore_state
from ranreg.validation import known_field_cases, validate, validate_known_fields, validation_pairs

__all__ = ["CHECKPOINT_DIR", "MODEL_DIR", "init_weights", "is_main_process", "train"]

CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"


def init_weights(model: torch.nn.Module, spec: str) -> None:
    """Copy the weights of a trained model (file, folder or packaged name) into ``model``:
    fine-tuning. The architecture must match (name, ndim, heads)."""
    from ranreg.checkpoint import load_model
    from ranreg.registry import packaged, resolve_pretrained

    name = resolve_pretrained(spec)
    source = load_model(packaged()[0][name] if name is not None else spec)
    want = {k: model.config.get(k) for k in ("name", "ndim", "heads")}
    got = {k: source.config.get(k) for k in want}
    if got != want:
        raise RanregError(f"init {spec}: a {got} model, the config builds {want}")
    model.load_state_dict(source.state_dict(), strict=True)


# ----------------------------------------------------------------------------- distributed
def is_main_process() -> bool:
    """Whether this process writes (rank 0 of a data-parallel run, or the only one)."""
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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _any_replica(flag: bool, world: int, device: torch.device) -> bool:
    """Whether ``flag`` holds on any replica (every replica must call this at the same
    step): a stop signal or a time limit that one replica sees stops them all at once."""
    if world == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _gather_checksums(model: torch.nn.Module, world: int) -> list[float]:
    with torch.no_grad():
        mine = float(sum((p.double() * (i + 1)).sum() for i, p in enumerate(model.parameters())))
    if world == 1:
        return [mine]
    values = [0.0] * world
    dist.all_gather_object(values, mine)
    return values


# ----------------------------------------------------------------------------- trainer
def _window_provenance(cfg: TrainConfig) -> dict[str, Any]:
    """The intensity rule stored with the model (see ranreg.pipeline.model_settings):
    absent = "auto" (window for CT, min-max otherwise)."""
    if cfg.data.shapes is not None:
        return {"window": None}
    if cfg.data.model_window == "auto":
        return {}
    return {"window": cfg.data.window}


def _channels_last(cfg: TrainConfig, device: torch.device, bf16: bool) -> bool:
    """Channels-last on the CPU by default, except for 2D networks trained in bf16: there
    torch 2.13's oneDNN crashes (segmentation fault) in the backward of dilated
    convolutions (dilation >= 8 with most channel counts, as in RAN3/RAN4's RA modules);
    on an AVX512-BF16 EPYC without AMX already from dilation 4 (18 channels, 96x128), where
    it may instead return NaN weight gradients without an error, while 3D at 48x40x64 and
    the plain 2D layout stay finite (`python benchmarks/bf16_dilated_conv.py`, 2026-12-02).
    bf16 in the contiguous layout still beats float32 channels-last there (a RAN4+ step,
    batch 4 at 96x128, one thread of an AMD EPYC: 2.4 s against 2.9 s)."""
    risky = device.type == "cpu" and bf16 and cfg.model.ndim == 2
    if cfg.channels_last is None:
        return device.type == "cpu" and not risky
    if cfg.channels_last and risky:
        raise RanregError(
            "channels_last: true with bf16 (amp) for a 2D network on the CPU crashes in "
            "oneDNN's dilated-convolution backward; leave channels_last unset or set amp: false"
        )
    return cfg.channels_last


class _Run:
    """One invocation of :func:`train`: the run folder, data, model and logs, and the
    steps that make a chunk (prepare, validate, stages, checkpoints, finish)."""

    def __init__(self, cfg: TrainConfig, out: Path, progress: bool) -> None:
        self.cfg, self.out, self.progress = cfg, out, progress
        self.rank, self.world, self.device = _setup_distributed(cfg.device)
        self.main = self.rank == 0
        self.ckpt = out / CHECKPOINT_DIR
        self.step = 0
        self.best_val = -math.inf
        self.steps_this_run = 0
        self.last_loss = float("nan")
        self.bf16 = fast_bf16(self.device) if cfg.amp is None else cfg.amp

    # ---- preparation
    def load_data(self) -> None:
        cfg, main = self.cfg, self.main
        train_s, val_s = load_subjects(cfg, self.out, self.progress) if main else (None, None)
        if self.world > 1:  # every rank needs the arrays; rank 0 built any synthesised cache
            _barrier()
            if not main:
                train_s, val_s = load_subjects(cfg, self.out, False)
        assert train_s is not None and val_s is not None
        shapes = {s.image.shape for s in train_s}
        if len(shapes) > 1 and cfg.data.crop is None:
            raise RanregError(
                f"training subjects differ in shape {sorted(shapes)}; set data.crop "
                "or resample them to one grid"
            )
        self.train_subjects, self.val_subjects = train_s, val_s
        self.train_scans = load_train_scans(cfg, train_s[0])
        present = sorted(
            {int(v) for s in train_s if s.label is not None for v in np.unique(s.label)} - {0}
        )
        self.organs = cfg.data.organs or present
        # the Dice term compares one-hot maps of the organs only
        self.classes = organ_classes(present, self.organs).to(self.device)
        self.spacings = {s.spacing for s in train_s if s.spacing is not None}

    def build(self, resume: bool) -> dict[str, Any]:
        """The model (from the checkpoint, ``init`` or scratch); returns the train state."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = build_model(
            cfg.model.name,
            ndim=cfg.model.ndim,
            heads=cfg.model.heads,
            inverse_consistent=cfg.model.inverse_consistent,
        )
        self.model = model.to(self.device)
        # channels-last: oneDNN's fast layout on the CPU (1.5-1.8x faster training steps of
        # RAN3 and RAN4+ at 48x32x64 on 2 cores); safetensors files stay contiguous
        self.channels_last = _channels_last(cfg, self.device, self.bf16)
        if self.channels_last:
            self.model.to(memory_format=channels_last_format(cfg.model.ndim + 2))
        state: dict[str, Any] = {}
        if resume and self.ckpt.exists():
            state = load_checkpoint(self.ckpt, self.model)
            self.step = int(state["global_step"])
        elif cfg.init is not None:
            init_weights(self.model, cfg.init)
        # a best score of another metric (the run's selection changed) is not comparable
        same = state.get("best_metric", "dice") == cfg.select
        self.best_val = float(state.get("best_val", -math.inf)) if same else -math.inf
        self.net: torch.nn.Module = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        return state

    def provenance(self) -> dict[str, Any]:
        """What a user of the trained model needs to bring images onto its grid."""
        cfg, spacings = self.cfg, self.spacings
        return {
            "config_source": cfg.source,
            **_window_provenance(cfg),
            "organs": list(self.organs),
            **({"spacing": list(next(iter(spacings)))} if len(spacings) == 1 else {}),
            **({"init": cfg.init} if cfg.init is not None else {}),
        }

    # ---- validation
    def prepare_validation(self) -> None:
        cfg = self.cfg
        self.vpairs = validation_pairs(self.val_subjects, cfg.val_pairs)
        self.cases = []
        if self.main and cfg.data.val_scans:
            if len(self.spacings) != 1:
                raise RanregError("data.val_scans needs training subjects on one voxel grid")
            grid_mm = float(np.mean(next(iter(self.spacings))))
            self.cases = known_field_cases(
                cfg.data.val_scans, grid_mm, cfg.data.window, seed=cfg.seed
            )

    def measure(self, row: dict[str, Any]) -> dict[str, Any]:
        args = (self.model, self.val_subjects, self.vpairs, self.organs, self.device)
        row["dice"] = validate(*args)
        if self.cases:
            row["epe_mm"] = validate_known_fields(self.model, self.cases, self.device)
        return row

    def first_validation(self) -> None:
        """Step 0: the start's scores, and the no-registration baselines beside them."""
        if not (self.main and self.vpairs and self.step == 0):
            return
        args = (self.model, self.val_subjects, self.vpairs, self.organs, self.device)
        row = self.measure({"step": 0, "dice_identity": validate(*args, identity=True)})
        if self.cases:  # no registration: the error is the true field itself
            row["epe_mm_identity"] = float(np.mean([c.identity_error() for c in self.cases]))
        self.logs.write("val", row)
        self.keep_if_best(row)

    def keep_if_best(self, row: dict[str, Any]) -> None:
        """Keep the model in ``out/model-best`` when the validation row beats the best so
        far by the run's ``select`` metric (Dice up, or real-scan end-point error down)."""
        score = -row["epe_mm"] if self.cfg.select == "epe" else row["dice"]
        if not score > self.best_val:  # NaN never wins
            return
        self.best_val = score
        extra = {"trained_steps": row["step"], "val_dice": row["dice"], **self.provenance()}
        if "epe_mm" in row:
            extra["val_epe_mm"] = row["epe_mm"]
        save_model(self.model, self.out / BEST_DIR, extra=extra)

    # ---- steps
    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The network under bf16 autocast where asked; losses and warps stay float32."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.net(moving, fixed).float()

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.channels_last:
            batch = {
                k: v.to(memory_format=fmt) if (fmt := channels_last_format(v.dim())) else v
                for k, v in batch.items()
            }
        return batch

    def optimise(self, stage: StageConfig, optimizer: Any, batch: dict[str, Any]) -> None:
        loss, terms = stage_loss(stage, self.forward, self.to_device(batch), self.classes)
        if not torch.isfinite(loss):
            raise RanregError(
                f"stage {stage.name!r} step {self.step + 1}: loss is {float(loss)}; "
                "lower the learning rate or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.step += 1
        self.steps_this_run += 1
        self.last_loss = float(loss.detach())
        row = {"step": self.step, "stage": stage.name, "lr": stage.lr, "loss": self.last_loss}
        seconds = round(time.monotonic() - self.started, 3)
        self.logs.write("train", {**row, **terms, "seconds": seconds})

    def checkpoint(self, stage_index: int, optimizer: Any) -> None:
        if self.main:
            train_state = {
                "global_step": self.step,
                "stage_index": stage_index,
                "optimizer": optimizer.state_dict(),
                "best_val": self.best_val,
                "best_metric": self.cfg.select,
            }
            extra = {"trained_steps": self.step, **self.provenance()}
            save_checkpoint(self.ckpt, self.model, train_state, extra=extra)
        _barrier()

    def run_stage(self, index: int, start: int, state: dict[str, Any], budget: Any) -> bool:
        """Steps of stage ``index`` (first global step ``start``) until it ends or the
        chunk's ``budget()`` runs out; returns whether the chunk stopped early."""
        cfg, stage = self.cfg, self.cfg.stages[index]
        end, total = start + stage.steps, sum(s.steps for s in cfg.stages)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=stage.lr)
        if state.get("stage_index") == index and "optimizer" in state:
            try:
                optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError, TypeError, RuntimeError) as exc:
                raise RanregError(f"{self.ckpt}: optimizer state does not fit ({exc})") from None
            for group in optimizer.param_groups:  # the config's rate rules a continued run
                group["lr"] = stage.lr
        samples = stage_samples(cfg, index, self.train_subjects, self.rank, self.train_scans)
        b = stage.batch_size
        sampler = range((self.step - start) * b, len(samples))
        loader = DataLoader(samples, batch_size=b, sampler=sampler, num_workers=cfg.num_workers)
        self.net.train()
        mixed = None if stage.mix is None else cfg.stages[mix_source(cfg.stages, index)]
        for batch in loader:
            # a mixed stage's known-field steps take that stage's loss (and log its name)
            known = mixed is not None and "ddf_true" in batch
            self.optimise(mixed if known else stage, optimizer, batch)
            self.bar.update(1)
            self.bar.set_postfix(stage=stage.name, loss=f"{self.last_loss:.4f}")
            if self.main and self.vpairs and (self.step % cfg.val_every == 0 or self.step == total):
                self.keep_if_best(self.logs.write("val", self.measure({"step": self.step})))
            out_of_budget = budget()
            if self.step % cfg.checkpoint_every == 0 or self.step == end or out_of_budget:
                self.checkpoint(index, optimizer)
            if self.on_step is not None:
                self.on_step(self.step)
            if out_of_budget and self.step < total:
                return True
        return False

    def finish(
        self, summary: dict[str, Any], state_dir: Path | None, chunk: dict[str, Any]
    ) -> None:
        out = self.out
        if summary["finished"]:
            extra = {"trained_steps": self.step, **self.provenance()}
            save_model(self.model, out / MODEL_DIR, extra=extra)
        (out / "train_summary.json").write_text(
            json.dumps(summary, indent=2) + "\n", encoding="utf-8"
        )
        if state_dir is not None and self.steps_this_run:
            export_state(out, state_dir, chunk)

    def summary(self, total: int) -> dict[str, Any]:
        """What the chunk reached; fails loudly if data-parallel replicas diverged."""
        checksums = _gather_checksums(self.model, self.world)
        if len(set(checksums)) > 1:
            raise RuntimeError(f"data-parallel replicas diverged: checksums {checksums}")
        return {
            "global_step": self.step,
            "total_steps": total,
            "finished": self.step >= total,
            "last_loss": self.last_loss,
            "world_size": self.world,
            "replica_checksums": checksums,
            "device": str(self.device),
        }

    def chunk_row(self, started: tuple[float, float], command: str) -> dict[str, Any]:
        """One row of the kept state's chunk log."""
        n = max(self.steps_this_run, 1)
        return {
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started[0])),
            "first_step": self.step - self.steps_this_run + 1,
            "last_step": self.step,
            "wall_s": round(time.monotonic() - started[1], 1),
            "s_per_step": round((time.monotonic() - self.started) / n, 3),
            "last_loss": round(self.last_loss, 5),
            # the best validation score: Dice, or minus the end-point error in mm
            "best_val": round(self.best_val, 4),
            "best_metric": self.cfg.select,
            "bf16": self.bf16,
            "machine": machine(),
            "command": command,
        }


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
    long trainings run in chunks (``--resume`` continues); so does SIGTERM or SIGINT in a
    run (every replica of a data-parallel one), after the step under way
    (:mod:`ranreg.signals`).
    ``on_step(global_step)`` is called after every optimizer step (tests use it to
    simulate a crash). ``state``: a folder that keeps the run across machines
    (:mod:`ranreg.training_state`): the run continues from it or from the run folder's
    checkpoint, whichever is further, and it is replaced at the end of the chunk;
    ``command`` is logged with the chunk.
    """
    out = Path(out_dir)
    started = (time.time(), time.monotonic())
    run = _Run(cfg, out, progress)
    state_dir = None if state is None else Path(state)
    if run.main and state_dir is not None:  # the kept run goes on, from the newer copy
        restore_state(state_dir, out)
        resume = resume or (out / CHECKPOINT_DIR).exists()
    if run.main:
        check_run_folder(out, run.ckpt, resume, overwrite)
        out.mkdir(parents=True, exist_ok=True)
    _barrier()
    run.load_data()
    train_state = run.build(resume)
    if run.main:
        (out / "config.json").write_text(
            json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8"
        )
    run.logs = TrainLogs(out, run.step, run.main)
    run.on_step = on_step
    run.prepare_validation()
    run.first_validation()

    run.started = time.monotonic()
    total = sum(s.steps for s in cfg.stages)
    shown = progress and run.main
    run.bar = tqdm(total=total, initial=run.step, desc="train", file=sys.stderr, disable=not shown)

    with stop_signals() as stopped:

        def budget() -> bool:
            # a stop signal ends the chunk like its time limit; data-parallel replicas agree
            # on it every step, so that all stop after the same one
            local = (
                stopped.is_set()
                or (max_steps is not None and run.steps_this_run >= max_steps)
                or (time_limit is not None and time.monotonic() - run.started >= time_limit)
            )
            return _any_replica(local, run.world, run.device)

        start = 0
        for index, stage in enumerate(cfg.stages):
            if run.step < start + stage.steps and run.run_stage(index, start, train_state, budget):
                break
            start += stage.steps
    run.bar.close()

    summary = run.summary(total)
    if run.main:
        run.finish(summary, state_dir, run.chunk_row(started, command))
    run.logs.close()
    # replicas return together: one that leaves while the main one still writes, and then
    # tears down its process group, can abort at exit (gloo)
    _barrier()
    return summary
