"""Training configuration: YAML in, validated dataclasses out.

Every bad value is reported as one :class:`RanregError` naming the file and the key,
e.g. ``configs/x.yaml: stages[1].lr: must be a positive number, got -1``. Relative
paths in the file are resolved against the file's own folder.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ranreg.data.preprocess import ABDOMEN_ORGANS, DEFAULT_WINDOW
from ranreg.errors import RanregError
from ranreg.nn import MODEL_NAMES

STAGE_KINDS = ("synthetic", "unsupervised")
#: largest data.factor: x4 upsampling already turns a 2 mm CT into 0.5 mm voxels
MAX_FACTOR = 4.0
#: upper bounds a crafted config must not pass before anything is allocated
MAX_BATCH = 256
MAX_SHAPES = 10_000
MAX_SHAPES_VOXELS = 200_000_000
SIMILARITIES = ("ncc", "mse")


@dataclass
class ModelConfig:
    name: str = "RAN4+"
    ndim: int = 3
    heads: int = 6
    #: RAN only: the output is the flow of an antisymmetric velocity (f(a, a) = 0 and
    #: f(b, a) = f(a, b)^-1 by construction; see ranreg.nn.ran.RAN)
    inverse_consistent: bool = False


@dataclass
class DataConfig:
    """Where subjects come from: exactly one of ``root``, ``labels`` or ``shapes``."""

    root: str | None = None  # DeepReg / Learn2Reg folder
    labels: str | None = None  # label maps only: images are synthesised (ranreg data synth)
    cache: str | None = None  # where synthesised images go (default: <out>/synth-data)
    synth_seed: int = 0
    shapes: dict[str, Any] | None = None  # {size: [..], count: N}: procedural subjects
    subjects: int | None = None  # use only the first N subjects (file order)
    train: int | None = None  # first N subjects train, the next `val` validate ...
    val: int = 0  # ... when the data have no train/val folders
    factor: float | None = 0.5
    window: list[float] | None = field(default_factory=lambda: list(DEFAULT_WINDOW))
    organs: list[int] | None = field(default_factory=lambda: list(ABDOMEN_ORGANS))
    crop: list[int] | None = None  # random-crop margin per side for training
    #: real scans (paths) registered to copies of themselves under known fields at every
    #: validation: the learning curve's end-point error on real texture (never trained on)
    val_scans: list[str] | None = None
    #: real scans (paths) trained on under known fields: a synthetic stage's
    #: ``pairs.scans`` share of pairs takes one of them instead of a subject (real texture)
    train_scans: list[str] | None = None
    #: the intensity rule the trained model asks of `ranreg register`: "window" (the data
    #: window above, for every image) or "auto" (the window for CT, min-max otherwise:
    #: contrast-agnostic models)
    model_window: str = "window"


@dataclass
class StageConfig:
    name: str
    kind: str
    steps: int
    lr: float
    batch_size: int = 1
    weights: dict[str, float] = field(default_factory=dict)
    similarity: str = "ncc"
    ncc_window: int = 8
    mask_threshold: float | None = 0.1
    edge_alpha: float = 25.0
    deformation: dict[str, Any] = field(default_factory=dict)
    #: synthetic stage: how pairs are drawn (ranreg.data.pairs.PairRecipe fields other
    #: than `deformation`); empty = the paper's stage 1 (the image and its warped copy)
    pairs: dict[str, Any] = field(default_factory=dict)
    swap: bool = False  # batches of (a, b), (b, a): inverse consistency (weights.inverse)
    augment: bool = False  # random axis permutations and flips per batch
    #: unsupervised stage: every ``mix_every``-th step is a step of the synthetic stage
    #: named here (its pairs, known fields and loss), so that the inter-subject objective
    #: does not trade away what the known fields taught (YAML ``mix: {with: NAME, every: K}``)
    mix: str | None = None
    mix_every: int = 2


DEFAULT_WEIGHTS = {
    # stage 1 of the authors' release: 1 * DDF MSE + 1 * smoothness + 0.1 * image MSE
    # (+ inverse consistency |u_ab(x) + u_ba(x + u_ab(x))|^2 when stages swap pairs)
    "synthetic": {"ddf": 1.0, "smooth": 1.0, "image": 0.1, "inverse": 0.0},
    # stage 2 (abdomen): 2 * (-NCC) + 0.5 * edge-aware smoothness (+ optional Dice)
    "unsupervised": {"similarity": 2.0, "smooth": 0.5, "dice": 0.0},
}


@dataclass
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    stages: list[StageConfig]
    seed: int = 0
    device: str = "auto"
    amp: bool | None = False  # bf16 autocast; None: where the CPU or GPU has fast bf16
    channels_last: bool | None = None  # None: on for the CPU (about 1.7x faster steps there)
    init: str | None = None  # start from these weights: a model file/folder or packaged name
    num_workers: int = 0
    checkpoint_every: int = 100
    val_every: int = 100
    val_pairs: int = 6
    # which validation score keeps model-best: "dice" (inter-subject, higher is better) or
    # "epe" (real-scan end-point error under known fields, lower is better; needs val_scans)
    select: str = "dice"
    source: str = "<dict>"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("source")
        return out


#: what :meth:`_Reader.get` accepts for each non-numeric kind, and how it says so
_KINDS: dict[str, tuple[type, str]] = {
    "str": (str, "a non-empty string"),
    "bool": (bool, "true or false"),
    "list": (list, "a list"),
    "dict": (dict, "a mapping"),
}


class _Reader:
    """Type-checked access to one mapping of the YAML, with error paths."""

    def __init__(self, source: str, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RanregError(f"{source}: {path or 'top level'}: must be a mapping")
        self.source, self.data, self.path = source, dict(data), path

    def fail(self, key: str, message: str) -> RanregError:
        where = f"{self.path}.{key}" if self.path else key
        return RanregError(f"{self.source}: {where}: {message}")

    def get(
        self, key: str, default: Any, kind: str, *, positive: bool = False, allow_none: bool = False
    ) -> Any:
        """Pop ``key`` and check it is of ``kind`` (int, float, str, bool, list, dict)."""
        value = self.data.pop(key, default)
        if value is None and (allow_none or default is None):
            return None
        if kind in ("int", "float"):
            return self.number(key, value, kind, positive)
        cls, need = _KINDS[kind]
        if not isinstance(value, cls) or (cls is str and not value):
            raise self.fail(key, f"must be {need}, got {value!r}")
        return value

    def number(self, key: str, value: Any, kind: str, positive: bool = False) -> int | float:
        """``value`` of ``key`` as an int or float (kind), non-negative and finite."""
        types = int if kind == "int" else int | float
        ok = isinstance(value, types) and not isinstance(value, bool)
        ok = ok and (kind == "int" or math.isfinite(value))
        if not ok or value < 0 or (positive and value <= 0):
            word = "integer" if kind == "int" else "number"
            need = f"a positive {word}" if positive else f"a non-negative {word}"
            raise self.fail(key, f"must be {need}, got {value!r}")
        return float(value) if kind == "float" else value

    def finish(self) -> None:
        if self.data:
            raise self.fail(sorted(self.data)[0], "unknown key")


def _path(source_dir: Path, value: str | None) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (source_dir / p).resolve())


def _init_spec(spec: str | None, base: Path) -> str | None:
    """A packaged model name stays a name; a path is taken relative to the config file."""
    if spec is None:
        return None
    from ranreg.registry import resolve_pretrained

    if resolve_pretrained(spec) is not None and not (base / spec).exists():
        return spec
    return str((base / spec).resolve())


#: the options of a stage's `deformation` mapping (ranreg.synth.random_ddf keywords)
_DEFORMATION_KEYS = {
    "max_angle",
    "max_translation",
    "n_points",
    "tps_scale",
    "bump_scale",
    "bump_sigma",
}


def _parse_model(source: str, raw: Any) -> ModelConfig:
    """The ``model`` mapping: a known architecture, 1..MAX_HEADS heads, 2D or 3D."""
    m = _Reader(source, raw, "model")
    model = ModelConfig(
        name=m.get("name", "RAN4+", "str"),
        ndim=m.get("ndim", 3, "int", positive=True),
        heads=m.get("heads", 6, "int", positive=True),
        inverse_consistent=m.get("inverse_consistent", False, "bool"),
    )
    m.finish()
    if model.name.lower() not in {n.lower() for n in MODEL_NAMES}:
        raise m.fail("name", f"unknown model {model.name!r}; known: {', '.join(MODEL_NAMES)}")
    from ranreg.nn import MAX_HEADS

    if model.heads > MAX_HEADS:
        raise m.fail("heads", f"must be at most {MAX_HEADS}, got {model.heads}")
    if model.ndim not in (2, 3):
        raise m.fail("ndim", f"must be 2 or 3, got {model.ndim}")
    if model.inverse_consistent and not model.name.upper().startswith("RAN"):
        raise m.fail("inverse_consistent", f"is a RAN option; {model.name} has none")
    return model


def _parse_data(source: str, raw: Any, base: Path, ndim: int) -> DataConfig:
    """The ``data`` mapping of a ``ndim``-D model; paths are resolved against ``base``."""
    d = _Reader(source, raw, "data")
    data = DataConfig(
        root=_path(base, d.get("root", None, "str")),
        labels=_path(base, d.get("labels", None, "str")),
        cache=_path(base, d.get("cache", None, "str")),
        synth_seed=d.get("synth_seed", 0, "int"),
        shapes=d.get("shapes", None, "dict"),
        subjects=d.get("subjects", None, "int", positive=True),
        train=d.get("train", None, "int", positive=True),
        val=d.get("val", 0, "int"),
        factor=d.get("factor", 0.5, "float", positive=True, allow_none=True),
        window=d.get("window", list(DEFAULT_WINDOW), "list", allow_none=True),
        organs=d.get("organs", list(ABDOMEN_ORGANS), "list", allow_none=True),
        crop=d.get("crop", None, "list"),
        val_scans=d.get("val_scans", None, "list"),
        train_scans=d.get("train_scans", None, "list"),
        model_window=d.get("model_window", "window", "str"),
    )
    for key in ("val_scans", "train_scans"):
        if getattr(data, key) is not None:
            setattr(data, key, [_path(base, str(v)) for v in getattr(data, key)])
    _check_scans(d, data)
    if data.model_window not in ("window", "auto"):
        raise d.fail("model_window", f"must be window or auto, got {data.model_window!r}")
    d.finish()
    _check_data(d, data, source, ndim)
    return data


def _check_data(d: _Reader, data: DataConfig, source: str, ndim: int) -> None:
    """The ``data`` values that depend on each other or on ``ndim``."""
    if data.factor is not None and data.factor > MAX_FACTOR:
        raise d.fail("factor", f"must be at most {MAX_FACTOR:g} (upsampling), got {data.factor:g}")
    sources = [k for k in ("root", "labels", "shapes") if getattr(data, k) is not None]
    if len(sources) != 1:
        raise RanregError(f"{source}: data: give exactly one of root, labels, shapes")
    if data.window is not None and (
        len(data.window) != 2
        or not all(isinstance(v, int | float) for v in data.window)
        or data.window[0] >= data.window[1]
    ):
        raise d.fail("window", f"must be [low, high] with low < high, got {data.window!r}")
    for key in ("organs", "crop"):
        values = getattr(data, key)
        if values is not None and not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
        ):
            raise d.fail(key, f"must be a list of non-negative integers, got {values!r}")
    if data.crop is not None and len(data.crop) != ndim:
        raise d.fail("crop", f"needs {ndim} margins for a {ndim}D model")
    if data.shapes is not None:
        _check_shapes(d, data.shapes, ndim)
    elif ndim != 3:
        raise RanregError(f"{source}: model.ndim: NIfTI data are 3D; 2D needs data.shapes")


def _check_shapes(d: _Reader, shapes: dict[str, Any], ndim: int) -> None:
    """``data.shapes``: ``count`` random subjects of ``size`` (``ndim`` integers)."""
    size, count = shapes.get("size"), shapes.get("count", 8)
    if not (
        isinstance(size, list)
        and len(size) == ndim
        and all(isinstance(v, int) and v >= 8 for v in size)
    ):
        raise d.fail("shapes", f"size must be {ndim} integers >= 8, got {size!r}")
    if not isinstance(count, int) or not 2 <= count <= MAX_SHAPES:
        raise d.fail("shapes", f"count must be an integer from 2 to {MAX_SHAPES}, got {count!r}")
    if math.prod(size) * count > MAX_SHAPES_VOXELS:
        raise d.fail("shapes", f"{count} subjects of {size} exceed {MAX_SHAPES_VOXELS:.0e} voxels")


def _parse_stage(source: str, raw: Any, index: int) -> StageConfig:
    """Entry ``index`` of ``stages``, checked."""
    s = _Reader(source, raw, f"stages[{index}]")
    kind = s.get("kind", None, "str")
    if kind not in STAGE_KINDS:
        raise s.fail("kind", f"must be one of {', '.join(STAGE_KINDS)}, got {kind!r}")
    weights = _stage_weights(s, kind)
    stage = StageConfig(
        name=s.get("name", kind, "str"),
        kind=kind,
        steps=s.get("steps", None, "int", positive=True),
        lr=s.get("lr", None, "float", positive=True),
        batch_size=s.get("batch_size", 1, "int", positive=True),
        weights=weights,
        similarity=s.get("similarity", "ncc", "str"),
        ncc_window=s.get("ncc_window", 8, "int", positive=True),
        mask_threshold=s.get("mask_threshold", 0.1, "float", allow_none=True),
        edge_alpha=s.get("edge_alpha", 25.0, "float"),
        deformation=s.get("deformation", {}, "dict"),
        pairs=s.get("pairs", {}, "dict"),
        swap=s.get("swap", False, "bool"),
        augment=s.get("augment", False, "bool"),
        **_parse_mix(s.get("mix", None, "dict", allow_none=True), s),
    )
    s.finish()
    if stage.batch_size > MAX_BATCH:
        raise s.fail("batch_size", f"must be at most {MAX_BATCH}, got {stage.batch_size}")
    _check_pairs(s, stage)
    if stage.steps is None:
        raise s.fail("steps", "is required")
    if stage.lr is None:
        raise s.fail("lr", "is required")
    if stage.similarity not in SIMILARITIES:
        raise s.fail("similarity", f"must be one of {', '.join(SIMILARITIES)}")
    for key in stage.deformation:
        if key not in _DEFORMATION_KEYS:
            raise s.fail("deformation", f"unknown option {key!r}")
    return stage


def _stage_weights(s: _Reader, kind: str) -> dict[str, float]:
    """The loss weights of a stage: its kind's defaults, overridden by the given ones."""
    weights = dict(DEFAULT_WEIGHTS[kind])
    for key, value in s.get("weights", {}, "dict").items():
        if key not in weights:
            raise s.fail("weights", f"unknown term {key!r}; known: {', '.join(weights)}")
        weights[key] = s.number(f"weights.{key}", value, "float")
    return weights


