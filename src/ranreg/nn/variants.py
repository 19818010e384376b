"""The RAN architecture tables of the supplement, held as data.

Every module of :mod:`ranreg.nn` is built from the rows below, and each row names the
table it comes from, so that a reader can check the code against the paper line by
line (``../shared/seed/RAN-supplementary.txt``, Tables 2, 3 and 4).

Feature names used as decoder inputs:

``s1``..``s4``  encoder outputs of Table 2 blocks 1-4 (scales 1, 2, 4, 8);
``s4d``         ``s4`` after the encoder's last downsample row (scale 16). Table 3 calls
                the first decoder block's input "s4" although it sits at scale 16 in
                RAN0; it is read as the downsampled ``s4`` for every variant;
``F``           the previous decoder block's output (F_0..F_3).

Reading decisions where the tables are ambiguous (see docs/architecture.md):

* RAN3/RAN4/RAN4+ c-lists equal the raw channel sums only if every skip feature is
  first mapped to ``skip_channels`` channels; this is a 1x1 convolution per encoder
  feature, applied once at the feature's own scale and shared by every decoder block
  that uses it (a 1x1 conv commutes with the linear upsampling that follows).
* Table 3's final 1x1 conv (8 -> d, "F_4") is not used: Table 4's last RA module takes
  16 = 2 x 8 channels, so F_4 is the 8-channel block output ``s9``.
* Both convolutions of the RA matching path ("conv,act,conv,act") use the level's
  dilation, so the capturable motion range uses r_k = (r, r).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Table 2: (output channels, scale) of the four encoder blocks; each block is followed by
#: a x2 average-pooling downsample.
ENCODER_BLOCKS: tuple[tuple[int, int], ...] = ((8, 1), (16, 2), (16, 4), (32, 8))

#: Table 3: output channels of decoder blocks 1-5 (F_0, F_1, F_2, F_3, then s9 = F_4).
DECODER_CHANNELS: tuple[int, ...] = (32, 32, 16, 16, 8)

#: Table 4: hidden widths of an RA module: matching path 2C -> 18 -> 18, multi-head DDF
#: 18 -> 27 -> m*d, head attributes 18 -> 18 -> m, per-component fusion m -> 9.
RA_MATCH_CHANNELS = 18
RA_DDF_HIDDEN = 27
RA_ATTR_HIDDEN = 18
RA_FUSE_CHANNELS = 9

#: Suffix that turns a RAN variant name into its "without RA" ablation.
NO_RA_SUFFIX = "-noRA"

#: Default number of heads m (the authors' release uses 6).
DEFAULT_HEADS = 6


@dataclass(frozen=True)
class Variant:
    """One column group of Tables 3 and 4.

    Attributes:
        name: the paper's name.
        q: number of motion-separable (full- or half-resolution) layers.
        skip_channels: channels every skip is mapped to before concatenation, or
            ``None`` to concatenate the raw encoder features (RAN0).
        scales: pooling size p_k of decoder block k+1 and of RA level k (k = 0..4).
        inputs: decoder block inputs besides the previous block's output ``F``.
        dilations: dilation r of the RA matching convolutions at level k.
        c_list: the in-channel list c_0..c_4 printed in Table 3's caption; the
            builder checks that the inputs above add up to it.
    """

    name: str
    q: int
    skip_channels: int | None
    scales: tuple[int, int, int, int, int]
    inputs: tuple[tuple[str, ...], ...]
    dilations: tuple[int, int, int, int, int]
    c_list: tuple[int, int, int, int, int]


_LATER_INPUTS = (("F", "s4"), ("F", "s3"), ("F", "s2"), ("F", "s1"))

#: Tables 3 and 4, one entry per variant.
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            name="RAN0",
            q=0,
            skip_channels=None,
            scales=(16, 8, 4, 2, 1),
            inputs=(("s4d",), *_LATER_INPUTS),
            dilations=(1, 1, 1, 1, 1),
            c_list=(32, 64, 48, 32, 24),
        ),
        Variant(
            name="RAN3",
            q=3,
            skip_channels=16,
            scales=(2, 2, 2, 2, 1),
            inputs=(("s4d", "s3"), *_LATER_INPUTS),
            dilations=(8, 4, 2, 1, 1),
            c_list=(32, 48, 48, 32, 32),
        ),
        Variant(
            name="RAN4",
            q=4,
            skip_channels=12,
            scales=(1, 1, 1, 1, 1),
            inputs=(("s4d", "s3", "s2"), *_LATER_INPUTS),
            dilations=(16, 8, 4, 2, 1),
            c_list=(36, 44, 44, 28, 28),
        ),
        Variant(
            name="RAN4+",
            q=4,
            skip_channels=16,
            scales=(1, 1, 1, 1, 1),
            inputs=(("s4d", "s3", "s2"), *_LATER_INPUTS),
            dilations=(16, 8, 4, 2, 1),
            c_list=(48, 48, 48, 32, 32),
        ),
    )
}

#: Channels of each encoder feature, derived from Table 2.
ENCODER_FEATURE_CHANNELS: dict[str, int] = {
    "s1": ENCODER_BLOCKS[0][0],
    "s2": ENCODER_BLOCKS[1][0],
    "s3": ENCODER_BLOCKS[2][0],
    "s4": ENCODER_BLOCKS[3][0],
    "s4d": ENCODER_BLOCKS[3][0],
}

#: Scale of each encoder feature, derived from Table 2.
ENCODER_FEATURE_SCALES: dict[str, int] = {
    "s1": ENCODER_BLOCKS[0][1],
    "s2": ENCODER_BLOCKS[1][1],
    "s3": ENCODER_BLOCKS[2][1],
    "s4": ENCODER_BLOCKS[3][1],
    "s4d": 2 * ENCODER_BLOCKS[3][1],
}

#: The coarsest grid any variant uses; inputs are padded to a multiple of it.
MAX_SCALE = 2 * ENCODER_BLOCKS[-1][1]


def get_variant(name: str) -> Variant:
    """Return the table entry of a RAN variant (``RAN0``, ``RAN3``, ``RAN4``, ``RAN4+``)."""
    try:
        return VARIANTS[name]
    except KeyError:
        known = ", ".join(VARIANTS)
        raise ValueError(f"unknown RAN variant {name!r}; known: {known}") from None


def matching_dilations(variant: Variant, level: int) -> tuple[int, int]:
    """Dilations r_k of the two matching convolutions of RA level ``level`` (Table 4)."""
    r = variant.dilations[level]
    return (r, r)


def capturable_range(variant: Variant, level: int) -> float:
    """Capturable motion range a_k = p_k (1 + 2 ||r_k||_1) / 2, in input voxels."""
    return variant.scales[level] * (1 + 2 * sum(matching_dilations(variant, level))) / 2
