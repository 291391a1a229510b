"""``isg`` command line: one subcommand per module in this package.

Each module ``isg/cli/<name>.py`` defines ``register(subparsers)``, which adds
its parser and sets ``func`` (a callable taking the parsed args and returning
an exit code). The CLI only wires library functions together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = ("info", "synth", "manifest", "preprocess", "select", "extract", "train", "predict", "demo", "bench")


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    from isg import __version__

    parser = argparse.ArgumentParser(prog="isg", description="ISG: gene expression from H&E whole-slide images")
    parser.add_argument("--version", action="version", version=f"isg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"isg.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"isg.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"isg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