def _parse_mix(raw: dict[str, Any] | None, s: _Reader) -> dict[str, Any]:
    """``mix: {with: NAME, every: K}`` of a stage (the names are checked across stages)."""
    if raw is None:
        return {}
    unknown = sorted(set(raw) - {"with", "every"})
    if unknown or not isinstance(raw.get("with"), str):
        raise s.fail("mix", "must be {with: <name of a synthetic stage>, every: <int >= 2>}")
    every = raw.get("every", 2)
    if isinstance(every, bool) or not isinstance(every, int) or every < 2:
        raise s.fail("mix.every", f"must be an integer >= 2, got {every!r}")
    return {"mix": raw["with"], "mix_every": every}


def mix_source(stages: list[StageConfig], index: int) -> int:
    """The index of the synthetic stage that stage ``index`` mixes in (the last earlier
    stage of that name)."""
    name = stages[index].mix
    return max(i for i, s in enumerate(stages[:index]) if s.name == name)


def _check_mixes(source: str, stages: list[StageConfig]) -> None:
    """A mixed stage names an earlier synthetic stage of the same batch size."""
    for i, stage in enumerate(stages):
        if stage.mix is None:
            continue
        where = f"{source}: stages[{i}].mix"
        if stage.kind != "unsupervised":
            raise RanregError(f"{where}: only an unsupervised stage mixes in known fields")
        named = any(s.name == stage.mix for s in stages[:i])
        other = stages[mix_source(stages, i)] if named else None
        if other is None or other.kind != "synthetic":
            raise RanregError(f"{where}: {stage.mix!r} is not an earlier synthetic stage")
        if other.batch_size != stage.batch_size:
            raise RanregError(
                f"{where}: {stage.mix!r} has batch_size {other.batch_size}, this stage "
                f"{stage.batch_size}; mixed steps need one batch size"
            )


