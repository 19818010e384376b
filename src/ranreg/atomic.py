"""Writing a file so that nobody ever sees half of it: one helper for every writer.

:func:`atomic_file` hands out a temporary sibling of the target (same folder, so the final
``os.replace`` is atomic; the extension kept, so writers that choose a format by it still
work). When the block succeeds the temporary file replaces the target; when it fails, or
the process is interrupted, the temporary file is removed and the target is untouched.
Folders are written the same way by :mod:`ranreg.outputs` and :mod:`ranreg.checkpoint`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_file", "temporary_sibling", "write_text_atomic"]


def temporary_sibling(path: Path, suffix: str | None = None) -> Path:
    """A hidden, unique name beside ``path`` with its extension (``suffix`` overrides it:
    ``.nii.gz`` is one extension)."""
    ext = path.suffix if suffix is None else suffix
    stem = path.name[: len(path.name) - len(ext)] if ext else path.name
    return path.with_name(f".{stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{ext}")


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


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
