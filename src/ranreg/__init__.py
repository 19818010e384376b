"""ranreg: the Residual Aligner-based Network (RAN) for deformable image registration."""

from ranreg.nn import MODEL_NAMES, build_model
from ranreg.spatial import (
    compose_ddf,
    identity_grid,
    jacobian_determinant,
    resize_ddf,
    warp,
    warp_labels,
)

__version__ = "0.1.0"

__all__ = [
    "MODEL_NAMES",
    "build_model",
    "compose_ddf",
    "identity_grid",
    "jacobian_determinant",
    "resize_ddf",
    "warp",
    "warp_labels",
]
