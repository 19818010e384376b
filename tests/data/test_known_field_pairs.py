"""Issue 12's training data: random-contrast images, pairs with known fields, identity and
swapped pairs, augmentation, the inverse-consistency term, and runs kept across machines."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ranreg.config import parse_config
from ranreg.data.contrast import random_contrast_image, tissue_map
from ranreg.data.pairs import PairRecipe, augment_batch, invert_ddf, make_pair, swapped
from ranreg.errors import RanregError
from ranreg.objectives import inverse_consistency
from ranreg.spatial import warp_labels
from ranreg.synth import affine_ddf
from ranreg.train import train
from tests.helpers import shapes_config


def _labels(shape=(24, 20, 28)) -> np.ndarray:
    """Three box organs inside the grid (values 1, 2, 5: gaps like real label tables)."""
    lab = np.zeros(shape, dtype=np.int64)
    lab[4:12, 4:10, 4:14] = 1
    lab[12:20, 6:14, 8:20] = 2
    lab[6:10, 12:17, 16:24] = 5
    return lab


def _warp_labels_np(labels: np.ndarray, ddf: np.ndarray) -> np.ndarray:
    lab = torch.from_numpy(labels)[None, None]
    return warp_labels(lab, torch.from_numpy(ddf)[None])[0, 0].numpy()


def test_tissue_map_keeps_organ_labels_and_structures_the_body() -> None:
    lab = _labels()
    tissues = tissue_map(lab, (8.0, 8.0, 8.0), np.random.default_rng(0), subregions=(5, 5))
    organs = lab > 0
    np.testing.assert_array_equal(tissues[organs], lab[organs])
    body = tissues[~organs]
    # fat rim (6) and the five body cells (7..11) above the largest label, air 0
    assert set(np.unique(body)) <= {0, 6, 7, 8, 9, 10, 11}
    assert len(set(np.unique(body)) - {0, 6}) == 5


def test_random_contrast_varies_between_calls_and_follows_the_tissues() -> None:
    tissues = tissue_map(_labels(), (8.0, 8.0, 8.0), np.random.default_rng(1))
    quiet = {"blur_mm": (0.0, 0.0), "bias": 0.0, "noise": (0.0, 0.0), "spread": 0.0}
    a = random_contrast_image(tissues, np.random.default_rng(2), **quiet)
    b = random_contrast_image(tissues, np.random.default_rng(3), **quiet)
    assert a.dtype == np.float32 and a.min() == 0.0 and a.max() == 1.0
    # without blur, noise or spread every tissue is one intensity ...
    for t in np.unique(tissues):
        assert np.ptp(a[tissues == t]) < 1e-6
    # ... and another draw paints the same tissues with other intensities
    means_a = np.array([a[tissues == t].mean() for t in (1, 2, 5)])
    means_b = np.array([b[tissues == t].mean() for t in (1, 2, 5)])
    assert np.abs(means_a - means_b).max() > 0.1
    same = random_contrast_image(tissues, np.random.default_rng(2), **quiet)
    np.testing.assert_array_equal(a, same)


def test_known_field_pairs_keep_labels_exact_and_identity_pairs_have_zero_target() -> None:
    lab = _labels()
    image = (lab > 0).astype(np.float32)
    field = {"max_angle": 0.1, "max_translation": 1.5, "tps_scale": 1.0, "bump_scale": 1.0}
    recipe = PairRecipe(styles={"random": 1.0}, sliding=0.5, deformation=field)
    for seed in range(4):
        pair = make_pair(image, lab, (8.0,) * 3, np.random.default_rng(seed), recipe)
        assert np.abs(pair["ddf_true"]).max() > 0.5
        np.testing.assert_array_equal(
            _warp_labels_np(pair["moving_label"], pair["ddf_true"]), pair["fixed_label"]
        )
    identity = PairRecipe(styles={"image": 1.0}, identity=1.0, noise=0.05)
    pair = make_pair(image, lab, (8.0,) * 3, np.random.default_rng(0), identity)
    assert not pair["ddf_true"].any()
    np.testing.assert_array_equal(pair["moving_label"], pair["fixed_label"])
    noise = pair["fixed"] - pair["moving"]  # independent noise on both images
    assert 0.02 < noise.std() < 0.1


def test_field_scale_shrinks_the_same_field_and_leaves_identity_pairs_zero() -> None:
    lab = _labels()
    image = (lab > 0).astype(np.float32)
    field = {"max_angle": 0.1, "max_translation": 1.5, "tps_scale": 1.0, "bump_scale": 1.0}
    for sliding in (0.0, 1.0):
        full = PairRecipe(sliding=sliding, deformation=field)
        half = PairRecipe(sliding=sliding, deformation=field, field_scale=(0.5, 0.5))
        a = make_pair(image, lab, (8.0,) * 3, np.random.default_rng(3), full)
        b = make_pair(image, lab, (8.0,) * 3, np.random.default_rng(3), half)
        # the scale is drawn after the field: the same field, exactly halved
        np.testing.assert_allclose(b["ddf_true"], 0.5 * a["ddf_true"], atol=1e-6)
        np.testing.assert_array_equal(
            _warp_labels_np(b["moving_label"], b["ddf_true"]), b["fixed_label"]
        )
    wide = PairRecipe(deformation=field, field_scale=(0.1, 1.0))
    plain = PairRecipe(deformation=field)
    factors = []
    for seed in range(12):
        pairs = [
            make_pair(image, lab, (8.0,) * 3, np.random.default_rng(seed), r) for r in (wide, plain)
        ]
        factors.append(np.abs(pairs[0]["ddf_true"]).max() / np.abs(pairs[1]["ddf_true"]).max())
    # log-uniform over a decade: small and large fields alike
    assert 0.1 <= min(factors) < 0.25 and 0.5 < max(factors) <= 1.0
    zero = PairRecipe(identity=1.0, field_scale=(0.1, 1.0))
    assert not make_pair(image, lab, (8.0,) * 3, np.random.default_rng(0), zero)["ddf_true"].any()


def test_swapped_pair_targets_the_inverse_of_an_affine_field() -> None:
    shape = (24, 20, 28)
    angle = 0.1
    rot = np.array(
        [[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]]
    )
    t = np.array([1.0, -0.5, 0.75])
    forward = affine_ddf(shape, rot, t)
    backward = affine_ddf(shape, rot.T, -rot.T @ t)  # the exact inverse map
    v, residual = invert_ddf(torch.from_numpy(forward)[None])
    inner = (slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    np.testing.assert_allclose(v[0].numpy()[inner], backward[inner], atol=0.02)
    assert float(residual[0][inner[1:]].max()) < 0.02
    pair = {
        "moving": np.zeros(shape, np.float32),
        "fixed": np.ones(shape, np.float32),
        "ddf_true": forward,
    }
    turned = swapped(pair)
    assert turned["moving"].max() == 1.0 and turned["fixed"].max() == 0.0
    assert turned["ddf_weight"][inner[1:]].min() == 1.0


def test_augmentation_moves_fields_with_the_images() -> None:
    lab = _labels()
    recipe = PairRecipe(
        styles={"image": 1.0}, deformation={"max_angle": 0.2, "max_translation": 2.0}
    )
    pair = make_pair(
        (lab > 0).astype(np.float32), lab, (8.0,) * 3, np.random.default_rng(5), recipe
    )
    for seed in range(4):
        aug = augment_batch(pair, np.random.default_rng(seed))
        assert sorted(aug["moving"].shape) == sorted(lab.shape)
        # warping the permuted/flipped moving labels with the transformed field gives the
        # permuted/flipped fixed labels: the field's components moved with the axes
        np.testing.assert_array_equal(
            _warp_labels_np(aug["moving_label"], aug["ddf_true"]), aug["fixed_label"]
        )


def test_inverse_consistency_is_zero_for_inverse_fields_only() -> None:
    t = torch.tensor([1.5, -0.5, 0.25]).view(1, 3, 1, 1, 1).expand(1, 3, 8, 8, 8)
    inverse = torch.cat([t, -t])
    assert float(inverse_consistency(inverse)) < 1e-10
    same = torch.cat([t, t])
    assert float(inverse_consistency(same)) == pytest.approx(4 * (1.5**2 + 0.5**2 + 0.25**2))


def _pairs_config(steps: int) -> dict:
    raw = shapes_config(steps=(steps, 1), size=(32, 32))
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0].update(
        swap=True,
        augment=True,
        pairs={"identity": 0.25, "noise": 0.02},
        weights={"ddf": 1.0, "smooth": 0.1, "image": 0.0, "inverse": 0.1},
    )
    return raw


def test_config_checks_pair_options() -> None:
    raw = _pairs_config(2)
    raw["stages"][0]["pairs"] = {"identity": 2}
    with pytest.raises(RanregError, match=r"stages\[0\].pairs.identity: must be a share"):
        parse_config(raw)
    raw["stages"][0]["pairs"] = {"styles": {"photo": 1}}
    with pytest.raises(RanregError, match="pairs.styles"):
        parse_config(raw)
    for bad in ([0.0, 1.0], [1.0, 0.5], [0.5], "small"):
        raw["stages"][0]["pairs"] = {"field_scale": bad}
        with pytest.raises(RanregError, match=r"pairs.field_scale: must be \[lo, hi\]"):
            parse_config(raw)
    raw["stages"][0]["pairs"] = {"field_scale": [0.1, 1]}
    assert parse_config(raw).stages[0].pairs["field_scale"] == [0.1, 1]
    raw = _pairs_config(2)
    raw["stages"][0]["batch_size"] = 3
    with pytest.raises(RanregError, match="swap: needs an even batch_size"):
        parse_config(raw)


def test_run_kept_in_a_state_folder_continues_exactly_on_a_fresh_machine(tmp_path: Path) -> None:
    cfg = parse_config(_pairs_config(4))
    straight = train(cfg, tmp_path / "straight", progress=False)
    assert straight["finished"]
    state = tmp_path / "training-state" / "run"
    first = train(cfg, tmp_path / "machine1", max_steps=2, progress=False, state=state)
    assert first["global_step"] == 2 and (state / "checkpoint").is_dir()
    # a fresh machine: an empty run folder, only the kept state
    second = train(cfg, tmp_path / "machine2", progress=False, state=state, command="again")
    assert second["finished"] and second["global_step"] == 4
    a = load_file(str(tmp_path / "straight" / "checkpoint" / "model.safetensors"))
    b = load_file(str(state / "checkpoint" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    rows = list(csv.DictReader((state / "chunks.csv").open()))
    assert [(r["first_step"], r["last_step"]) for r in rows] == [("1", "2"), ("3", "4")]
    assert rows[1]["command"] == "again" and rows[1]["machine"]
    assert (state / "val_log.csv").is_file() and (state / "model-best").is_dir()
    assert not list(state.parent.glob(".*"))  # no temporary folder left beside it


def test_the_same_state_command_runs_every_chunk_on_one_machine(tmp_path: Path) -> None:
    """Chunks repeat one command: the run goes on from the run folder's checkpoint."""
    cfg = parse_config(_pairs_config(4))
    state, out = tmp_path / "state", tmp_path / "run"
    for expected in (2, 4):
        summary = train(cfg, out, max_steps=2, progress=False, state=state)
        assert summary["global_step"] == expected
    rows = list(csv.DictReader((state / "chunks.csv").open()))
    assert [r["last_step"] for r in rows] == ["2", "4"]


