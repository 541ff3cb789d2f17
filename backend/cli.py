"""The ``voltcredit`` command: a root that finds its sub-commands as entry-point plugins.

Each package registers ``name = "package.cli:register"`` in the ``voltcredit.commands``
entry-point group; ``register(subparsers)`` adds its sub-command and sets ``func`` on
the parser, a callable taking the parsed namespace and returning an exit code. The
root imports nothing from the other packages, so the dependency rules of DESIGN §2 hold.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

Register = Callable[[Any], None]


def build_parser() -> argparse.ArgumentParser:
    """The root parser with every installed sub-command."""
    parser = argparse.ArgumentParser(
        prog="voltcredit",
        description="voltcredit: prepaid energy platform (meters, gateways, backend).",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="voltcredit.commands"), key=lambda e: e.name):
        register: Register = ep.load()
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, configure logging, run the chosen sub-command; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    code: int = func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
