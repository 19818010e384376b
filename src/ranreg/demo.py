"""``ranreg demo``: register the pair shipped inside the package with the packaged model.

The pair is two real abdominal anatomies (shared label maps 0027 -> 0028, which no shipped
model trains on) with CT-like images painted from them, at 4 mm (96x80x128); see
``benchmarks/make_demo_data.py``. No download and no user data are needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ranreg.infer import register_files
from ranreg.options import RegistrationOptions

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"


def demo_files() -> dict[str, Path]:
    """The packaged pair: moving/fixed image and label files."""
    return {
        f"{role}_{kind}": DEMO_DATA / f"{role}_{kind}.nii.gz"
        for role in ("moving", "fixed")
        for kind in ("image", "labels")
    }


def run_demo(
    out: str | Path,
    model: str | None = None,
    device: str = "cpu",
    *,
    options: RegistrationOptions | None = None,
    **changes: Any,
) -> dict[str, Any]:
    """Register the packaged pair into the new folder ``out`` with the default pipeline
    (or ``options``, updated by ``changes``); returns the metrics."""
    f = demo_files()
    return register_files(
        f["fixed_image"],
        f["moving_image"],
        out,
        model,
        moving_labels=f["moving_labels"],
        fixed_labels=f["fixed_labels"],
        device=device,
        head_masks=True,
        options=options,
        **changes,
    )
