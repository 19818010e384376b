"""RAN(inverse_consistent=True): the flow of an antisymmetric velocity (issue 12, item 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from ranreg.checkpoint import load_model, save_model
from ranreg.config import parse_config
from ranreg.errors import RanregError
from ranreg.nn import RAN, build_model
from ranreg.registry import create_model
from ranreg.spatial import compose_ddf, integrate_velocity, jacobian_determinant
from tests.helpers import shapes_config


def _pair(shape: tuple[int, ...], shift: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.random(shape), 2).astype(np.float32)
    a = (a - a.min()) / (a.max() - a.min())
    b = ndimage.shift(a, shift, order=1, mode="nearest").astype(np.float32)
    return torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The packaged RAN3 as the paper builds it, and the same weights inverse-consistent."""
    plain = create_model("ran3.abdomen-weak", pretrained=True).eval()
    ic = RAN("RAN3", ndim=3, heads=plain.heads, inverse_consistent=True).eval()
    ic.load_state_dict(plain.state_dict())
    return plain, ic


@torch.no_grad()
def test_output_is_the_flow_of_the_antisymmetric_velocity(trained) -> None:
    plain, ic = trained
    a, b = _pair((32, 24, 40), (1.5, -1.0, 2.0))
    u = ic(a, b)
    expected = integrate_velocity(0.5 * (plain(a, b) - plain(b, a)))
    assert float(expected.norm(dim=1).mean()) > 0.1  # a field worth comparing
    torch.testing.assert_close(u, expected, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_self_registration_is_zero_and_the_two_ways_are_inverse(trained) -> None:
    plain, ic = trained
    a, b = _pair((32, 24, 40), (1.5, -1.0, 2.0))
    assert float(ic(a, a).abs().max()) == 0.0 and float(ic(b, b).abs().max()) == 0.0
    assert float(plain(a, a).norm(dim=1).mean()) > 0.1  # the paper's network moves a copy
    u, back = ic(a, b), ic(b, a)
    round_trip = float(compose_ddf(back, u).norm(dim=1).mean())
    plain_trip = float(compose_ddf(plain(b, a), plain(a, b)).norm(dim=1).mean())
    assert round_trip < 0.05 * float(u.norm(dim=1).mean())
    assert round_trip < 0.02 * plain_trip
    assert not bool((jacobian_determinant(u) <= 0).any())


@pytest.mark.parametrize("ndim", [2, 3])
def test_levels_batches_and_gradients(ndim: int) -> None:
    torch.manual_seed(0)
    net = RAN("RAN4", ndim=ndim, inverse_consistent=True)
    shape = (24, 40) if ndim == 2 else (16, 24, 20)
    m, f = torch.rand(3, 1, *shape), torch.rand(3, 1, *shape)
    out = net(m, f, return_levels=True)
    assert out.ddf.shape == (3, ndim, *shape)
    assert all(level.ddf.shape[0] == 3 for level in out.levels)  # the m -> f direction
    # each pair's field depends on that pair only (the batch is not mixed by the roll)
    with torch.no_grad():
        alone = net(m[1:2], f[1:2])
    torch.testing.assert_close(out.ddf[1:2].detach(), alone, atol=1e-5, rtol=1e-4)
    out.ddf.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_option_survives_a_model_file_and_configs(tmp_path, trained) -> None:
    _, ic = trained
    save_model(ic, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.inverse_consistent and loaded.config["inverse_consistent"] is True
    a, b = _pair((16, 24, 16), (1.0, 0.0, -1.0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(a, b), ic(a, b))
    assert "inverse_consistent" not in RAN("RAN0", ndim=2).config  # the paper's configs
    with pytest.raises(ValueError, match="RAN option"):
        build_model("VoxelMorph", ndim=2, inverse_consistent=True)
    with pytest.raises(ValueError, match="true or false"):
        build_model("RAN0", ndim=2, inverse_consistent=1)


def test_training_config_key() -> None:
    cfg = parse_config(shapes_config(name="RAN3") | {"model": {"name": "RAN3", "ndim": 2}})
    assert not cfg.model.inverse_consistent
    on = {"name": "RAN3", "ndim": 2, "inverse_consistent": True}
    assert parse_config(shapes_config() | {"model": on}).model.inverse_consistent
    with pytest.raises(RanregError, match="RAN option"):
        parse_config(shapes_config() | {"model": {**on, "name": "VoxelMorph"}})
    with pytest.raises(RanregError, match="inverse_consistent"):
        parse_config(shapes_config() | {"model": {**on, "inverse_consistent": "yes"}})
