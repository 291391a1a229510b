"""Selection-rule arguments shared by ``isg preprocess`` and ``isg select`` (one SelectionRule from them)."""

from __future__ import annotations

import argparse


def add_rule_arguments(group) -> None:
    """``--rule``, ``--threshold``, ``--top-k``, ``--n-sigma``; none given: the selector's natural rule."""
    from isg.select import N_SIGMA, RULE_KINDS, SELECTORS

    natural = "; ".join(f"{name} {s.natural_rule.rule}" + (f" {s.natural_rule.threshold:g}" if s.natural_rule.threshold
                                                             is not None else "") for name, s in SELECTORS.items())
    group.add_argument("--rule", choices=RULE_KINDS,
                       help="mean_std: keep above mean + n_sigma std of each slide; cohort: the paper's rule, mean + "
                            "n_sigma std over every slide's scores frozen as one cut in selection.json (with "
                            "--threshold: that frozen cut); threshold; topk. Without --rule: topk with --top-k, "
                            "threshold with --threshold, mean_std with --n-sigma, else the selector's natural rule "
                            f"({natural})")
    group.add_argument("--threshold", type=float, help="absolute score cut (bits for shannon; default default_threshold_bits(p))")
    group.add_argument("--top-k", type=int, dest="k", help="keep the k best patches")
    group.add_argument("--n-sigma", type=float, help=f"sigmas above the mean for mean_std and cohort (default {N_SIGMA:g})")


def rule_from_args(args: argparse.Namespace):
    """The :class:`~isg.select.SelectionRule` of the arguments of :func:`add_rule_arguments`, or None when none
    is given (the selector's natural rule). Raises :class:`isg.cli.CLIError` for a bad combination."""
    from isg.cli import CLIError
    from isg.select import N_SIGMA, SelectionRule

    name = args.rule or ("topk" if args.k is not None else "threshold" if args.threshold is not None
                         else "mean_std" if args.n_sigma is not None else None)
    if name is None:
        return None
    try:
        return SelectionRule(name, n_sigma=N_SIGMA if args.n_sigma is None else args.n_sigma, threshold=args.threshold, k=args.k)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
