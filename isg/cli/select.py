"""``isg select``: re-apply a selection rule to the scores stored by ``isg preprocess`` (no slide is read).

Exit code 0 on success, 2 on bad arguments or unreadable files.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from isg.cli._rules import add_rule_arguments, rule_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "select", help="re-apply a selection rule to stored patch scores (<slide_id>.h5 of isg preprocess)",
        description="Rewrite the selection of preprocess outputs from their stored scores, without reading slides. "
                    "--rule cohort freezes mean + n_sigma std over every file's scores as one absolute cut (the "
                    "paper's rule) and records it in <folder>/selection.json; --from-selection reuses a frozen cut "
                    "(new slides never move it). Features already extracted are kept when the new selection is a "
                    "subset of the old one, else dropped (run isg extract again).")
    parser.add_argument("h5", nargs="+", metavar="H5", help="preprocess outputs: .h5 files or folders of them")
    add_rule_arguments(parser)
    parser.add_argument("--from-selection", metavar="JSON",
                        help="selection.json of a training cohort: apply its rule and frozen cut")
    parser.add_argument("--out", help="write the files here (default: rewrite them in place)")
    parser.set_defaults(func=run)


def _h5_paths(names) -> list[Path]:
    from isg.cli import CLIError
    from isg.utils import h5_sources

    paths = []
    for name in names:
        path = Path(name)
        if path.is_dir():
            try:
                paths += h5_sources(path)
            except ValueError:
                raise CLIError(f"folder {path} holds no .h5 files") from None
        elif path.is_file():
            paths.append(path)
        else:
            raise CLIError(f"{path}: no such file or folder")
    return paths


def _rule(args):
    from isg.cli import CLIError
    from isg.select import SelectionRule

    if args.from_selection:
        if rule_from_args(args) is not None:
            raise CLIError("--from-selection takes its rule from the file: drop --rule/--threshold/--top-k/--n-sigma")
        path = Path(args.from_selection)
        try:
            record = json.loads(path.read_text())
            return SelectionRule.from_dict(record["rule"]), record
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CLIError(f"--from-selection {path}: not a selection.json written by isg select/preprocess ({exc})") from None
    return rule_from_args(args), None  # None: the files' selector's natural rule


def run(args) -> int:
    from isg.cli import CLIError
    from isg.select import apply_rule

    paths = _h5_paths(args.h5)
    rule, source = _rule(args)
    if rule is not None and rule.rule == "threshold" and rule.threshold is None:
        raise CLIError("--rule threshold needs --threshold")
    if source is not None:
        from isg.select import read_scored

        try:
            mixed = [str(p) for p in paths if read_scored(p).selector != source.get("selector")]
        except (OSError, ValueError) as exc:
            raise CLIError(str(exc)) from None
        if mixed:
            raise CLIError(f"--from-selection was frozen over {source.get('selector')} scores; {mixed[0]} has other scores")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            record = apply_rule(paths, rule, args.out)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    for warning in caught:
        print(f"isg select: warning: {warning.message}", file=sys.stderr)
    print(json.dumps({key: record[key] for key in ("selector", "rule", "threshold", "threshold_unit", "n_slides",
                                                   "n_scored", "n_kept", "kept_per_slide")}))
    return 0
