"""``ranreg models``: the registration methods and packaged weights this installation knows."""

from __future__ import annotations

import argparse
import json


def _run(args: argparse.Namespace) -> int:
    from ranreg.registry import get_method, list_methods, list_pretrained, packaged

    default = packaged()[2]

    methods = [get_method(n) for n in list_methods()]
    weights = list_pretrained()
    if args.json:
        rows = [{"name": m.name, "kind": m.kind, "summary": m.summary} for m in methods]
        print(json.dumps({"methods": rows, "pretrained": weights, "default": default}))
        return 0
    print("packaged weights (ARCH.TAG, use with --model):")
    for name in weights:
        print(f"  {name}{'  (default)' if name == default else ''}")
    for kind, title in (
        ("reference", "reference"),
        ("peer", "classical methods (--model NAME)"),
        ("network", "architectures (configs' model.name; untrained)"),
    ):
        print(f"{title}:")
        for m in methods:
            if m.kind == kind:
                print(f"  {m.name:<16} {m.summary}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ranreg.cli import command_help

    p = sub.add_parser("models", help=command_help("models"), description=command_help("models"))
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_run)
