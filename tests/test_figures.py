"""Figure scales (ranreg.figures): the difference panels' colour scale."""

from __future__ import annotations

import numpy as np
import pytest

from ranreg.figures import DIFF_FLOOR, difference_scale


def test_difference_scale_is_the_high_percentile_of_the_difference_before() -> None:
    rng = np.random.default_rng(0)
    fixed = rng.uniform(0, 1, (20, 20, 20)).astype(np.float32)
    moving = fixed.copy()
    moving[:10] += 0.3  # half the volume differs by 0.3
    assert difference_scale(fixed, moving) == pytest.approx(0.3, abs=1e-5)


def test_an_aligned_pair_keeps_a_visible_scale_so_noise_does_not_saturate() -> None:
    """Self-registration: nothing differs before, so the scale is the floor, and a 1e-3
    resampling error after registration is shown at 2 % of it, not at full brightness."""
    fixed = np.linspace(0, 1, 8000, dtype=np.float32).reshape(20, 20, 20)
    scale = difference_scale(fixed, fixed)
    assert scale == DIFF_FLOOR
    assert 1e-3 / scale == pytest.approx(0.02)


def test_the_running_mean_is_centred_with_edge_padding() -> None:
    from ranreg.figures_training import running_mean

    spike = running_mean(np.array([0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0]), 5)
    np.testing.assert_allclose(spike, [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    line = np.arange(7.0) * 0.5 + 3.0
    smooth = running_mean(line, 5)
    np.testing.assert_allclose(smooth[2:5], line[2:5])  # straight inside the padding
    assert smooth[0] == pytest.approx((3 * 3.0 + 3.5 + 4.0) / 5)  # edge value repeated
    np.testing.assert_array_equal(running_mean(line[:3], 5), line[:3])  # too short