def parse_config(raw: Any, source: str = "<dict>", base_dir: Path | None = None) -> TrainConfig:
    """Validate a loaded YAML mapping and return a :class:`TrainConfig`."""
    base = base_dir or Path.cwd()
    top = _Reader(source, raw, "")
    # the model comes first: the data checks need its ndim
    model = _parse_model(source, top.get("model", {}, "dict"))
    data = _parse_data(source, top.get("data", None, "dict"), base, model.ndim)
    stages_raw = top.get("stages", None, "list")
    if not stages_raw:
        raise RanregError(f"{source}: stages: give at least one stage")
    stages = [_parse_stage(source, raw_stage, i) for i, raw_stage in enumerate(stages_raw)]
    _check_mixes(source, stages)

    cfg = TrainConfig(
        model=model,
        data=data,
        stages=stages,
        seed=top.get("seed", 0, "int"),
        device=top.get("device", "auto", "str"),
        amp=top.get("amp", False, "bool", allow_none=True),
        channels_last=top.get("channels_last", None, "bool", allow_none=True),
        init=_init_spec(top.get("init", None, "str", allow_none=True), base),
        num_workers=top.get("num_workers", 0, "int"),
        checkpoint_every=top.get("checkpoint_every", 100, "int", positive=True),
        val_every=top.get("val_every", 100, "int", positive=True),
        val_pairs=top.get("val_pairs", 6, "int"),
        select=top.get("select", "dice", "str"),
        source=source,
    )
    top.finish()
    if cfg.select not in ("dice", "epe"):
        raise top.fail("select", f"must be dice or epe, not {cfg.select!r}")
    if cfg.select == "epe" and not data.val_scans:
        raise top.fail("select", "epe needs data.val_scans (the scans it is measured on)")
    for s in stages:
        if s.pairs.get("scans", 0) > 0 and not data.train_scans:
            raise top.fail(f"stages.{s.name}.pairs.scans", "needs data.train_scans")
    return cfg


