"""``ranreg apply --points``: landmark CSVs mapped through a result, checked against an
analytic affine field, its inverse, and ANTs' own point mapping of the same ``ddf.nii.gz``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ranreg.cli import main
from ranreg.transform import Grid, Transform

SHAPE = (20, 16, 24)
LPS = np.array([-1.0, -1.0, 1.0])


def oblique_grid() -> Grid:
    """Anisotropic voxels (2, 1.5, 3 mm), rotated 20 degrees about z, with an origin."""
    t = math.radians(20)
    rot = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([2.0, 1.5, 3.0])
    affine[:3, 3] = (-15.0, 30.0, -40.0)
    return Grid(SHAPE, affine)


def grid_points(grid: Grid) -> np.ndarray:
    vox = np.stack(np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij"), axis=-1)
    return vox @ grid.affine[:3, :3].T + grid.affine[:3, 3]


def affine_map() -> np.ndarray:
    """A 6-degree rotation about an oblique axis, a 2 % scaling and a shift (RAS)."""
    k = np.array([1.0, 2.0, 2.0]) / 3.0
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = math.radians(6)
    rot = np.eye(3) + math.sin(t) * cross + (1 - math.cos(t)) * cross @ cross
    out = np.eye(4)
    out[:3, :3] = 1.02 * rot
    out[:3, 3] = (3.0, -2.0, 4.5)
    return out


def save_field(folder: Path, grid: Grid, ddf: np.ndarray) -> Path:
    Transform(ddf.astype(np.float32), grid, target=grid).save(folder)
    return folder


def inside_points(grid: Grid, n: int, seed: int = 0) -> np.ndarray:
    """``n`` random world points well inside ``grid`` (RAS)."""
    vox = np.random.default_rng(seed).uniform(2.0, np.asarray(grid.shape) - 3.0, (n, 3))
    return vox @ grid.affine[:3, :3].T + grid.affine[:3, 3]


def write_csv(path: Path, points: np.ndarray, sign: np.ndarray = LPS) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "X", "y", "z", "t"])
        for i, p in enumerate(points * sign):
            w.writerow([f"lm{i}", *(f"{v:.6f}" for v in p), "0"])
    return path


def read_csv(path: Path) -> tuple[list[str], list[list[str]], np.ndarray]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    xyz = np.array([[float(r[1]), float(r[2]), float(r[3])] for r in rows[1:]])
    return rows[0], rows[1:], xyz


@pytest.fixture
def affine_result(tmp_path: Path) -> tuple[Path, np.ndarray]:
    grid, t = oblique_grid(), affine_map()
    p = grid_points(grid)
    ddf = p @ t[:3, :3].T + t[:3, 3] - p  # u(p) = T p - p: exact under linear interpolation
    return save_field(tmp_path / "result", grid, ddf), t


def test_points_go_from_fixed_to_moving_as_the_field_says(affine_result, tmp_path, capsys):
    folder, t = affine_result
    p = inside_points(oblique_grid(), 12)
    expected = p @ t[:3, :3].T + t[:3, 3]
    # LPS (the default: ITK, ANTs, Slicer): x and y are negated RAS
    src = write_csv(tmp_path / "fixed_points.csv", p)
    argv = ["apply", "--transform", str(folder), "--points", str(src)]
    assert main([*argv, "--out", str(tmp_path / "moving_points.csv")]) == 0
    assert "mapped 12 points (LPS, mm)" in capsys.readouterr().out
    header, rows, xyz = read_csv(tmp_path / "moving_points.csv")
    assert header == ["name", "X", "y", "z", "t"]
    assert [r[0] for r in rows] == [f"lm{i}" for i in range(12)] and {r[4] for r in rows} == {"0"}
    np.testing.assert_allclose(xyz * LPS, expected, atol=1e-3)
    # the same points in RAS come back in RAS
    src = write_csv(tmp_path / "ras.csv", p, np.ones(3))
    out = tmp_path / "ras_out.csv"
    assert main([*argv[:3], "--points", str(src), "--out", str(out), "--coordinates", "ras"]) == 0
    np.testing.assert_allclose(read_csv(out)[2], expected, atol=1e-3)


def test_inverse_brings_the_moving_points_back(affine_result, tmp_path, capsys):
    folder, t = affine_result
    p = inside_points(oblique_grid(), 10, seed=1)
    moved = p @ t[:3, :3].T + t[:3, 3]
    src = write_csv(tmp_path / "moving_points.csv", moved)
    out = tmp_path / "back.csv"
    argv = ["apply", "--transform", str(folder), "--points", str(src), "--out", str(out)]
    assert main([*argv, "--inverse"]) == 0
    text = capsys.readouterr().out
    assert "from the moving space to the fixed space" in text and "residual at most" in text
    np.testing.assert_allclose(read_csv(out)[2] * LPS, p, atol=1e-3)


def test_mapping_matches_ants_on_a_smooth_field(tmp_path):
    pytest.importorskip("ants")
    from ranreg.peers import import_ants

    # ITK reads its thread count once, when first loaded: through import_ants, so that the
    # ants-syn tests that run after this one stay deterministic
    ants = import_ants()
    pd = pytest.importorskip("pandas")
    grid = oblique_grid()
    p = grid_points(grid)
    centre = grid.affine[:3, :3] @ (np.asarray(SHAPE) - 1) / 2 + grid.affine[:3, 3]
    bump = np.exp(-((p - centre) ** 2).sum(-1) / (2 * 12.0**2))[..., None]
    ddf = bump * np.array([4.0, -3.0, 2.5]) + np.sin(p / 9.0)  # smooth, not affine
    folder = save_field(tmp_path / "result", grid, ddf)
    points = inside_points(grid, 25, seed=2)
    src = write_csv(tmp_path / "pts.csv", points)
    out = tmp_path / "mapped.csv"
    argv = ["apply", "--transform", str(folder), "--points", str(src), "--out", str(out)]
    assert main(argv) == 0
    lps = points * LPS
    frame = pd.DataFrame({"x": lps[:, 0], "y": lps[:, 1], "z": lps[:, 2]})
    theirs = ants.apply_transforms_to_points(3, frame, [str(folder / "ddf.nii.gz")])
    np.testing.assert_allclose(read_csv(out)[2], theirs[["x", "y", "z"]].to_numpy(), atol=1e-4)
    moved = np.linalg.norm(read_csv(out)[2] - lps, axis=1)
    assert moved.max() > 2.0  # the check means something: the points did move


def test_points_outside_the_field_are_mapped_with_a_warning(affine_result, tmp_path, capsys):
    folder, _ = affine_result
    p = np.vstack([inside_points(oblique_grid(), 3), [[500.0, 500.0, 500.0]]])
    src = write_csv(tmp_path / "p.csv", p)
    out = tmp_path / "o.csv"
    assert main(["apply", "--transform", str(folder), "--points", str(src), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 of 4 points lie outside the field's grid" in err
    assert len(read_csv(out)[1]) == 4


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("name,a,b,c\np,1,2,3\n", [], "no columns x, y and z"),
        ("x,y,z\n1,two,3\n", [], "line 2: y: 'two' is not a finite number"),
        ("x,y,z\n\n1,2,nan\n", [], "line 3: z: 'nan' is not a finite number"),
        ("x,y,z\n1,2\n", [], "line 2 has 2 fields, the header 3"),
        ("x,y,z\n", [], "no points"),
        ("x,y,z\n1,2,3\n", ["--labels"], "--labels is for --image"),
        ("x,y,z\n1,2,3\n", ["--interp", "nearest"], "--interp is for --image"),
    ],
)
def test_bad_points_files_and_options_are_one_error_line(
    affine_result, tmp_path, capsys, content, extra, message
):
    folder, _ = affine_result
    src = tmp_path / "p.csv"
    src.write_text(content)
    out = tmp_path / "o.csv"
    argv = ["apply", "--transform", str(folder), "--points", str(src), "--out", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out.exists() and not [q for q in tmp_path.iterdir() if q.name.startswith(".o")]


def test_points_output_is_never_overwritten_and_must_be_csv(affine_result, tmp_path, capsys):
    folder, _ = affine_result
    src = write_csv(tmp_path / "p.csv", inside_points(oblique_grid(), 2))
    existing = tmp_path / "o.csv"
    existing.write_text("keep me")
    base = ["apply", "--transform", str(folder), "--points", str(src), "--out"]
    assert main([*base, str(existing)]) == 2
    assert existing.read_text() == "keep me"
    assert main([*base, str(tmp_path / "o.txt")]) == 2
    assert main(["apply", "--transform", str(folder), "--image", str(src), "--out",
                 str(tmp_path / "x.nii.gz"), "--coordinates", "ras"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error:") for line in err)
    assert "exists" in err[0] and "*.csv" in err[1] and "--coordinates is for --points" in err[2]


def _fcsv(points: np.ndarray, system: str) -> str:
    """A fiducial list as 3D Slicer 4.11+ writes it."""
    lines = [
        "# Markups fiducial file version = 4.11",
        f"# CoordinateSystem = {system}",
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
    ]
    for i, p in enumerate(points):
        xyz = ",".join(f"{v:.6f}" for v in p)
        lines.append(f'vtkMRMLMarkupsFiducialNode_{i},{xyz},0,0,0,1,1,1,0,F-{i},"a, b",')
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("system", "sign"), [("LPS", LPS), ("RAS", np.ones(3)), ("0", np.ones(3))])
def test_slicer_fiducial_lists_keep_their_system_and_fields(affine_result, tmp_path, system, sign):
    folder, t = affine_result
    p = inside_points(oblique_grid(), 5, seed=3)
    src = tmp_path / "F.fcsv"
    src.write_text(_fcsv(p * sign, system))
    out = tmp_path / "F_moving.fcsv"
    assert main(["apply", "--transform", str(folder), "--points", str(src), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[:3] == src.read_text().splitlines()[:3]  # version, system, columns kept
    rows = list(csv.reader(lines[3:]))
    assert [r[11] for r in rows] == [f"F-{i}" for i in range(5)] and rows[0][12] == "a, b"
    xyz = np.array([[float(v) for v in r[1:4]] for r in rows])
    np.testing.assert_allclose(xyz * sign, p @ t[:3, :3].T + t[:3, 3], atol=1e-3)


def test_slicer_markups_json_maps_every_placed_point_in_its_system(affine_result, tmp_path):
    folder, t = affine_result
    p = inside_points(oblique_grid(), 3, seed=4)
    point = {"label": "", "orientation": [-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0], "selected": True}
    content = {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/"
        "Markups/Resources/Schema/markups-schema-v1.0.3.json#",
        "markups": [
            {  # no coordinateSystem: LPS, as Slicer's schema says
                "type": "Fiducial",
                "controlPoints": [
                    {**point, "label": "a", "position": list(p[0] * LPS)},
                    {**point, "label": "not placed", "positionStatus": "undefined"},
                ],
                "display": {"color": [0.4, 1.0, 1.0]},
            },
            {
                "type": "Line",
                "coordinateSystem": "RAS",
                "controlPoints": [
                    {**point, "label": n, "position": list(q)}
                    for n, q in zip("bc", p[1:], strict=True)
                ],
            },  # fmt: skip
        ],
    }
    src = tmp_path / "L.mrk.json"
    src.write_text(json.dumps(content))
    out = tmp_path / "L_moving.mrk.json"
    assert main(["apply", "--transform", str(folder), "--points", str(src), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    expected = p @ t[:3, :3].T + t[:3, 3]
    first, second = got["markups"]
    np.testing.assert_allclose(np.array(first["controlPoints"][0]["position"]) * LPS, expected[0],
                               atol=1e-3)  # fmt: skip
    assert first["controlPoints"][1] == content["markups"][0]["controlPoints"][1]
    assert first["display"] == {"color": [0.4, 1.0, 1.0]} and got["@schema"] == content["@schema"]
    positions = [c["position"] for c in second["controlPoints"]]
    np.testing.assert_allclose(positions, expected[1:], atol=1e-3)
    assert [c["label"] for c in second["controlPoints"]] == ["b", "c"]


@pytest.mark.parametrize(("axes", "sign"), [("l,p,s", LPS), ("r,a,s", np.ones(3))])
def test_slicer_control_point_tables_name_their_system(affine_result, tmp_path, capsys, axes, sign):
    folder, t = affine_result
    p = inside_points(oblique_grid(), 4, seed=8)
    rows = [f"F-{i},{x:.6f},{y:.6f},{z:.6f},1,1,1,0," for i, (x, y, z) in enumerate(p * sign)]
    src = tmp_path / "table.csv"
    src.write_text(f"label,{axes},defined,selected,visible,locked,description\n" + "\n".join(rows))
    out = tmp_path / "moved.csv"
    argv = ["apply", "--transform", str(folder), "--points", str(src), "--out", str(out)]
    assert main(argv) == 0
    system = "LPS" if axes.startswith("l") else "RAS"
    assert f"mapped 4 points ({system}, mm)" in capsys.readouterr().out
    with out.open(newline="") as fh:
        got = list(csv.reader(fh))
    assert got[0][:4] == ["label", *axes.split(",")] and got[1][0] == "F-0"
    xyz = np.array([[float(v) for v in r[1:4]] for r in got[1:]])
    np.testing.assert_allclose(xyz * sign, p @ t[:3, :3].T + t[:3, 3], atol=1e-3)
    # the columns say the system: a system given as well is refused, not ignored
    assert main([*argv[:-1], str(tmp_path / "again.csv"), "--coordinates", "ras"]) == 2
    assert f"names its coordinate system ({system})" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"markups": 5}', "markups: expected a list of objects, got int"),
        ("[1, 2]", "no 'markups' list"),
        ("{not json", "not JSON"),
        ('{"markups": [{"controlPoints": {"a": 1}}]}', "points: expected a list of objects"),
        ('{"markups": [{"coordinateSystem": "XYZ", "controlPoints": []}]}', "expected LPS"),
        ('{"markups": [{"controlPoints": [{"position": [1, "a", 2]}]}]}', "'a' is not a finite"),
        ('{"markups": [{"controlPoints": [{"label": "unplaced"}]}]}', "no control point"),
    ],
)
def test_broken_markups_files_are_one_error_line(affine_result, tmp_path, capsys, content, message):
    folder, _ = affine_result
    src = tmp_path / "B.mrk.json"
    src.write_text(content)
    out = tmp_path / "o.mrk.json"
    assert main(["apply", "--transform", str(folder), "--points", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out.exists()


def test_slicer_files_refuse_a_coordinates_option_and_another_format(affine_result, tmp_path,
                                                                      capsys):  # fmt: skip
    folder, _ = affine_result
    src = tmp_path / "F.fcsv"
    src.write_text(_fcsv(inside_points(oblique_grid(), 2), "LPS"))
    base = ["apply", "--transform", str(folder), "--points", str(src), "--out"]
    assert main([*base, str(tmp_path / "o.fcsv"), "--coordinates", "ras"]) == 2
    assert main([*base, str(tmp_path / "o.csv")]) == 2
    bad = tmp_path / "B.mrk.json"
    bad.write_text('{"markups": [{"controlPoints": [{"position": [1, 2]}]}]}')
    assert main([*base[:3], "--points", str(bad), "--out", str(tmp_path / "o.mrk.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error:") for line in err)
    assert "names its coordinate system" in err[0] and "*.fcsv" in err[1]
    assert "expected 3 numbers" in err[2]
    assert not [q for q in tmp_path.iterdir() if q.name.startswith("o.")]


def moving_grid() -> Grid:
    """Another grid for the moving image: other voxel sizes, axes flipped, another origin."""
    affine = np.diag([-1.2, 2.5, 2.0, 1.0])
    affine[:3, 3] = (20.0, 10.0, -30.0)
    return Grid((24, 12, 30), affine)


def write_keypoints(path: Path, vox: np.ndarray) -> Path:
    """A Learn2Reg keypoint file: voxel indices, three per row, no header."""
    path.write_text("".join(",".join(f"{v:.6f}" for v in row) + "\n" for row in vox))
    return path


def to_voxel(points: np.ndarray, grid: Grid) -> np.ndarray:
    return np.linalg.solve(grid.affine[:3, :3], (points - grid.affine[:3, 3]).T).T


def test_voxel_keypoints_go_between_the_two_images_grids(tmp_path, capsys):
    """Learn2Reg keypoints: indices of the fixed image in, of the moving image out (and
    back with --inverse), through an analytic affine field."""
    fixed, moving, t = oblique_grid(), moving_grid(), affine_map()
    p = grid_points(fixed)
    folder = tmp_path / "result"
    Transform((p @ t[:3, :3].T + t[:3, 3] - p).astype(np.float32), fixed, target=moving).save(
        folder
    )
    vox = np.random.default_rng(3).uniform(2.0, np.asarray(SHAPE) - 3.0, (9, 3))
    world = vox @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
    expected = to_voxel(world @ t[:3, :3].T + t[:3, 3], moving)
    src = write_keypoints(tmp_path / "kp_0000.csv", vox)
    argv = ["apply", "--transform", str(folder), "--coordinates", "voxel", "--points"]
    assert main([*argv, str(src), "--out", str(tmp_path / "kp_0001.csv")]) == 0
    assert "mapped 9 points (voxel indices) of" in capsys.readouterr().out
    got = np.loadtxt(tmp_path / "kp_0001.csv", delimiter=",")
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert (
        main([*argv, str(tmp_path / "kp_0001.csv"), "--inverse", "--out", str(tmp_path / "b.csv")])
        == 0
    )
    np.testing.assert_allclose(np.loadtxt(tmp_path / "b.csv", delimiter=","), vox, atol=1e-3)
    # a header x, y, z is kept; the Slicer formats hold world points and refuse voxel
    with_header = tmp_path / "named.csv"
    with_header.write_text("x,y,z\n" + src.read_text())
    assert main([*argv, str(with_header), "--out", str(tmp_path / "named_out.csv")]) == 0
    assert (tmp_path / "named_out.csv").read_text().startswith("x,y,z\n")
    fcsv = tmp_path / "p.fcsv"
    fcsv.write_text("# columns = id,x,y,z\nvtk1,1,2,3\n")
    assert main([*argv, str(fcsv), "--out", str(tmp_path / "p_out.fcsv")]) == 2
    # keypoints without --coordinates voxel: no header, and the message says what to give
    plain = ["apply", "--transform", str(folder), "--points", str(src)]
    assert main([*plain, "--out", str(tmp_path / "w.csv")]) == 2
    # a result without the moving image's grid cannot say where its voxels are
    Transform(np.zeros((*SHAPE, 3), np.float32), fixed).save(tmp_path / "no-target")
    argv[2] = str(tmp_path / "no-target")
    assert main([*argv, str(src), "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error:") for line in err)
    assert "world points, not voxel indices" in err[0] and "does not record" in err[2]
    assert "no header x, y, z" in err[1] and "coordinates 'voxel'" in err[1]
    assert not any((tmp_path / n).exists() for n in ("p_out.fcsv", "w.csv", "x.csv"))


def test_inverse_at_points_needs_no_moving_grid_and_undoes_a_smooth_field() -> None:
    grid = oblique_grid()
    p = grid_points(grid)
    ddf = 3.0 * np.sin(p / 11.0) + np.array([5.0, -4.0, 2.0])  # smooth, not affine
    field = Transform(ddf.astype(np.float32), grid)  # target unknown: no moving grid
    fixed = inside_points(grid, 30, seed=5)
    moving = field.map_points(fixed)
    back, residual = field.unmap_points(moving)
    assert residual.max() < 1e-3
    np.testing.assert_allclose(back, fixed, atol=2e-3)
    assert np.linalg.norm(moving - fixed, axis=1).min() > 1.0  # the points did move


def test_inverse_at_points_converges_inside_a_strong_twist() -> None:
    # each shell of radius r about the centre turns rigidly by 90 * exp(-r^2 / 2 s^2)
    # degrees about z: one-to-one and fold-free, but its local rotation is far from the
    # field's best-fit affine map, where a plain fixed-point iteration stalls
    grid = oblique_grid()
    p = grid_points(grid)
    centre = grid.affine[:3, :3] @ (np.asarray(SHAPE) - 1) / 2 + grid.affine[:3, 3]
    d = p - centre
    theta = math.radians(90) * np.exp(-(d**2).sum(-1) / (2 * 9.0**2))
    c, s = np.cos(theta), np.sin(theta)
    turned = np.stack([c * d[..., 0] - s * d[..., 1], s * d[..., 0] + c * d[..., 1], d[..., 2]], -1)
    field = Transform((turned - d).astype(np.float32), grid)
    rng = np.random.default_rng(6)
    fixed = centre + rng.uniform(-8.0, 8.0, (40, 3)) * np.array([1.0, 1.0, 0.5])
    moving = field.map_points(fixed)
    back, residual = field.unmap_points(moving)
    assert residual.max() < 1e-3
    np.testing.assert_allclose(back, fixed, atol=0.05)  # linear interpolation of the twist
    assert np.linalg.norm(moving - fixed, axis=1).max() > 5.0
    # the inverse field (images through --inverse) finishes such points the same way
    inverse = field.inverse(grid)
    assert inverse.inversion["converged"] and inverse.inversion["newton_points"] > 0
    np.testing.assert_allclose(inverse.map_points(moving), fixed, atol=0.3)  # linear in w too
    # the rest is w's linear interpolation; the fixed-point iteration alone left 1.4 % of
    # the points up to 5.9 mm off and a round trip of up to 4.4 mm here
    assert inverse.inversion["residual_mm"]["max"] < 1e-3 and inverse.round_trip_mm["max"] < 0.5


def _images(folder: Path) -> tuple[Path, Path]:
    from tests.helpers import smooth_image

    a = np.diag([3.0, 3.0, 3.0, 1.0])
    for name, seed in (("f", 5), ("m", 6)):
        nib.save(
            nib.Nifti1Image(smooth_image((20, 18, 16), seed) * 500, a), folder / f"{name}.nii.gz"
        )
    return folder / "f.nii.gz", folder / "m.nii.gz"


def test_register_reports_the_landmark_error_before_and_after(tmp_path, capsys):
    """The identity model started from a known affine T (``--affine none``) maps p to T p
    exactly, so fixed landmarks F and moving landmarks T F end with zero error."""
    from ranreg.affine import write_itk_affine
    from ranreg.api import register

    fixed, moving = _images(tmp_path)
    t = affine_map()
    start = write_itk_affine(tmp_path / "t.txt", t)
    inside = np.random.default_rng(7).uniform(6.0, 42.0, (8, 3))  # in the 60x54x48 mm box
    moved = inside @ t[:3, :3].T + t[:3, 3]
    f_csv = write_csv(tmp_path / "F.csv", inside)
    m_csv = write_csv(tmp_path / "M.csv", moved)
    argv = ["register", "--fixed", str(fixed), "--moving", str(moving), "--model", "identity"]
    argv += ["--affine", "none", "--initial-affine", str(start)]
    marks = ["--fixed-landmarks", str(f_csv), "--moving-landmarks", str(m_csv)]
    assert main([*argv, *marks, "--save-inverse", "--out", str(tmp_path / "out")]) == 0
    lm = json.loads((tmp_path / "out" / "metrics.json").read_text())["landmarks"]
    # --save-inverse: T^-1 q - q on the moving grid, in the DISPVECT convention of ddf.nii.gz
    inv = nib.load(tmp_path / "out" / "inverse_ddf.nii.gz")
    q = grid_points(Grid(inv.shape[:3], inv.affine))
    t_inv = np.linalg.inv(t)
    pre = q @ t_inv[:3, :3].T + t_inv[:3, 3]  # where each moving point comes from
    known = np.all((pre > 3.0) & (pre < 42.0), axis=-1)  # well inside the fixed image
    got = np.asarray(inv.dataobj)[..., 0, :]
    np.testing.assert_allclose(got[known], (pre - q)[known], atol=1e-3)
    assert inv.header.get_intent()[0] == "displacement vector"
    before = np.linalg.norm(inside - moved, axis=1)
    assert lm["count"] == 8 and lm["outside"] == 0 and lm["fixed"] == str(f_csv)
    assert lm["before_mm"]["mean"] == pytest.approx(before.mean(), abs=1e-4)
    assert lm["before_mm"]["max"] == pytest.approx(before.max(), abs=1e-4)
    assert lm["after_mm"]["max"] < 1e-3 < before.min()
    text = capsys.readouterr().out
    assert f"landmark error (8 points) before -> after: mean {before.mean():.2f} -> 0.00 mm" in text
    assert "inverse_ddf.nii.gz: round-trip error mean 0.000 mm" in text
    # the API takes arrays (RAS) as well as files
    api = register(fixed, moving, model="identity", affine="none", initial_affine=t,
                   fixed_landmarks=inside, moving_landmarks=m_csv)  # fmt: skip
    assert api.metrics["landmarks"]["fixed"] == "array"
    assert api.metrics["landmarks"]["after_mm"]["max"] < 1e-3
    api.save(tmp_path / "api", inverse=True)
    saved = json.loads((tmp_path / "api" / "metrics.json").read_text())
    assert saved["inverse"]["round_trip_mm"]["max"] < 1e-3 and saved["landmarks"]["count"] == 8
    assert (tmp_path / "api" / "inverse_ddf.nii.gz").is_file()
    # Learn2Reg keypoints: voxel indices of each image (3 mm grids; the moving one shifted)
    origin = np.array([6.0, -3.0, 9.0])
    shifted = np.diag([3.0, 3.0, 3.0, 1.0])
    shifted[:3, 3] = origin
    image = np.asarray(nib.load(moving).dataobj)
    nib.save(nib.Nifti1Image(image, shifted), tmp_path / "m_shifted.nii.gz")
    f_kp = write_keypoints(tmp_path / "F_kp.csv", inside / 3.0)
    m_kp = write_keypoints(tmp_path / "M_kp.csv", (moved - origin) / 3.0)
    voxel = register(fixed, tmp_path / "m_shifted.nii.gz", model="identity", affine="none",
                     initial_affine=t,
                     fixed_landmarks=f_kp, moving_landmarks=m_kp,
                     landmark_coordinates="voxel")  # fmt: skip
    assert voxel.metrics["landmarks"]["before_mm"]["mean"] == pytest.approx(before.mean())
    assert voxel.metrics["landmarks"]["after_mm"]["max"] < 1e-3
    # a cohort: the landmark files in columns, the mean errors in summary.csv
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "fixed,moving,initial_affine,fixed_landmarks,moving_landmarks,name\n"
        "f.nii.gz,m.nii.gz,t.txt,F.csv,M.csv,p1\n"
    )
    cohort = ["register", "--pairs", str(pairs), "--out", str(tmp_path / "cohort")]
    assert main([*cohort, "--model", "identity", "--affine", "none"]) == 0
    with (tmp_path / "cohort" / "summary.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert float(row["landmark_error_before_mm"]) == pytest.approx(before.mean(), abs=1e-3)
    assert float(row["landmark_error_after_mm"]) < 1e-3


def test_landmarks_that_do_not_pair_are_refused_before_registering(tmp_path, capsys):
    fixed, moving = _images(tmp_path)
    f_csv = write_csv(tmp_path / "F.csv", np.ones((3, 3)))
    m_csv = write_csv(tmp_path / "M.csv", np.ones((2, 3)))
    argv = ["register", "--fixed", str(fixed), "--moving", str(moving), "--model", "identity"]
    out = ["--out", str(tmp_path / "out")]
    assert (
        main([*argv, *out, "--fixed-landmarks", str(f_csv), "--moving-landmarks", str(m_csv)]) == 2
    )
    assert main([*argv, *out, "--fixed-landmarks", str(f_csv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error:") for line in err)
    assert "3 fixed and 2 moving points" in err[0] and "give both" in err[1]
    assert not (tmp_path / "out").exists()
