"""Writing files and folders so that nobody ever sees half of one: the helpers every
writer uses.

:func:`atomic_file` hands out a temporary sibling of the target (same folder, so the final
``os.replace`` is atomic; the extension kept, so writers that choose a format by it still
work); :func:`new_file` never replaces an existing file. :func:`new_output_dir` does the
same for a result folder that must not exist yet.
When the block succeeds the temporary replaces the target; when it fails, or the process
is interrupted, the temporary is removed and the target is untouched. A temporary is named
``.NAME.PID.*tmp*`` after its target and its process, so that a later run can tell a
killed writer's leftovers from a live one's and remove them
(:func:`remove_stale_temporaries`). Checkpoints, which replace a folder, are written by
:mod:`ranreg.checkpoint` the same way.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ranreg.errors import RanregError

__all__ = [
    "atomic_file",
    "check_out_dir",
    "new_file",
    "new_output_dir",
    "remove_stale_temporaries",
    "temporary_sibling",
    "write_text_atomic",
]


def _prefix(target: Path) -> str:
    """``.NAME.PID.``: the start of every temporary this process writes for ``target``."""
    return f".{target.name}.{os.getpid()}."


def temporary_sibling(path: Path, suffix: str | None = None) -> Path:
    """A hidden, unique name beside ``path`` ending in its extension (``suffix`` overrides
    it: ``.nii.gz`` is one extension)."""
    ext = path.suffix if suffix is None else suffix
    return path.with_name(f"{_prefix(path)}{uuid.uuid4().hex[:8]}.tmp{ext}")


@contextmanager
def atomic_file(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """``with atomic_file(p) as tmp: write(tmp)``: ``p`` appears whole or not at all."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target, suffix)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def new_file(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """``with new_file(p) as tmp: write(tmp)``: like :func:`atomic_file`, but ``p`` must
    not exist: the finished file is linked into place, which fails rather than replace a
    file that appeared meanwhile (RanregError)."""
    target = Path(path)
    if target.exists() or target.is_symlink():
        raise RanregError(f"{target}: exists; refusing to overwrite it")
    tmp = temporary_sibling(target, suffix)
    try:
        yield tmp
        try:
            os.link(tmp, target)  # atomic and never overwrites
        except FileExistsError:
            raise RanregError(f"{target}: exists; refusing to overwrite it") from None
        except OSError:  # a file system without hard links
            if target.exists() or target.is_symlink():
                raise RanregError(f"{target}: exists; refusing to overwrite it") from None
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def check_out_dir(out_dir: str | os.PathLike[str]) -> None:
    """Refuse an output folder that exists as a file or holds anything (never overwrite)."""
    out = Path(out_dir)
    if out.is_symlink():  # also a dangling one: writing through it would land elsewhere
        raise RanregError(f"{out}: is a symbolic link; give a real folder path")
    if out.exists():
        if not out.is_dir():
            raise RanregError(f"{out}: exists and is not a directory")
        if any(out.iterdir()):
            raise RanregError(
                f"{out}: output folder exists and is not empty; refusing to overwrite"
            )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporary siblings of ``target`` (folders or files) whose process no
    longer runs (what a killed run leaves); a running one's stay. Returns them."""
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    name = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[^.]+\.tmp(\..+)?")
    for path in target.parent.iterdir():
        found = name.fullmatch(path.name)
        if found and not _alive(int(found.group(1))):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
            removed.append(path)
    return removed


def _first_missing(path: Path) -> Path | None:
    missing = None
    p = path.absolute()
    while not p.exists():
        missing = p
        p = p.parent
    return missing


@contextmanager
def new_output_dir(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """``with new_output_dir(out) as tmp: write into tmp``: the folder ``out`` (which must
    not exist, or be empty) appears whole or not at all. Parents it had to create are
    removed again on failure; a killed writer's leftovers beside ``out`` are removed first.
    """
    out = Path(out_dir)
    check_out_dir(out)
    created = _first_missing(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(out), suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        check_out_dir(out)  # someone may have filled it meanwhile
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
