"""Names of label values: built-in tables for common data sets, or a user's file.

``ranreg register|demo --label-names NAME_OR_FILE`` picks the table the reports use:

* ``abdomen`` (default): the 13 organs of the Learn2Reg AbdomenCTCT labels, the paper's
  data (:data:`ranreg.metrics.ORGAN_NAMES`);
* ``totalseg``: TotalSegmentator v2, task ``total`` (117 classes);
* ``totalseg-mr``: TotalSegmentator, task ``total_mr`` (50 classes);
* a file: JSON (``{"5": "liver", ...}`` or ``[{"id": 5, "name": "liver"}, ...]``) or CSV
  (``id,name`` per line, an optional header line).

Ids missing from the table are printed as ``label N``. The TotalSegmentator tables follow the
class numbering of that project's ``map_to_binary.py`` (Wasserthal et al., Radiology: AI
2023; Apache-2.0), written here as data.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ranreg.errors import RanregError

__all__ = ["BUILTIN_TABLES", "DEFAULT_TABLE", "load_label_names", "label_name"]

DEFAULT_TABLE = "abdomen"


def _sides(*names: str) -> list[str]:
    """``name_left, name_right`` for each name, in that order."""
    return [f"{n}_{side}" for n in names for side in ("left", "right")]


def _sides_rl(*names: str) -> list[str]:
    return [f"{n}_{side}" for n in names for side in ("right", "left")]


def _vertebrae() -> list[str]:
    """S1, L5..L1, T12..T1, C7..C1 (TotalSegmentator v2 order)."""
    return (
        ["vertebrae_S1"]
        + [f"vertebrae_L{i}" for i in range(5, 0, -1)]
        + [f"vertebrae_T{i}" for i in range(12, 0, -1)]
        + [f"vertebrae_C{i}" for i in range(7, 0, -1)]
    )


def _totalseg() -> dict[int, str]:
    names = (
        ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas"]
        + _sides_rl("adrenal_gland")
        + ["lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right"]
        + ["lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus", "trachea"]
        + ["thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate"]
        + ["kidney_cyst_left", "kidney_cyst_right", "sacrum"]
        + _vertebrae()
        + ["heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk"]
        + _sides_rl("subclavian_artery", "common_carotid_artery")
        + ["brachiocephalic_vein_left", "brachiocephalic_vein_right", "atrial_appendage_left"]
        + ["superior_vena_cava", "inferior_vena_cava", "portal_vein_and_splenic_vein"]
        + _sides("iliac_artery", "iliac_vena", "humerus", "scapula", "clavicula", "femur", "hip")
        + ["spinal_cord"]
        + _sides("gluteus_maximus", "gluteus_medius", "gluteus_minimus")
        + _sides("autochthon", "iliopsoas")
        + ["brain", "skull"]
        + [f"rib_left_{i}" for i in range(1, 13)]
        + [f"rib_right_{i}" for i in range(1, 13)]
        + ["sternum", "costal_cartilages"]
    )
    return dict(enumerate(names, start=1))


def _totalseg_mr() -> dict[int, str]:
    names = (
        ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas"]
        + _sides_rl("adrenal_gland")
        + ["lung_left", "lung_right", "esophagus", "small_bowel", "duodenum", "colon"]
        + ["urinary_bladder", "prostate", "sacrum", "vertebrae", "intervertebral_discs"]
        + ["spinal_cord", "heart", "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein"]
        + _sides("iliac_artery", "iliac_vena", "humerus", "scapula", "clavicula", "femur", "hip")
        + _sides("gluteus_maximus", "gluteus_medius", "gluteus_minimus")
        + _sides("autochthon", "iliopsoas")
        + ["brain"]
    )
    return dict(enumerate(names, start=1))


def _abdomen() -> dict[int, str]:
    from ranreg.metrics import ORGAN_NAMES

    return dict(ORGAN_NAMES)


#: table name -> function building it
BUILTIN_TABLES = {"abdomen": _abdomen, "totalseg": _totalseg, "totalseg-mr": _totalseg_mr}


def load_label_names(spec: str | Path | None = None) -> dict[int, str]:
    """The id -> name table named by ``spec`` (a built-in name or a JSON/CSV file;
    None: :data:`DEFAULT_TABLE`)."""
    if spec is None:
        spec = DEFAULT_TABLE
    if str(spec) in BUILTIN_TABLES:
        return BUILTIN_TABLES[str(spec)]()
    path = Path(spec)
    if not path.is_file():
        known = ", ".join(BUILTIN_TABLES)
        raise RanregError(f"label names {spec}: not a file, nor a built-in table ({known})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RanregError(f"{path}: cannot read label names ({exc})") from None
    table = _parse_json(path, text) if path.suffix.lower() == ".json" else _parse_csv(path, text)
    if not table:
        raise RanregError(f"{path}: no label names found")
    return table


def _entry(path: Path, key: object, name: object) -> tuple[int, str]:
    try:
        label = int(str(key).strip())
    except ValueError:
        raise RanregError(f"{path}: label id {key!r} is not an integer") from None
    if label < 0 or not isinstance(name, str) or not name.strip():
        raise RanregError(f"{path}: bad entry {key!r}: {name!r} (need id >= 0 and a name)")
    return label, name.strip()


def _parse_json(path: Path, text: str) -> dict[int, str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RanregError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(data, dict):
        pairs = list(data.items())
    elif isinstance(data, list) and all(isinstance(d, dict) for d in data):
        pairs = [(d.get("id"), d.get("name")) for d in data]
    else:
        raise RanregError(f"{path}: expected {{id: name}} or [{{id, name}}, ...]")
    return dict(_entry(path, k, v) for k, v in pairs)


def _parse_csv(path: Path, text: str) -> dict[int, str]:
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if rows and not rows[0][0].strip().lstrip("-").isdigit():
        rows = rows[1:]  # header line
    if any(len(r) < 2 for r in rows):
        raise RanregError(f"{path}: every line needs two columns: id,name")
    return dict(_entry(path, r[0], r[1]) for r in rows)


def label_name(table: dict[int, str], label: int) -> str:
    """The name of ``label`` in ``table``, or ``label N``."""
    return table.get(int(label), f"label {int(label)}")
