"""The networks of Tables 2-4: shapes, parameter counts, weight sharing, gradients,
regional dependency (Eq. 4) and input checks."""

from __future__ import annotations

import json

import pytest
import torch

from ranreg import MODEL_NAMES, build_model
from ranreg.cli import main
from ranreg.nn import RAN, capturable_range, get_variant

# Parameter counts derived by hand from the tables (docs/architecture.md, "Parameter
# counts"), with conv(k, a, b) = k^d a b + b, block(a, b) = conv(3,a,b) + 2 conv(3,b,b):
#   encoder  = block(1,8) + block(8,16) + block(16,16) + block(16,32)   = 37,152 | 111,024
#   skips    = sum conv(1, c, s) over s1,s2,s3,s4,s4d (c = 8,16,16,32,32), s = 16 (RAN3,
#              RAN4+) or 12 (RAN4), none for RAN0                      = 1,744 / 1,308
#   decoder  = sum_k block(c_k, o_k), o = 32,32,16,16,8, c from Table 3's caption
#   RA level = conv(3,2C,18)+conv(3,18,18) + conv(3,18,27)+conv(3,27,md) + conv(3,18,18)
#              + conv(3,18,m) + conv(3,m,1) + conv(1,m|2m,m) + conv(3,m,9)
#              + [level 0: conv(3,9,1) | else: conv(3,m,1) + conv(3,m,9) + conv(3,18,1)]
#              summed over C = 32,32,16,16,8 with m = 6          = 110,699 | 352,109
#   noRA     = same encoder/decoder + per level conv(3,2C,18)+conv(3,18,18)+conv(3,18,27)
#              +conv(3,27,d)
EXPECTED_PARAMS = {
    ("RAN0", 2): 37_152 + 88_440 + 110_699,
    ("RAN0", 3): 111_024 + 264_696 + 352_109,
    ("RAN3", 2): 37_152 + 1_744 + 84_408 + 110_699,
    ("RAN3", 3): 111_024 + 1_744 + 252_600 + 352_109,
    ("RAN4", 2): 37_152 + 1_308 + 82_968 + 110_699,
    ("RAN4", 3): 111_024 + 1_308 + 248_280 + 352_109,
    ("RAN4+", 2): 37_152 + 1_744 + 89_016 + 110_699,
    ("RAN4+", 3): 111_024 + 1_744 + 266_424 + 352_109,
    ("RAN0-noRA", 2): 198_493,
    ("RAN0-noRA", 3): 597_423,
    ("RAN4+-noRA", 3): 600_895,
}

SHAPES = {2: (37, 45), 3: (17, 19, 21)}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "ndim"), sorted(EXPECTED_PARAMS))
def test_parameter_counts_match_tables(name: str, ndim: int) -> None:
    assert n_params(build_model(name, ndim=ndim)) == EXPECTED_PARAMS[(name, ndim)]


def test_heads_option_changes_ra_size() -> None:
    # each extra head adds the head-dependent weights of the five RA modules; checked
    # against the formula in docs/architecture.md: d(params)/dm for d=2 at m=6 -> 7
    m6, m7 = (n_params(build_model("RAN4+", ndim=2, heads=m)) for m in (6, 7))
    per_level = lambda m, first: (  # noqa: E731 - a formula, read it as such
        9 * 27 * m * 2
        + m * 2
        + 9 * 18 * m
        + m
        + 9 * m
        + ((m * m + m) if first else (2 * m * m + m))
        + 9 * m * 9
        + (0 if first else 9 * m + 9 * m * 9)
    )
    expected = sum(per_level(7, k == 0) - per_level(6, k == 0) for k in range(5))
    assert m7 - m6 == expected


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape_on_odd_sizes(name: str, ndim: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, ndim=ndim)
    shape = SHAPES[ndim]
    with torch.no_grad():
        ddf = model(torch.rand(2, 1, *shape), torch.rand(2, 1, *shape))
    assert ddf.shape == (2, ndim, *shape)
    assert torch.isfinite(ddf).all()
    assert ddf.abs().max() > 0  # a real field, not a placeholder


