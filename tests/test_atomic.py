"""``ranreg.atomic``: files and folders appear whole or not at all, an existing file is
never replaced, and a dead writer's temporaries are told from a live one's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ranreg.atomic import new_file, new_output_dir, remove_stale_temporaries, temporary_sibling
from ranreg.errors import RanregError


def _dead_pid() -> str:
    code = "import os; print(os.getpid())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip


def test_new_file_appears_whole_and_never_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a.csv"
    with new_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".csv" and not target.exists()
        tmp.write_text("x")
    assert target.read_text() == "x"
    with pytest.raises(RanregError, match="exists"), new_file(target):
        pass
    other = tmp_path / "b.csv"
    with pytest.raises(RanregError, match="exists"), new_file(other) as tmp:
        tmp.write_text("new")
        other.write_text("someone else's")  # appears while we write
    assert other.read_text() == "someone else's"
    with pytest.raises(ValueError), new_file(tmp_path / "c.csv") as tmp:
        tmp.write_text("half")
        raise ValueError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv"]


def test_new_output_dir_leaves_nothing_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    with pytest.raises(ValueError), new_output_dir(out) as tmp:
        (tmp / "f").write_text("half")
        raise ValueError
    assert list(tmp_path.iterdir()) == []  # the parents it made are gone too
    with new_output_dir(out) as tmp:
        (tmp / "f").write_text("whole")
    assert (out / "f").read_text() == "whole"
    with pytest.raises(RanregError, match="not empty"), new_output_dir(out):
        pass


def test_only_a_dead_writers_temporaries_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "summary.csv"
    gone, mine = _dead_pid(), f".{os.getpid()}."
    dead_file = tmp_path / temporary_sibling(target).name.replace(mine, f".{gone}.", 1)
    live_file = temporary_sibling(target)
    dead_dir = tmp_path / f".summary.csv.{gone}.abc_12.tmp"
    for path in (dead_file, live_file):
        path.write_text("half")
    dead_dir.mkdir()
    unrelated = tmp_path / f".summary.csv.{gone}.notes"  # not a temporary's name
    unrelated.write_text("keep")
    removed = remove_stale_temporaries(target)
    assert sorted(removed) == sorted([dead_file, dead_dir])
    assert live_file.exists() and unrelated.exists()
