"""CT-like images synthesised from abdominal organ label maps.

The shared data holds only the organ labels of the Learn2Reg abdomen CT set, not
the intensities. :func:`labels_to_image` paints a contrast-enhanced (portal
venous phase) CT look-alike from a label map so that registration networks can
be trained on real anatomy and scored with Dice / surface distances on the real
labels:

* each organ gets a mean HU from :data:`ORGAN_HU`, varied per subject (a global
  contrast-enhancement factor plus an organ-wise offset) and a faint smooth
  texture;
* a body (soft tissue 0..60 HU with smooth low-frequency texture, wrapped in a
  subcutaneous fat layer under a thin skin) surrounds the organs; outside the
  body is air (-1000 HU). The body cross-section is an ellipse grown from the
  organs' extent in the plane orthogonal to ``body_axis`` (default 2, the
  cranio-caudal axis of the Learn2Reg volumes), with a slow random change of
  size along that axis;
* partial-volume blur, a smooth multiplicative and additive bias field, and
  gaussian noise.

Everything is drawn from the ``numpy.random.Generator`` passed in, so the same
generator state gives the same image. Smooth fields are sums of gaussian bumps
on a coarse grid evaluated separably (three small matrix products), which keeps
a 192x160x256 volume at about two seconds on one core.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from ranreg.atomic import new_output_dir
from ranreg.data.io import load_label_volume, nifti_stem, save_nifti
from ranreg.errors import RanregError

__all__ = [
    "OrganHU",
    "ORGAN_HU",
    "AIR_HU",
    "sample_organ_hu",
    "smooth_field",
    "body_mask",
    "labels_to_image",
    "subject_rng",
    "synthesize_dataset",
]

AIR_HU = -1000.0
#: largest label value a painted map may hold: intensity tables are indexed by value
MAX_LABEL_VALUE = 65535


@dataclass(frozen=True)
class OrganHU:
    """Intensity model of one label: mean HU, between-subject sd, texture amplitude."""

    name: str
    mean: float
    sd: float
    texture: float


#: Portal-venous-phase CT values (HU) for the Learn2Reg abdomen labels. Means are
#: typical contrast-enhanced values; they are chosen so that touching structures
#: differ by >= 30 HU (liver 105 / IVC 140 / portal vein 165; aorta 210 / IVC 140;
#: pancreas 90 / splenic vein 165; kidney 180 / adrenal 55; spleen 120 / stomach 10).
ORGAN_HU: dict[int, OrganHU] = {
    1: OrganHU("spleen", 120.0, 10.0, 5.0),
    2: OrganHU("right kidney", 180.0, 12.0, 10.0),
    3: OrganHU("left kidney", 180.0, 12.0, 10.0),
    4: OrganHU("gallbladder", 10.0, 5.0, 3.0),
    5: OrganHU("esophagus", 50.0, 6.0, 5.0),
    6: OrganHU("liver", 105.0, 8.0, 6.0),
    7: OrganHU("stomach", 10.0, 8.0, 10.0),
    8: OrganHU("aorta", 210.0, 15.0, 3.0),
    9: OrganHU("inferior vena cava", 140.0, 12.0, 4.0),
    10: OrganHU("portal & splenic vein", 165.0, 12.0, 4.0),
    11: OrganHU("pancreas", 90.0, 8.0, 7.0),
    12: OrganHU("right adrenal", 55.0, 6.0, 4.0),
    13: OrganHU("left adrenal", 55.0, 6.0, 4.0),
}
#: Used for label values missing from :data:`ORGAN_HU`.
_OTHER = OrganHU("other", 60.0, 10.0, 5.0)
#: Attenuation of unenhanced soft tissue; the contrast factor scales HU - this.
_UNENHANCED = 40.0


def sample_organ_hu(
    rng: np.random.Generator, n_labels: int = 14, jitter: float = 1.0
) -> np.ndarray:
    """Per-subject mean HU for labels ``0..n_labels-1`` (entry 0 unused, NaN).

    ``HU = 40 + (mean - 40) * g + jitter * sd * z`` with a subject-wide contrast
    factor ``g ~ U(0.9, 1.1)`` and ``z ~ N(0, 1)`` clipped to [-2, 2].
    """
    g = rng.uniform(0.9, 1.1)
    z = np.clip(rng.standard_normal(max(n_labels, 14)), -2.0, 2.0)[:n_labels]
    out = np.full(n_labels, np.nan)
    for lab in range(1, n_labels):
        spec = ORGAN_HU.get(lab, _OTHER)
        out[lab] = _UNENHANCED + (spec.mean - _UNENHANCED) * g + jitter * spec.sd * z[lab]
    return out


def _bump_basis(n: int, step: float, scale: float) -> np.ndarray:
    """(n, k) gaussian bumps every ``scale`` mm over n voxels of ``step`` mm, unit row norm."""
    extent = n * step
    k = int(np.ceil(extent / scale)) + 3
    nodes = (np.arange(k) - 1.0) * scale - 0.5 * ((k - 3) * scale - extent)
    x = (np.arange(n) + 0.5) * step
    basis = np.exp(-0.5 * ((x[:, None] - nodes[None, :]) / scale) ** 2)
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)
    return basis.astype(np.float32)


def smooth_field(
    shape: Sequence[int],
    spacing: Sequence[float],
    scale_mm: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Smooth random float32 field with zero mean and unit variance at every voxel.

    A sum of gaussian bumps of width ``scale_mm`` on a grid of spacing ``scale_mm``
    with standard normal weights, evaluated separably.
    """
    if len(shape) != len(spacing):
        raise ValueError(f"shape {tuple(shape)} and spacing {tuple(spacing)} differ in length")
    bases = [
        _bump_basis(int(n), float(s), float(scale_mm)) for n, s in zip(shape, spacing, strict=True)
    ]
    coef = rng.standard_normal(tuple(b.shape[1] for b in bases)).astype(np.float32)
    out = coef
    for basis in bases:
        # contract the leading coarse axis; the fine axis is appended at the end
        out = np.tensordot(out, basis, axes=(0, 1))
    return np.ascontiguousarray(out, dtype=np.float32)


