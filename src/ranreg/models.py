"""Which registration method a name or a file means: packaged networks, model files,
``identity`` and the classical peers (``ants-syn``).

:func:`resolve_model` is the one place that turns a ``--model`` value into a module;
training (``init: MODEL``), ``register``, ``evaluate``, ``demo`` and the Python API use it.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ranreg.checkpoint import load_model
from ranreg.errors import RanregError
from ranreg.peers import PEER_NAMES, build_peer

__all__ = ["IDENTITY", "IdentityModel", "resolve_model", "model_label"]

IDENTITY = "identity"
#: Output files of :func:`register_files`.


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
