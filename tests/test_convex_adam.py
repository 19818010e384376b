"""The ConvexAdam peer (``convex-adam``): conventions, harness, missing extra.

Needs the optional extra ``peers`` (the package ``convexAdam``); skipped without it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

pytest.importorskip("convexAdam")

from ranreg.cli import main  # noqa: E402
from ranreg.errors import RanregError  # noqa: E402
from ranreg.models import model_label, resolve_model  # noqa: E402
from ranreg.peers import CONVEX_ADAM, ConvexAdam  # noqa: E402
from ranreg.registry import list_methods  # noqa: E402
from tests.helpers import write_nifti  # noqa: E402

SHAPE = (40, 36, 44)


def _texture(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=SHAPE), 2.0).astype(np.float32)


@pytest.fixture(scope="module")
def model() -> ConvexAdam:
    return ConvexAdam()


@pytest.mark.parametrize("axis", [0, 2])
def test_known_shift_gives_the_ranreg_ddf(model: ConvexAdam, axis: int) -> None:
    """moving(x) = fixed(x - 3 e_axis), so fixed(x) = moving(x + 3 e_axis): the DDF is +3
    voxels along ``axis`` and 0 along the others, away from the wrapped border."""
    fixed = _texture()
    moving = np.roll(fixed, 3, axis=axis)
    ddf = model.register_arrays(moving, fixed)
    assert ddf.shape == (3, *SHAPE) and ddf.dtype == np.float32
    core = (slice(None),) + (slice(10, -10),) * 3
    median = np.median(ddf[core].reshape(3, -1), axis=1)
    expected = np.zeros(3)
    expected[axis] = 3.0
    np.testing.assert_allclose(median, expected, atol=0.3)


def test_constant_image_gives_zero_and_2d_is_refused(model: ConvexAdam) -> None:
    flat = np.ones(SHAPE, np.float32)
    assert not model.register_arrays(flat, _texture()).any()
    with pytest.raises(RanregError, match="3D images only"):
        model.register_arrays(np.ones((8, 8), np.float32), np.zeros((8, 8), np.float32))


def test_register_cli_with_convex_adam(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """World-space registration through the harness (2 mm grid): a 4 mm shift along the
    first axis of a 2 mm image is recovered by the field and lifts the Dice of a box."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed = 500.0 * _texture(1) + 100.0
    label = np.zeros(SHAPE, np.uint8)
    label[12:26, 10:24, 12:30] = 1
    fixed[label > 0] += 150.0
    paths = {}
    for name, image, lab in (
        ("fixed", fixed, label),
        ("moving", np.roll(fixed, 2, axis=0), np.roll(label, 2, axis=0)),
    ):
        paths[name] = write_nifti(tmp_path / f"{name}.nii.gz", image.astype(np.float32), affine)
        paths[name + "_lab"] = write_nifti(tmp_path / f"{name}-lab.nii.gz", lab, affine)
    out = tmp_path / "result"
    argv = ["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"])]
    argv += ["--fixed-labels", str(paths["fixed_lab"]), "--moving-labels", str(paths["moving_lab"])]
    assert main([*argv, "--model", CONVEX_ADAM, "--out", str(out), "--labels", "1"]) == 0
    assert "with convex-adam" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["network_spacing_mm"] == [2.0, 2.0, 2.0]
    assert metrics["mean_before"]["dice"] == pytest.approx(12 / 14)  # the box, 2 slices off
    assert metrics["mean_after"]["dice"] > 0.97
    assert metrics["folding_percent"] == 0.0


def test_resolve_model_names_and_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    net = resolve_model(CONVEX_ADAM)
    assert isinstance(net, ConvexAdam) and model_label(net) == CONVEX_ADAM
    assert CONVEX_ADAM in list_methods("peer")
    monkeypatch.setitem(sys.modules, "convexAdam.convex_adam_MIND", None)  # as if missing
    with pytest.raises(RanregError, match=r"needs convexAdam .*pip install 'ranreg\[peers\]'"):
        resolve_model(CONVEX_ADAM)