def _inplane_axes(ndim: int, body_axis: int) -> tuple[int, ...]:
    if not -ndim <= body_axis < ndim:
        raise ValueError(f"body_axis {body_axis} out of range for a {ndim}D map")
    body_axis %= ndim
    return tuple(a for a in range(ndim) if a != body_axis)


def body_mask(
    labels: np.ndarray,
    spacing: Sequence[float],
    rng: np.random.Generator,
    *,
    body_axis: int = 2,
    fat_mm: tuple[float, float] = (8.0, 20.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Body and subcutaneous-fat masks (bool arrays) around the organs.

    The cross-section orthogonal to ``body_axis`` is an ellipse: centred on the
    organs' bounding box, enlarged until it holds every organ voxel of the
    projection, then grown by a random 5-15 % plus the fat thickness and 5-15 mm.
    Its size changes slowly (+-4 %) along ``body_axis``. The fat layer is a rim
    ``fat_mm`` (random in the range) thick just inside a 2-4 mm skin layer.
    """
    ndim = labels.ndim
    axes = _inplane_axes(ndim, body_axis)
    body_axis %= ndim
    sp = np.asarray(spacing, dtype=np.float64)
    shape = labels.shape
    proj = np.any(labels > 0, axis=body_axis)
    coords = [(np.arange(shape[a]) + 0.5) * sp[a] for a in axes]
    fat = float(rng.uniform(*fat_mm))
    grow = float(rng.uniform(1.05, 1.15))
    extra = float(rng.uniform(5.0, 15.0))
    if proj.any():
        idx = np.nonzero(proj)
        pts = [coords[k][idx[k]] for k in range(2)]
        lo = np.array([p.min() for p in pts]) - 0.5 * sp[list(axes)]
        hi = np.array([p.max() for p in pts]) + 0.5 * sp[list(axes)]
        center = 0.5 * (lo + hi)
        half = 0.5 * (hi - lo)
        r2 = sum(((pts[k] - center[k]) / half[k]) ** 2 for k in range(2))
        half *= max(1.0, float(np.sqrt(r2.max())))
        half = half * grow + fat + extra
    else:  # no organs: an ellipse filling 80 % of the field of view
        extent = np.array([shape[a] * sp[a] for a in axes])
        center = 0.5 * extent
        half = 0.4 * extent
        fat = min(fat, 0.3 * float(half.min()))
    # slow change of the cross-section along the body axis
    n_long = shape[body_axis]
    basis = _bump_basis(n_long, float(sp[body_axis]), 80.0)
    scale_long = 1.0 + 0.04 * np.clip(basis @ rng.standard_normal(basis.shape[1]), -1.5, 1.5)

    d2 = ((coords[0][:, None] - center[0]) / half[0]) ** 2 + (
        (coords[1][None, :] - center[1]) / half[1]
    ) ** 2
    skin = min(float(rng.uniform(2.0, 4.0)), 0.1 * float(half.min()))
    outer = 1.0 - skin / float(half.min())
    inner = 1.0 - (skin + fat) / float(half.min())
    d2_3 = np.expand_dims(d2.astype(np.float32), body_axis)
    s2 = (
        (scale_long**2)
        .astype(np.float32)
        .reshape(tuple(n_long if a == body_axis else 1 for a in range(ndim)))
    )
    body = d2_3 <= s2
    fat_layer = (d2_3 <= s2 * np.float32(outer**2)) & (d2_3 > s2 * np.float32(inner**2))
    return body, fat_layer


def _paint(
    lab: np.ndarray,
    rng: np.random.Generator,
    spacing: tuple[float, ...],
    organ_hu: np.ndarray,
    body_axis: int,
    texture: float,
) -> np.ndarray:
    """Organs, body and background of :func:`labels_to_image`, before the degradations.

    Draws the tissue and fat HU, the body mask and the coarse and fine textures (in
    this order) from ``rng``.
    """
    tissue_hu = rng.uniform(20.0, 40.0)
    fat_hu = rng.normal(-100.0, 8.0)
    body, fat = body_mask(lab, spacing, rng, body_axis=body_axis)

    shape = lab.shape
    coarse_tex = smooth_field(shape, spacing, 25.0, rng)
    fine_tex = smooth_field(shape, spacing, 8.0, rng)

    mean_lut = np.nan_to_num(organ_hu, nan=0.0).astype(np.float32)
    tex_lut = np.array(
        [0.0] + [ORGAN_HU.get(k, _OTHER).texture for k in range(1, len(mean_lut))],
        dtype=np.float32,
    )
    mean_lut[0] = 0.0
    organs = lab > 0
    img = mean_lut[lab]
    img += (np.float32(texture) * tex_lut[lab]) * fine_tex
    # background: soft tissue 0..60 HU inside, fat rim, air outside
    background = np.float32(tissue_hu) + np.float32(12.0 * texture) * coarse_tex
    background += np.float32(4.0 * texture) * fine_tex
    np.clip(background, 0.0, 60.0, out=background)
    background[fat] = np.float32(fat_hu) + np.float32(8.0 * texture) * coarse_tex[fat]
    background[~body] = np.float32(AIR_HU)
    return np.where(organs, img, background)


def _add_bias_and_noise(
    img: np.ndarray,
    rng: np.random.Generator,
    spacing: tuple[float, ...],
    *,
    noise_sd: float,
    bias_mult: float,
    bias_add: float,
) -> None:
    """Multiplicative bias, additive bias, then noise, in place on ``img`` (float32).

    A term that is switched off draws nothing from ``rng``. In place because the
    volumes are large.
    """
    shape = img.shape
    if bias_mult:
        mult = smooth_field(shape, spacing, 100.0, rng)
        np.clip(mult, -2.5, 2.5, out=mult)
        mult *= np.float32(bias_mult)
        mult += np.float32(1.0)
        # the bias scales attenuation (HU + 1000), not HU: air stays at -1000
        img += np.float32(-AIR_HU)
        img *= mult
        img -= np.float32(-AIR_HU)
        del mult
    if bias_add:
        add = smooth_field(shape, spacing, 60.0, rng)
        np.clip(add, -2.5, 2.5, out=add)
        add *= np.float32(bias_add)
        img += add
        del add
    if noise_sd > 0:
        noise = rng.standard_normal(shape, dtype=np.float32)
        noise *= np.float32(noise_sd)
        img += noise


def labels_to_image(
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    spacing: Sequence[float] = (2.0, 2.0, 2.0),
    body_axis: int = 2,
    hu_jitter: float = 1.0,
    texture: float = 1.0,
    noise_sd: float = 12.0,
    blur_mm: float = 1.0,
    bias_mult: float = 0.005,
    bias_add: float = 3.0,
    organ_hu: np.ndarray | None = None,
) -> np.ndarray:
    """CT-like float32 image (HU) from an integer label map; see the module doc.

    ``hu_jitter`` scales the between-subject variation of organ means (0: the
    table means times a random contrast factor near 1), ``texture`` the smooth
    texture amplitudes, ``noise_sd`` the gaussian noise (HU), ``blur_mm`` the
    partial-volume blur (gaussian sigma, mm), ``bias_mult`` the relative
    multiplicative bias on attenuation (HU + 1000; 0.005 is about 6 HU sd in soft
    tissue) and ``bias_add`` the additive bias (HU sd); both bias fields have a
    unit-sd shape clipped at 2.5 sd. ``organ_hu`` overrides the sampled per-label
    means (index = label). The result is clipped to [-1024, 3071].
    """
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise ValueError(f"expected a 3D label map, got shape {lab.shape}")
    if lab.dtype.kind not in "iu":
        raise ValueError(f"expected an integer label map, got dtype {lab.dtype}")
    if lab.size == 0:
        raise ValueError("empty label map")
    if lab.min() < 0:
        raise ValueError(f"label map has negative values (min {int(lab.min())})")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers, got {spacing}")
    n_labels = max(int(lab.max()) + 1, 14)

    if organ_hu is None:
        organ_hu = sample_organ_hu(rng, n_labels, hu_jitter)
    else:
        organ_hu = np.asarray(organ_hu, dtype=np.float64)
        if organ_hu.shape[0] < int(lab.max()) + 1:
            raise ValueError(f"organ_hu has {organ_hu.shape[0]} entries, labels go to {lab.max()}")
    img = _paint(lab, rng, spacing, organ_hu, body_axis, texture)
    # degradations: partial-volume blur, then bias fields and noise
    if blur_mm > 0:
        img = ndimage.gaussian_filter(img, [blur_mm / s for s in spacing], mode="nearest")
    _add_bias_and_noise(
        img, rng, spacing, noise_sd=noise_sd, bias_mult=bias_mult, bias_add=bias_add
    )
    np.clip(img, -1024.0, 3071.0, out=img)
    return img.astype(np.float32, copy=False)


def subject_rng(seed: int, name: str) -> np.random.Generator:
    """Generator of one subject: ``default_rng([seed, crc32(name)])``, stable across runs."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def synthesize_dataset(
    labels_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    *,
    progress: bool = True,
    **image_kwargs,
) -> list[tuple[Path, Path]]:
    """Write a DeepReg-style dataset of synthetic images for every label map.

    For each ``labels_dir/*.nii.gz`` (sorted) write ``out_dir/images/NAME.nii.gz``
    (int16 HU, the label's affine) and ``out_dir/labels/NAME.nii.gz`` (a byte copy
    of the input), plus ``out_dir/synth.json`` with the seed and the organ HU drawn
    for each subject. Subject NAME uses :func:`subject_rng` (``seed``, NAME), so
    adding or removing files does not change the other subjects.

    The dataset is built in a hidden sibling folder and renamed to ``out_dir`` at the end
    (:func:`ranreg.atomic.new_output_dir`), so a failed run leaves nothing behind.
    ``out_dir`` must not exist or be empty. ``image_kwargs`` go to
    :func:`labels_to_image`. Returns the (image, label) paths in ``out_dir``.
    """
    src = Path(labels_dir)
    out = Path(out_dir)
    if not src.is_dir():
        raise RanregError(f"{src}: labels directory not found")
    files = sorted(p for p in src.glob("*.nii.gz") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise RanregError(f"{src}: no *.nii.gz label maps found")
    manifest: dict = {
        "generator": "ranreg.data.synth_images.labels_to_image",
        "seed": int(seed),
        "labels_dir": str(src.resolve()),
        "options": {k: v for k, v in image_kwargs.items() if k != "organ_hu"},
        "subjects": {},
    }
    with new_output_dir(out) as tmp:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        bar = tqdm(files, desc="synth", unit="subject", file=sys.stderr, disable=not progress)
        for path in bar:
            name = nifti_stem(path)
            manifest["subjects"][name] = _paint_subject(path, name, tmp, seed, image_kwargs)
        (tmp / "synth.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return [
        (out / "images" / f"{n}.nii.gz", out / "labels" / f"{n}.nii.gz")
        for n in manifest["subjects"]
    ]


def _paint_subject(path: Path, name: str, out: Path, seed: int, image_kwargs: dict) -> dict:
    """Paint the label map ``path`` into ``out/images/NAME.nii.gz``, copy it to
    ``out/labels``; returns its manifest entry (source file, organ HU drawn)."""
    vol = load_label_volume(path)
    rng = subject_rng(seed, name)
    top = int(vol.array.max(initial=0))
    if top > MAX_LABEL_VALUE:
        raise RanregError(
            f"{path}: label value {top}: painting takes label values up to "
            f"{MAX_LABEL_VALUE} (one intensity table entry per value)"
        )
    organ_hu = sample_organ_hu(rng, max(top + 1, 14), image_kwargs.get("hu_jitter", 1.0))
    try:
        img = labels_to_image(
            vol.array, rng, spacing=vol.spacing, organ_hu=organ_hu, **image_kwargs
        )
    except ValueError as exc:
        raise RanregError(f"{path}: {exc}") from exc
    save_nifti(out / "images" / f"{name}.nii.gz", np.rint(img).astype(np.int16), vol.affine)
    shutil.copyfile(path, out / "labels" / f"{name}.nii.gz")
    present = sorted(int(v) for v in np.unique(vol.array) if v > 0)
    return {
        "source": path.name,
        "organ_hu": {str(k): round(float(organ_hu[k]), 1) for k in present},
    }
