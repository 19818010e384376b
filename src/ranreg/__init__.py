"""ranreg: the Residual Aligner-based Network (RAN) for deformable image registration.

Public names are imported on first use (PEP 562), so that ``import ranreg`` and
``ranreg --help`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

#: public name -> the module that defines it
_LAZY = {
    "MODEL_NAMES": "ranreg.nn",
    "build_model": "ranreg.nn",
    "compose_ddf": "ranreg.spatial",
    "identity_grid": "ranreg.spatial",
    "jacobian_determinant": "ranreg.spatial",
    "resize_ddf": "ranreg.spatial",
    "warp": "ranreg.spatial",
    "warp_labels": "ranreg.spatial",
    "register": "ranreg.api",
    "register_cohort": "ranreg.cohort",
    "RegistrationOptions": "ranreg.options",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ranreg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
