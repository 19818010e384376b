"""The wheel built from the repository carries what `ranreg demo` needs (the packaged
model with its config and card, the demo pair) and says its version."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import ranreg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here (no build backend?): {proc.stderr[-300:]}")
    (path,) = out.glob("ranreg-*.whl")
    return path


def test_wheel_holds_models_demo_data_and_every_module(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "ranreg/pretrained/ran3-abdomen-weak.safetensors",
        "ranreg/pretrained/ran3-abdomen-weak.json",
        "ranreg/pretrained/ran3-abdomen-weak.md",
        "ranreg/pretrained/ran3-abdomen-synth.safetensors",
        "ranreg/pretrained/ran3-abdomen-synth.md",
        "ranreg/demo_data/fixed_image.nii.gz",
        "ranreg/demo_data/moving_labels.nii.gz",
        "ranreg/py.typed",
    ):
        assert required in names, required
    sources = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src").rglob("*.py")}
    assert sources <= names, sorted(sources - names)


def test_version_is_one_and_the_changelog_knows_it(wheel: Path) -> None:
    assert f"ranreg-{ranreg.__version__}-" in wheel.name
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(rf'^version = "{re.escape(ranreg.__version__)}"$', pyproject, re.M)
    assert f"## {ranreg.__version__} " in (ROOT / "CHANGELOG.md").read_text()


@pytest.mark.parametrize("module", ["ranreg", "ranreg.cli"])
def test_python_m_runs_the_command(module: str, tmp_path: Path) -> None:
    """`python -m ranreg` is the `ranreg` command: its version, and a bad file as one error
    line with exit code 2."""
    run = [sys.executable, "-m", module]
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0
    assert version.stdout.strip() == f"ranreg {ranreg.__version__}"
    missing = str(tmp_path / "missing.nii.gz")
    args = ["register", "--fixed", missing, "--moving", missing, "--out", str(tmp_path / "o")]
    bad = subprocess.run([*run, *args], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
    assert not (tmp_path / "o").exists()