def test_state_over_the_size_limit_is_refused_and_the_old_state_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = parse_config(_pairs_config(2))
    state = tmp_path / "state"
    train(cfg, tmp_path / "run", max_steps=1, progress=False, state=state)
    before = (state / "chunks.csv").read_text()
    monkeypatch.setattr("ranreg.training_state.MAX_STATE_BYTES", 1000)
    with pytest.raises(RanregError, match="MB a kept state may take"):
        train(cfg, tmp_path / "run", resume=True, progress=False, state=state)
    assert (state / "chunks.csv").read_text() == before


def test_the_image_term_counts_only_pairs_of_one_contrast() -> None:
    """make_pair marks random-contrast pairs of two contrast draws (image_weight 0); the
    flag survives turning round and augmentation; the term is the weighted mean of the
    pairs' MSEs."""
    from ranreg.objectives import image_term

    lab = _labels()
    image = (lab > 0).astype(np.float32)
    flags = {}
    for same in (0.0, 1.0):
        recipe = PairRecipe(styles={"random": 1.0}, same_contrast=same)
        pair = make_pair(image, lab, (8.0,) * 3, np.random.default_rng(1), recipe)
        flags[same] = float(pair["image_weight"])
        assert float(swapped(pair)["image_weight"]) == flags[same]
        assert float(augment_batch(pair, np.random.default_rng(2))["image_weight"]) == flags[same]
    assert flags == {0.0: 0.0, 1.0: 1.0}
    own = make_pair(image, lab, (8.0,) * 3, np.random.default_rng(1), PairRecipe())
    assert float(own["image_weight"]) == 1.0
    warped = torch.zeros(3, 1, 4, 4)
    fixed = torch.stack([torch.full((1, 4, 4), v) for v in (1.0, 2.0, 3.0)])
    weight = torch.tensor([1.0, 0.0, 1.0])
    assert float(image_term(warped, fixed, weight)) == pytest.approx((1 + 9) / 2)
    assert float(image_term(warped, fixed)) == pytest.approx((1 + 4 + 9) / 3)
    assert float(image_term(warped, fixed, torch.zeros(3))) == 0.0
