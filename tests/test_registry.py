"""One registry of methods and packaged weights (issue 11)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ranreg.cli import main
from ranreg.models import resolve_model
from ranreg.pretrained import path_of
from ranreg.registry import (
    create_model,
    get_method,
    list_methods,
    list_pretrained,
    register_method,
    returns_levels,
)


def test_every_kind_of_method_is_registered_once() -> None:
    assert list_methods("network")[:8] == [
        "RAN0", "RAN0-noRA", "RAN3", "RAN3-noRA", "RAN4", "RAN4-noRA", "RAN4+", "RAN4+-noRA"
    ]  # fmt: skip
    assert {"VoxelMorph", "VoxelMorph-pkg"} <= set(list_methods("network"))
    assert list_methods("peer") == ["ants-syn", "convex-adam"]
    assert list_methods("reference") == ["identity"]
    assert get_method("ran4+").name == "RAN4+"  # case ignored
    with pytest.raises(ValueError, match="unknown method 'RAN9'"):
        get_method("RAN9")
    with pytest.raises(ValueError, match="registered twice"):
        register_method("RAN3", kind="network", summary="again")(lambda **o: None)


def test_packaged_synth_weights_are_inverse_consistent() -> None:
    """``ran3.abdomen-synth``: f(a, a) = 0 exactly and f(b, a) undoes f(a, b)."""
    from ranreg.spatial import compose_ddf

    model = create_model("ran3.abdomen-synth").eval()
    assert model.config["inverse_consistent"] and model.config["trained_steps"] >= 10000
    gen = torch.Generator().manual_seed(0)
    blur = torch.nn.AvgPool3d(5, stride=1, padding=2)
    a, b = (blur(torch.rand(1, 1, 32, 24, 40, generator=gen)) for _ in range(2))
    with torch.no_grad():
        assert float(model(a, a).abs().max()) == 0.0
        ab, ba = model(a, b), model(b, a)
    round_trip = compose_ddf(ab, ba).abs().mean()
    assert float(ab.abs().mean()) > 0.05  # a real field, not a zero one
    assert float(round_trip) < 0.1 * float(ab.abs().mean())


def test_packaged_weights_are_arch_dot_tag_and_old_names_still_work() -> None:
    assert list_pretrained() == ["ran3.abdomen-cpu", "ran3.abdomen-weak", "ran3.abdomen-synth"]
    assert list_pretrained("RAN3") == list_pretrained() and list_pretrained("ran4+") == []
    model = create_model("ran3.abdomen-weak")
    stored = load_file(str(path_of("ran3.abdomen-weak")))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, stored[key])
    old = resolve_model("ran3-abdomen-weak")
    assert old.config["trained_steps"] == model.config["trained_steps"]
    assert resolve_model(None).source == "ran3.abdomen-synth"  # the packaged default
    untrained = create_model("RAN3", ndim=2, heads=4)
    assert untrained.config == {"name": "RAN3", "ndim": 2, "heads": 4, "in_channels": 1}
    with pytest.raises(ValueError, match="no packaged weights"):
        create_model("RAN3", pretrained=True)


def test_capability_to_return_levels_is_declared_by_the_method() -> None:
    assert returns_levels(create_model("RAN0", ndim=2)) is True
    assert returns_levels(create_model("VoxelMorph", ndim=2)) is False
    assert returns_levels(resolve_model("identity")) is False


def test_models_command_lists_methods_and_weights(capsys: pytest.CaptureFixture) -> None:
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "ran3.abdomen-synth  (default)" in text and "ants-syn" in text and "RAN4+-noRA" in text
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["default"] == "ran3.abdomen-synth"
    assert {m["kind"] for m in data["methods"]} == {"network", "peer", "reference"}
