"""Safe checkpoints: weights in safetensors with the model config beside them.

A *model file* is one ``model.safetensors`` whose metadata holds the model config as
JSON under the key ``ranreg``; a copy of the config is written next to it as
``model.json`` for people to read. A *training checkpoint* is a directory holding the
model file plus ``train_state.safetensors`` (the optimizer's tensors; the rest of the
training state, step and optimizer settings, as JSON in its metadata) and ``rng.json``
(Python/numpy/torch RNG states). Checkpoints of ranreg 0.2 (``train_state.pt``) are still
read, with ``torch.load(weights_only=True)``.
Nothing here unpickles arbitrary objects, and every directory is written to a temporary
sibling first and renamed into place, so a killed run never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ranreg.atomic import write_text_atomic
from ranreg.errors import RanregError
from ranreg.nn import build_model

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
STATE_FILE = "train_state.safetensors"
LEGACY_STATE_FILE = "train_state.pt"
RNG_FILE = "rng.json"
METADATA_KEY = "ranreg"
FORMAT_VERSION = 1


def save_model(
    model: torch.nn.Module, directory: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model.safetensors`` (+ ``model.json``) into ``directory`` (created)."""
    config = dict(model.config, format=FORMAT_VERSION, **(extra or {}))
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
    tmp = target / (MODEL_FILE + ".tmp")
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(config)})
    os.replace(tmp, target / MODEL_FILE)
    _write_text(target / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return target / MODEL_FILE


def read_model_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config stored in a model file (a ``.safetensors`` file or a directory with one)."""
    file = _model_file(path)
    try:
        with safe_open(str(file), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise RanregError(f"{file}: not a safetensors model file ({exc})") from None
    if METADATA_KEY not in meta:
        raise RanregError(f"{file}: safetensors file without a ranreg model config")
    try:
        config = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise RanregError(f"{file}: corrupt ranreg model config ({exc})") from None
    if not isinstance(config, dict) or "name" not in config or "ndim" not in config:
        raise RanregError(f"{file}: ranreg model config lacks 'name' or 'ndim'")
    return config


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build the model a model file describes and load its weights (strictly)."""
    file = _model_file(path)
    config = read_model_config(file)
    options = {k: config[k] for k in ("heads", "in_channels", "inverse_consistent") if k in config}
    try:
        model = build_model(config["name"], ndim=int(config["ndim"]), **options)
    except ValueError as exc:
        raise RanregError(f"{file}: {exc}") from None
    try:
        state = load_file(str(file), device="cpu")
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise RanregError(f"{file}: weights do not fit {config['name']} ({first})") from None
    model.config = {**model.config, **config}  # keep provenance (trained_steps, ...)
    return model.to(device)


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: torch.nn.Module,
    train_state: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a training checkpoint directory atomically (temporary sibling + rename)."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        save_model(model, tmp, extra)
        save_state(train_state, tmp / STATE_FILE)
        _write_text(tmp / RNG_FILE, json.dumps(capture_rng()))
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def recover_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """Put back the previous checkpoint after a crash between the two renames of
    :func:`save_checkpoint` (the old copy moved aside, the new one not yet in place): the
    aside copy is the last complete checkpoint. Returns whether it did so. Temporary
    folders of a killed writer are removed (one run writes into a folder at a time)."""
    final = Path(directory)
    old = final.with_name(f".{final.name}.old")
    recovered = not final.exists() and old.is_dir()
    if recovered:
        os.replace(old, final)
    # what a killed writer left: its temporary folder, or the old copy it had not yet
    # removed; neither is read again, the complete checkpoint is in place
    if final.parent.is_dir():
        for stale in final.parent.glob(f".{final.name}.*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    return recovered


def load_checkpoint(directory: str | os.PathLike[str], model: torch.nn.Module) -> dict[str, Any]:
    """Load weights into ``model``, restore RNG states, return the train state dict."""
    d = Path(directory)
    file = _model_file(d)
    try:
        state = load_file(str(file), device="cpu")
        _unwrap(model).load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise RanregError(f"{file}: cannot resume from this checkpoint ({first})") from None
    try:
        if (d / STATE_FILE).exists() or not (d / LEGACY_STATE_FILE).exists():
            train_state = load_state(d / STATE_FILE)
        else:
            train_state = torch.load(d / LEGACY_STATE_FILE, map_location="cpu", weights_only=True)
        restore_rng(json.loads((d / RNG_FILE).read_text(encoding="utf-8")))
        _check_train_state(train_state)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise RanregError(f"{d}: incomplete or unsafe training checkpoint ({exc})") from None
    return train_state


def _check_train_state(state: Any) -> None:
    """The structure :func:`ranreg.train.train` reads back, checked before it is used."""
    if not isinstance(state, dict):
        raise TypeError(f"train state is a {type(state).__name__}, not a mapping")
    step = state.get("global_step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"global_step must be a non-negative integer, got {step!r}")
    index = state.get("stage_index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"stage_index must be a non-negative integer, got {index!r}")
    if not isinstance(state.get("best_val", 0.0), int | float):
        raise ValueError(f"best_val must be a number, got {state.get('best_val')!r}")
    optimizer = state.get("optimizer", {"state": {}, "param_groups": []})
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        raise ValueError("optimizer state lacks 'state' or 'param_groups'")


def _flatten(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of ``obj`` with every tensor moved into ``tensors`` under a path key;
    dicts become ``{"__dict__": [[k, v], ...]}`` so integer keys (optimizer state) survive."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, f"{key}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [_flatten(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(state: dict[str, Any], path: Path) -> None:
    """A training state (nested dicts/lists of tensors and numbers) as one safetensors file:
    the tensors as tensors, the structure as JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    layout = _flatten(state, "", tensors)
    save_file(tensors, str(path), metadata={"layout": json.dumps(layout)})


def load_state(path: Path) -> dict[str, Any]:
    """The state :func:`save_state` wrote (no unpickling)."""
    with safe_open(str(path), framework="pt") as fh:
        layout = json.loads((fh.metadata() or {})["layout"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    return _unflatten(layout, tensors)


def capture_rng() -> dict[str, Any]:
    """Python, numpy (legacy global) and torch CPU RNG states as JSON-able data."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _model_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise RanregError(f"{p}: model file not found")
    return p


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)
