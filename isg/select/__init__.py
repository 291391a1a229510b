"""Patch selection (paper Sec. 3.1 scorer, Sec. 4.2 rule): score tiles by information content, keep the informative ones.

Selectors (:data:`SELECTORS`, one :func:`register_selector` each) score uint8 tiles: the Shannon
scorer (bits, :mod:`isg.ops.shannon`) or a baseline (Otsu tissue fraction, gradient, Canny, DoG, LoG);
each carries its natural rule. Rules (:data:`RULE_KINDS`, one :func:`register_rule` each) turn scores
into a keep-mask and the cut they used: :func:`select` with a :class:`SelectionRule` (per-slide
mean + n sigma, the paper's frozen cohort cut, an absolute threshold, or top-k). :func:`apply_rule`
re-applies a rule to the scores stored by ``isg preprocess``.
"""

from isg.select.rules import (DEFAULT_RULE, N_SIGMA, PAPER_ABLATION_BITS, PAPER_PATCH_SIZE, PAPER_THRESHOLD_BITS, RULE_KINDS,
                              RULES, RuleKind, Selection, SelectionRule, SelectionWarning, cohort_threshold,
                              default_threshold_bits, mean_std_threshold, register_rule, select)
from isg.select.selectors import SELECTORS, Selector, get_selector, grey_tiles, otsu_grey_threshold, register_selector
from isg.select.stored import SELECTION_FILE, apply_rule, read_scored, reselect, reselect_h5

__all__ = ["SELECTORS", "RULES", "RULE_KINDS", "N_SIGMA", "DEFAULT_RULE", "PAPER_PATCH_SIZE", "PAPER_THRESHOLD_BITS",
           "PAPER_ABLATION_BITS", "SELECTION_FILE", "RuleKind", "Selection", "SelectionRule", "SelectionWarning",
           "Selector", "register_rule", "register_selector", "get_selector", "grey_tiles", "otsu_grey_threshold",
           "select", "mean_std_threshold", "cohort_threshold", "default_threshold_bits", "apply_rule", "read_scored",
           "reselect", "reselect_h5"]