def test_streams_share_weights() -> None:
    """Both streams pass the one encoder/decoder: identical images give identical
    features at every RA level, and there is exactly one encoder and decoder."""
    torch.manual_seed(0)
    model = build_model("RAN3", ndim=2)
    seen = []
    hooks = [
        a.register_forward_pre_hook(lambda _m, args: seen.append((args[0], args[1])))
        for a in model.aligners
    ]
    img = torch.rand(1, 1, 40, 36)
    with torch.no_grad():
        model(img, img)
    for h in hooks:
        h.remove()
    assert len(seen) == 5
    for fs, ft in seen:
        assert torch.equal(fs, ft)
    # with different images the streams differ, so the check above is not vacuous
    seen.clear()
    model.aligners[0].register_forward_pre_hook(lambda _m, a: seen.append((a[0], a[1])))
    with torch.no_grad():
        model(img, torch.rand_like(img))
    assert not torch.equal(*seen[0])
    names = [n for n, _ in model.named_children()]
    assert names.count("encoder") == 1 and names.count("decoder") == 1


@pytest.mark.parametrize(
    ("name", "ndim"),
    [(n, 2) for n in MODEL_NAMES] + [("RAN4+", 3)],
)
def test_every_parameter_gets_a_gradient(name: str, ndim: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, ndim=ndim)
    shape = (33, 40) if ndim == 2 else (16, 17, 18)
    ddf = model(torch.rand(2, 1, *shape), torch.rand(2, 1, *shape))
    (ddf**2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_regional_dependency_of_coarsest_ran0_level() -> None:
    """Eq. (4): phi_0 of RAN0 lives on the pooling grid P(x; 16) = floor(x / 16), so all x
    in one cell share one displacement, while different cells differ."""
    torch.manual_seed(0)
    model = build_model("RAN0", ndim=2)
    shape = (70, 50)
    with torch.no_grad():
        out = model(torch.rand(1, 1, *shape), torch.rand(1, 1, *shape), return_levels=True)
    assert out.scales == (16, 8, 4, 2, 1)
    phi0 = out.levels[0].ddf
    assert phi0.shape == (1, 2, 5, 4)  # ceil(70/16), ceil(50/16)
    # phi_0 at full resolution through the pooling map: phi0[floor(x/16)]
    ix = torch.arange(shape[0]) // 16
    iy = torch.arange(shape[1]) // 16
    full = phi0[:, :, ix][:, :, :, iy]
    for x0, y0, x1, y1 in [(0, 0, 15, 15), (16, 32, 31, 47), (64, 48, 69, 49)]:
        assert torch.equal(full[..., x0, y0], full[..., x1, y1])  # same cell
    assert not torch.equal(full[..., 15, 0], full[..., 16, 0])  # neighbours, other cell
    # while RAN4 resolves level 0 at every voxel (p_0 = 1)
    model4 = build_model("RAN4", ndim=2)
    with torch.no_grad():
        out4 = model4(torch.rand(1, 1, *shape), torch.rand(1, 1, *shape), return_levels=True)
    phi0_4 = out4.levels[0].ddf
    assert phi0_4.shape == (1, 2, *shape)
    assert not torch.equal(phi0_4[..., 0, 0], phi0_4[..., 1, 0])


def test_levels_output_masks_and_confidence() -> None:
    torch.manual_seed(0)
    model = build_model("RAN3", ndim=3, heads=4)
    shape = (18, 20, 22)
    with torch.no_grad():
        out = model(torch.rand(1, 1, *shape), torch.rand(1, 1, *shape), return_levels=True)
        plain = model(torch.rand(1, 1, *shape), torch.rand(1, 1, *shape))
    assert plain.shape == out.ddf.shape == (1, 3, *shape)
    for k, (level, p) in enumerate(zip(out.levels, out.scales, strict=True)):
        grid = tuple(-(-n // p) for n in shape)
        assert level.ddf.shape == (1, 3, *grid)
        assert level.head_masks.shape == (1, 4, *grid)
        torch.testing.assert_close(level.head_masks.sum(1), torch.ones(1, *grid))
        assert level.confidence.shape == (1, 1, *grid)
        assert (level.confidence_prev is None) == (k == 0)
    # the last level is the returned DDF
    torch.testing.assert_close(out.levels[-1].ddf, out.ddf)


def test_capturable_ranges() -> None:
    expected = {
        "RAN0": (40, 20, 10, 5, 2.5),
        "RAN3": (33, 17, 9, 5, 2.5),
        "RAN4": (32.5, 16.5, 8.5, 4.5, 2.5),
        "RAN4+": (32.5, 16.5, 8.5, 4.5, 2.5),
    }
    for name, ranges in expected.items():
        v = get_variant(name)
        assert tuple(capturable_range(v, k) for k in range(5)) == ranges


def test_bad_inputs_raise_clear_errors() -> None:
    model = build_model("RAN0", ndim=2)
    with pytest.raises(ValueError, match="differ in shape"):
        model(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 33))
    with pytest.raises(ValueError, match="2D model"):
        model(torch.rand(1, 1, 8, 32, 32), torch.rand(1, 1, 8, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        model(torch.rand(1, 2, 32, 32), torch.rand(1, 2, 32, 32))
    with pytest.raises(ValueError, match="unknown model"):
        build_model("RAN5")
    with pytest.raises(ValueError, match="ndim"):
        build_model("RAN4", ndim=4)
    assert isinstance(build_model("ran4+", ndim=2), RAN)  # names ignore case


def test_summary_json_counts_params_and_macs(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["summary", "--model", "VoxelMorph", "--ndim", "2", "--shape", "32", "32", "--json"])
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == n_params(build_model("VoxelMorph", ndim=2))
    # MACs by hand: sum over 3x3 convs of 9 * cin * cout * voxels at that conv's grid
    convs = [  # (cin, cout, side)
        (2, 16, 32),
        (16, 32, 16),
        (32, 32, 8),
        (32, 32, 4),  # encoder
        (32, 32, 2),
        (64, 32, 4),
        (64, 32, 8),
        (64, 32, 16),  # decoder, then upsample
        (48, 32, 32),
        (32, 16, 32),
        (16, 16, 32),
        (16, 2, 32),  # refine + flow
    ]
    assert info["macs"] == sum(9 * a * b * s * s for a, b, s in convs)
    assert info["levels"] == []


def test_summary_levels_and_bad_shape(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "--model", "RAN0", "--ndim", "2", "--shape", "33", "47", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == EXPECTED_PARAMS[("RAN0", 2)]
    assert [row["scale"] for row in info["levels"]] == [16, 8, 4, 2, 1]
    assert [row["range"] for row in info["levels"]] == [40, 20, 10, 5, 2.5]
    assert info["macs"] > 0 and info["forward_seconds"] > 0
    assert main(["summary", "--model", "RAN0", "--ndim", "3", "--shape", "33", "47"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--shape" in err[0]
    assert main(["summary", "--model", "RAN9"]) == 2
    assert capsys.readouterr().err.startswith("error:")


@pytest.mark.parametrize("ndim", [2, 3])
def test_instance_norm_block_matches_torch_instance_norm(ndim: int) -> None:
    from ranreg.nn.blocks import instance_norm

    g = torch.Generator().manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(2, 5, *(9, 7, 6)[:ndim], generator=g)
    norm = instance_norm(ndim, 5)
    assert sum(p.numel() for p in norm.parameters()) == 0 and not list(norm.buffers())
    ref = torch.nn.functional.instance_norm(x, eps=1e-5)
    torch.testing.assert_close(norm(x), ref, rtol=1e-5, atol=1e-5)
    fmt = torch.channels_last_3d if ndim == 3 else torch.channels_last
    out = norm(x.to(memory_format=fmt))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=fmt)  # the layout survives the norm
    # zero mean, unit variance per sample and channel
    flat = out.flatten(2)
    torch.testing.assert_close(flat.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-3, rtol=0)


def test_instance_norm_keeps_bf16_under_autocast() -> None:
    from ranreg.nn.blocks import instance_norm

    g = torch.Generator().manual_seed(1)
    x = 1.0 + 3.0 * torch.randn(2, 4, 6, 5, 7, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = instance_norm(3, 4)(x.bfloat16())
    assert y.dtype == torch.bfloat16  # no round trip through float32
    ref = torch.nn.functional.instance_norm(x, eps=1e-5)
    assert (y.float() - ref).abs().max() < 0.05  # bf16 keeps ~3 significant digits


@pytest.mark.parametrize("ndim,dilation,channels_last", [(3, 1, False), (3, 2, True), (2, 1, True)])
def test_conv_block_matches_aten_convolution_and_its_gradient(
    ndim: int, dilation: int, channels_last: bool
) -> None:
    """The float32 CPU forward of the conv block (oneDNN, where ATen would pick its
    reference kernel: batch 1, 18 channels, 16^d) gives ATen's values and gradients."""
    from ranreg.nn.blocks import channels_last_format, conv

    torch.manual_seed(0)
    block = conv(ndim, 18, 6, dilation=dilation)
    ref = {2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[ndim](
        18, 6, 3, padding=dilation, dilation=dilation
    )
    ref.load_state_dict(block.state_dict())
    x = torch.randn(1, 18, *([16] * ndim))
    if channels_last:
        x = x.to(memory_format=channels_last_format(x.dim()))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.profiler.profile() as prof:
        out = block(xa)
    assert "aten::mkldnn_convolution" in {e.key for e in prof.key_averages()}
    expected = ref(xb)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(block.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(block.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-3)
