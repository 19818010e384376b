"""Which registration method a name or a file means: packaged networks, model files,
``identity`` and the classical peers (``ants-syn``).

:func:`resolve_model` is the one place that turns a ``--model`` value into a module;
training (``init: MODEL``), ``register``, ``evaluate``, ``demo`` and the Python API use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ranreg.checkpoint import load_model
from ranreg.errors import RanregError
from ranreg.registry import (
    Method,
    get_method,
    list_methods,
    list_pretrained,
    packaged,
    register_method,
    resolve_pretrained,
)

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


@register_method(IDENTITY, kind="reference", summary="no registration: a zero field")
def _identity(ndim: int = 3, **options: Any) -> torch.nn.Module:
    return IdentityModel(ndim)


def _known_names() -> list[str]:
    return [*list_methods("reference"), *list_pretrained(), *list_methods("peer")]


def resolve_model(spec: str | os.PathLike[str] | None) -> torch.nn.Module:
    """The model named by ``spec``, in eval mode on the CPU.

    ``spec`` is a model file or a directory holding one (``model.safetensors``, see
    :mod:`ranreg.checkpoint`), a packaged weights name ``ARCH.TAG`` (or its 0.2 alias,
    :mod:`ranreg.pretrained`), or a registered reference or classical method
    (``identity``, ``ants-syn``: :mod:`ranreg.registry`); ``None`` means the packaged
    default (``ranreg.pretrained.DEFAULT_MODEL``). The model gets a ``source`` attribute
    (the spec as given) used in messages and reports. Untrained architectures (``RAN3``)
    are not registration methods: build them with :func:`ranreg.registry.create_model`.
    """
    table, _, default = packaged()
    if spec is None:
        if default is None or resolve_pretrained(default) is None:
            raise RanregError(
                "no packaged default model is installed; name a model "
                f"(known: {', '.join(_known_names())}, or a model file)"
            )
        spec = default
    text = os.fspath(spec)
    local = Path(text).exists()
    method = None if local else _method(text)
    weights = None if local else resolve_pretrained(text)
    if method is not None:
        model = method.build()  # a classical peer raises RanregError if its extra is missing
    elif weights is not None:
        file = table[weights]
        if not file.is_file():
            raise RanregError(f"{file}: packaged model {text!r} is missing from the installation")
        model = load_model(file)
    elif local or os.sep in text or text.endswith(".safetensors"):
        model = load_model(text)  # RanregError names the file for anything but a model file
    else:
        raise RanregError(
            f"unknown model {text!r}: not a model file or folder, and not a packaged model "
            f"name (known: {', '.join(_known_names())})"
        )
    model.source = text  # type: ignore[attr-defined]
    return model.eval()


def _method(name: str) -> Method | None:
    """A registered reference or peer method called ``name`` (networks need weights)."""
    try:
        method = get_method(name)
    except ValueError:
        return None
    return method if method.kind != "network" else None


def model_label(model: torch.nn.Module) -> str:
    """A short name for reports: the spec for names, ``NAME (file or folder)`` for files."""
    source = str(getattr(model, "source", "") or "")
    name = str(model.config.get("name", "model"))
    if not source or source in _known_names() or resolve_pretrained(source) is not None:
        return source or name
    p = Path(source)
    part = p.parent.name if p.name in ("model.safetensors", "model") and p.parent.name else p.name
    part = part.removesuffix(".safetensors")
    return f"{name} ({part})" if part else name