def _check_scans(d: _Reader, data: DataConfig) -> None:
    """Training scans exist and are none of the validation scans (no tuning on them)."""
    seen = {Path(v).resolve() for v in data.val_scans or []}
    for path in data.train_scans or []:
        if not Path(path).is_file():
            raise d.fail("train_scans", f"{path}: file not found")
        if Path(path).resolve() in seen:
            raise d.fail("train_scans", f"{path} is also in val_scans")


_PAIR_KEYS = {
    "scans",
    "styles",
    "identity",
    "sliding",
    "same_contrast",
    "noise",
    "sliding_deformation",
    "stage1",
    "field_scale",
}


def _check_pairs(s: _Reader, stage: StageConfig) -> None:
    """The pair recipe of a synthetic stage: known keys, styles, shares in [0, 1]."""
    from ranreg.data.pairs import STYLES

    if (stage.pairs or stage.swap) and stage.kind != "synthetic":
        raise s.fail("pairs", "pairs and swap belong to synthetic stages")
    for key, value in stage.pairs.items():
        if key not in _PAIR_KEYS:
            raise s.fail("pairs", f"unknown option {key!r}; known: {', '.join(sorted(_PAIR_KEYS))}")
        if key in ("identity", "sliding", "same_contrast", "stage1", "scans") and not (
            isinstance(value, int | float) and 0 <= value <= 1
        ):
            raise s.fail(f"pairs.{key}", f"must be a share in [0, 1], got {value!r}")
    scale = stage.pairs.get("field_scale")
    if scale is not None and not (
        isinstance(scale, list | tuple)
        and len(scale) == 2
        and all(isinstance(v, int | float) for v in scale)
        and 0 < scale[0] <= scale[1]
    ):
        raise s.fail("pairs.field_scale", f"must be [lo, hi] with 0 < lo <= hi, got {scale!r}")
    styles = stage.pairs.get("styles", {"image": 1.0})
    if not isinstance(styles, dict) or not styles or any(k not in STYLES for k in styles):
        raise s.fail("pairs.styles", f"must map some of {', '.join(STYLES)} to weights")
    if stage.swap and stage.batch_size % 2:
        raise s.fail("swap", f"needs an even batch_size, got {stage.batch_size}")


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML training config."""
    p = Path(path)
    if not p.is_file():
        raise RanregError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise RanregError(f"{p}: not valid YAML ({first})") from None
    return parse_config(raw, str(p), p.resolve().parent)
