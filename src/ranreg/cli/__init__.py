"""Command line interface: ``ranreg <command> ...``.

Every sub-command is one thin module of this package (``ranreg.cli.register``, ...) with
an ``add_parser(subparsers)`` function that sets ``func`` on its parser; it is imported
only when its command runs, and it calls the Python API, which does the work. Option
groups shared by several commands live in :mod:`ranreg.cli.options`.
User errors (:class:`ranreg.errors.RanregError`, bad options) end with one
``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ranreg.errors import RanregError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + exits 2; keep it one line
        raise RanregError(f"{self.prog}: {message}")


#: command -> module that defines it (``add_parser``); imported only when needed, so that
#: one command does not pay for importing every other one
COMMANDS = {
    "summary": "ranreg.cli.summary",
    "models": "ranreg.cli.models",
    "data": "ranreg.cli.data",
    "train": "ranreg.cli.train",
    "register": "ranreg.cli.register",
    "apply": "ranreg.cli.apply",
    "demo": "ranreg.cli.demo",
    "evaluate": "ranreg.cli.evaluate",
    "separability": "ranreg.cli.separability",
}


#: one line per command for ``ranreg --help``, which then imports nothing heavy (torch,
#: MONAI, matplotlib): it answers in a fraction of a second
SUMMARIES = {
    "summary": "parameters, MACs, memory and per-level motion ranges of a model",
    "models": "the registration methods and packaged weights this installation knows",
    "data": "prepare data sets (synthetic CT images from label maps)",
    "train": "train a model from a YAML config (two stages)",
    "register": "register a moving image to a fixed one (or a cohort with --pairs)",
    "apply": "resample another image through a registration result (or its inverse)",
    "demo": "register a pair shipped with the package using the packaged model",
    "evaluate": "Dice/ASD/HD95, folding and runtime of models on every pair of a data set",
    "separability": "Theorem-1 motion-separability bound vs. networks at a sliding boundary",
}


def command_help(name: str) -> str:
    """The one-line help of a command (one text for ``ranreg --help`` and its parser)."""
    return SUMMARIES[name]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser of the command ``only``; without it, a parser that knows every
    command's name and one-line summary only (enough for ``--help`` and for errors)."""
    import importlib

    from ranreg import __version__

    parser = _Parser(prog="ranreg", description="Residual Aligner-based Network registration")
    parser.add_argument("--version", action="version", version=f"ranreg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, module in COMMANDS.items():
        if name == only:
            importlib.import_module(module).add_parser(sub)
        elif only is None:
            sub.add_parser(name, help=SUMMARIES.get(name, ""), add_help=False)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The command named by ``argv`` (its first word), if it is one."""
    return argv[0] if argv and argv[0] in COMMANDS else None


def _one_line_warning(message: Warning | str, category: type, *args: object, **kw: object) -> str:
    return f"warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    import logging
    import warnings

    warnings.formatwarning = _one_line_warning  # type: ignore[assignment]
    # nibabel logs the header fixes it makes (e.g. zero voxel sizes set to 1); ranreg's
    # readers check those fields themselves and report one error line
    logging.getLogger("nibabel").setLevel(logging.ERROR)
    try:
        words = list(sys.argv[1:] if argv is None else argv)
        parser = build_parser(_command(words))
        args = parser.parse_args(words)
        return int(args.func(args) or 0)
    except RanregError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (e.g. `| head`): stop quietly, like Unix tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        # the file system refused (read-only, full, permissions): the writers clean up their
        # temporary files; the user gets one line
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
