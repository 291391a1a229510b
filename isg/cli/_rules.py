"""Selection-rule arguments shared by ``isg preprocess`` and ``isg select`` (one SelectionRule from them)."""

from __future__ import annotations

import argparse


def add_rule_arguments(group) -> None:
    """``--rule``, ``--threshold``, ``--top-k``, ``--n-sigma``, ``--share``; none given: the selector's natural rule."""
    from isg.select import N_SIGMA, RANK_SHARE, RULE_KINDS, SELECTORS

    natural = "; ".join(f"{name} {s.natural_rule.rule}" + (f" {s.natural_rule.threshold:g}" if s.natural_rule.threshold
                                                             is not None else "") for name, s in SELECTORS.items())
    group.add_argument("--rule", choices=RULE_KINDS,
                       help="rank: keep the --share best patches of each slide (default: the 15.87%% that mean + 1 sigma "
                            "keeps of normal scores, whatever the skew); mean_std: keep above mean + n_sigma std of each "
                            "slide (the paper's words); robust_z: above median + n_sigma * 1.4826 MAD; cohort: the paper's rule, mean + "
                            "n_sigma std over every slide's scores frozen as one cut in selection.json (with "
                            "--threshold: that frozen cut); threshold; topk. Without --rule: topk with --top-k, "
                            "threshold with --threshold, mean_std with --n-sigma, else the selector's natural rule "
                            f"({natural})")
    group.add_argument("--threshold", type=float, help="absolute score cut (bits for shannon; default default_threshold_bits(p))")
    group.add_argument("--top-k", type=int, dest="k", help="keep the k best patches")
    group.add_argument("--n-sigma", type=float, help=f"sigmas above the mean for mean_std, robust_z and cohort (default {N_SIGMA:g})")
    group.add_argument("--share", type=float, help=f"share of each slide's patches kept by rank (default {RANK_SHARE:g})")


def rule_from_args(args: argparse.Namespace):
    """The :class:`~isg.select.SelectionRule` of the arguments of :func:`add_rule_arguments`, or None when none
    is given (the selector's natural rule). Raises :class:`isg.cli.CLIError` for a bad combination."""
    from isg.cli import CLIError
    from isg.select import N_SIGMA, RANK_SHARE, SelectionRule

    share = getattr(args, "share", None)
    name = args.rule or ("topk" if args.k is not None else "threshold" if args.threshold is not None
                         else "mean_std" if args.n_sigma is not None else "rank" if share is not None else None)
    if name is None:
        return None
    try:
        return SelectionRule(name, n_sigma=N_SIGMA if args.n_sigma is None else args.n_sigma, threshold=args.threshold, k=args.k,
                             share=RANK_SHARE if share is None else share)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
