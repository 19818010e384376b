"""One registry of registration methods and their pretrained weights (timm's pattern).

Every method registers itself where it is defined, with :func:`register_method`:

* ``network``: the RAN variants of Tables 2-4, their "without RA" ablations and the
  VoxelMorph networks (:mod:`ranreg.nn`); built untrained by :func:`create_model`;
* ``peer``: classical methods (``ants-syn``, :mod:`ranreg.peers`);
* ``reference``: ``identity`` (no registration, :mod:`ranreg.models`).

Pretrained weights are named ``ARCH.TAG`` (``ran3.abdomen-weak``: RAN3 weights trained on
the abdomen recipe with weak supervision) and listed in :mod:`ranreg.pretrained`; names of
ranreg 0.2 (``ran3-abdomen-weak``) still resolve. A method declares whether its forward pass
can return the per-level outputs (``returns_levels``), instead of callers guessing it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

__all__ = [
    "KINDS",
    "Method",
    "create_model",
    "get_method",
    "is_peer",
    "list_methods",
    "list_pretrained",
    "packaged",
    "register_method",
    "resolve_pretrained",
    "returns_levels",
]

KINDS = ("network", "peer", "reference")
#: the modules whose import fills the registry
_PROVIDERS = ("ranreg.nn", "ranreg.peers", "ranreg.models")


@dataclass(frozen=True)
class Method:
    """A registered method: its name, kind, one-line summary and builder."""

    name: str
    kind: str
    summary: str
    build: Callable[..., nn.Module]
    returns_levels: bool = False


_METHODS: dict[str, Method] = {}


def register_method(
    name: str, *, kind: str, summary: str, returns_levels: bool = False
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``builder(**options) -> nn.Module`` under ``name``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name.lower()
        if key in _METHODS and _METHODS[key].build is not builder:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[key] = Method(name, kind, summary, builder, returns_levels)
        return builder

    return decorate


def _load() -> None:
    for module in _PROVIDERS:
        importlib.import_module(module)


def list_methods(kind: str | None = None) -> list[str]:
    """Registered method names (of one ``kind``), in registration order."""
    _load()
    return [m.name for m in _METHODS.values() if kind is None or m.kind == kind]


def get_method(name: str) -> Method:
    """The method called ``name`` (case ignored); ValueError naming the known ones."""
    method = _METHODS.get(str(name).lower())
    if method is None:  # not registered yet: import every provider
        _load()
        method = _METHODS.get(str(name).lower())
    if method is None:
        known = ", ".join(m.name for m in _METHODS.values())
        raise ValueError(f"unknown method {name!r}; known: {known}")
    return method


def _method_of(model: nn.Module) -> Method | None:
    """The registered method of a built model (the name in its config), if any."""
    try:
        return get_method(str(getattr(model, "config", {}).get("name")))
    except ValueError:
        return None


def returns_levels(model: nn.Module) -> bool:
    """Whether ``model(m, f, return_levels=True)`` gives per-level outputs: declared by its
    method (the name in its config)."""
    method = _method_of(model)
    return method is not None and method.returns_levels


def is_peer(model: nn.Module) -> bool:
    """Whether ``model`` is a classical comparison method (kind ``peer``)."""
    method = _method_of(model)
    return method is not None and method.kind == "peer"


def packaged() -> tuple[dict[str, Path], dict[str, str], str | None]:
    """``(ARCH.TAG -> file, alias -> ARCH.TAG, default)`` of :mod:`ranreg.pretrained`;
    empty in an installation without packaged weights."""
    try:
        module = importlib.import_module("ranreg.pretrained")
    except ImportError:
        return {}, {}, None
    folder = Path(getattr(module, "__file__", ".") or ".").parent
    table = {k: folder / v for k, v in (getattr(module, "PRETRAINED", {}) or {}).items()}
    return table, dict(getattr(module, "ALIASES", {}) or {}), getattr(module, "DEFAULT_MODEL", None)


def list_pretrained(arch: str | None = None) -> list[str]:
    """``ARCH.TAG`` names of the packaged weights (of one architecture)."""
    names = list(packaged()[0])
    if arch is None:
        return names
    return [n for n in names if n.split(".", 1)[0] == arch.lower()]


def resolve_pretrained(name: str) -> str | None:
    """The ``ARCH.TAG`` name that ``name`` means (itself or a 0.2 alias), or None."""
    table, aliases, _ = packaged()
    name = aliases.get(name, name)
    return name if name in table else None


def create_model(name: str, pretrained: bool = False, **options: Any) -> nn.Module:
    """A method by name. ``ARCH.TAG`` (or ``pretrained=True`` with ``ARCH.TAG``) loads the
    packaged weights; a method name builds it (networks untrained, with ``options`` such
    as ``ndim``, ``heads``)."""
    weights = resolve_pretrained(name)
    if weights is not None:
        from ranreg.checkpoint import load_model

        return load_model(packaged()[0][weights])
    if pretrained:
        raise ValueError(f"no packaged weights called {name!r}; known: {list_pretrained()}")
    return get_method(name).build(**options)
