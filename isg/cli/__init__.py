"""``isg`` command line: one subcommand per module in this package.

Each module ``isg/cli/<name>.py`` defines ``register(subparsers)``, which adds
its parser and sets ``func`` (a callable taking the parsed args and returning
an exit code). The CLI only wires library functions together.

Before anything imports torch, the CLI sets ``OMP_WAIT_POLICY=PASSIVE`` unless
the user chose a policy: OpenMP's default busy-waiting threads make CPU training
several times slower on shared or oversubscribed machines (HPC nodes, laptops).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when the OpenMP runtime starts (torch import)
os.environ.setdefault("MPLBACKEND", "Agg")  # figures are written to files; no display needed

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

SUBCOMMANDS = ("info", "synth", "manifest", "preprocess", "select", "extract", "train", "predict", "demo", "paper", "bench")


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (unless it has none or the text already names it)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        no_default = action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0  # flags
        if "default" in text.lower() or no_default or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose help shows defaults; subcommand parsers inherit the class."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def defaults_of(cls) -> dict:
    """Field defaults of a dataclass: the one definition CLI options read theirs from."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def add_quiet(parser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars (results and errors are still printed)")


def quiet_other_ranks(ranks) -> None:
    """Under torchrun, only rank 0 talks: the other ranks log errors only and show no warnings."""
    if ranks.is_main:
        return
    logging.getLogger("isg").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


def _show_warning_once(shown: set):
    """``warnings.showwarning`` replacement: each message once, in words, without the source line."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if text in shown:
            return
        shown.add(text)
        print(f"warning: {text}", file=file or sys.stderr, flush=True)

    return show


def build_parser() -> argparse.ArgumentParser:
    from isg import __version__

    parser = Parser(prog="isg", description="ISG: gene expression from H&E whole-slide images")
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


def configure_output(verbose: bool = False) -> None:
    """isg's own log lines at INFO (DEBUG with -v), other libraries' only from WARNING; warnings once each."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("isg").setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    if not verbose and not getattr(warnings.showwarning, "_isg", False):
        warnings.showwarning = _show_warning_once(set())
        warnings.showwarning._isg = True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_output(args.verbose)
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
