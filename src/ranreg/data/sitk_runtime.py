"""SimpleITK at run time: import it on first use (a :class:`~ranreg.errors.RanregError`
saying how to install it when missing), keep ITK's console output off the terminal while
reading, and turn its exceptions into one-line reasons (:func:`itk_reason`).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from ranreg.errors import RanregError

__all__ = ["QuietITK", "import_simpleitk", "itk_reason"]


def import_simpleitk(path: str | os.PathLike[str] | None = None) -> ModuleType:
    """SimpleITK, imported on first use; a :class:`RanregError` saying how to install it."""
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        where = "" if path is None else f"{path}: "
        what = "NRRD, MetaImage and DICOM files are read and written"
        if path is not None and Path(path).is_dir():
            where += "is a directory; "
            what = "DICOM series are read"
        raise RanregError(
            f"{where}{what} with SimpleITK, which is not installed: pip install SimpleITK"
        ) from exc
    return sitk


def itk_reason(exc: BaseException) -> str:
    """The useful part of a SimpleITK/ITK exception on one line, with what the C++ readers
    printed on stderr meanwhile (MetaIO and GDCM explain failures there)."""
    lines = []
    for raw in [*str(exc).splitlines(), *QuietITK.printed().splitlines()]:
        line = raw.strip()
        if not line or line.startswith("Exception thrown in SimpleITK"):
            continue
        line = re.sub(r"^(sitk::ERROR|itk::ERROR|ITK ERROR):\s*", "", line)
        line = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", line).rstrip(":").strip()
        # drop teem's call-chain lines ("[nrrd] nrrdRead: trouble") and ITK's "Reason: "
        # (strerror of a stale errno, e.g. "Success")
        if re.fullmatch(r"\[\w+\] \w+(: trouble.*)?", line) or line.startswith("Reason:"):
            continue
        if line and line not in lines:
            lines.append(line)
    if len(lines) > 3:  # the summary and the innermost cause
        lines = [lines[0], *lines[-2:]]
    text = "; ".join(lines) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


class QuietITK:
    """Keep ITK's and its readers' console output (warnings on stderr, MetaIO's and GDCM's
    messages) off the terminal while reading: ranreg reports what matters as one line.

    ITK warnings are switched off, and file descriptor 2 goes to a temporary file whose
    text :func:`itk_reason` adds to an error. One reader at a time (a lock), so that the
    descriptor is always restored to what it was.
    """

    _lock = threading.RLock()
    _active: QuietITK | None = None

    def __init__(self, sitk: ModuleType) -> None:
        self.sitk = sitk
        self.before = True
        self.saved_fd: int | None = None
        self.capture: Any = None

    def __enter__(self) -> QuietITK:
        self._lock.acquire()
        process = self.sitk.ProcessObject
        self.before = bool(process.GetGlobalWarningDisplay())
        process.SetGlobalWarningDisplay(False)
        if hasattr(os, "pread"):
            try:
                sys.stderr.flush()
                self.capture = tempfile.TemporaryFile()
                self.saved_fd = os.dup(2)
                os.dup2(self.capture.fileno(), 2)
            except (OSError, ValueError, AttributeError):
                self._restore()
        type(self)._active = self
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            type(self)._active = None
            self._restore()
            self.sitk.ProcessObject.SetGlobalWarningDisplay(self.before)
        finally:
            self._lock.release()

    def _restore(self) -> None:
        if self.saved_fd is not None:
            os.dup2(self.saved_fd, 2)
            os.close(self.saved_fd)
            self.saved_fd = None
        if self.capture is not None:
            self.capture.close()
            self.capture = None

    @classmethod
    def printed(cls) -> str:
        """What was printed on stderr so far inside the active block ('' outside one)."""
        quiet = cls._active
        if quiet is None or quiet.capture is None:
            return ""
        try:
            fd = quiet.capture.fileno()
            return os.pread(fd, min(os.fstat(fd).st_size, 4096), 0).decode(errors="replace")
        except (OSError, ValueError):
            return ""
