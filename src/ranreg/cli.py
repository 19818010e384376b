"""Command line interface: ``ranreg <command> ...``.

Every sub-command lives in the module that does its work and registers itself here
through an ``add_parser(subparsers)`` function that sets ``func`` on its parser.
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


def build_parser() -> argparse.ArgumentParser:
    from ranreg import demo, evaluate, infer, separability, summary, train
    from ranreg.data import commands as data_commands

    parser = _Parser(prog="ranreg", description="Residual Aligner-based Network registration")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    summary.add_parser(sub)
    data_commands.add_parser(sub)
    train.add_parser(sub)
    infer.add_parser(sub)
    demo.add_parser(sub)
    evaluate.add_parser(sub)
    separability.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
