"""Patch selection (paper Sec. 3.1 scorer, Sec. 4.2 rule): score tiles by information content, keep the informative ones.

Selectors (:data:`SELECTORS`, one :func:`register_selector` each) score uint8 tiles: the Shannon
scorer (bits, :mod:`isg.ops.shannon`) or a baseline (Otsu tissue fraction, gradient, Canny, DoG, LoG);
each carries its natural rule. Rules (:data:`RULE_KINDS`, one :func:`register_rule` each) turn scores
into a keep-mask and the cut they used: :func:`select` with a :class:`SelectionRule` (per-slide
share by rank (the default), mean + n sigma, robust z, the paper's frozen cohort cut, an absolute threshold,
or top-k); :func:`signal_precision` scores a rule against the known signal of a synthetic cohort. :func:`apply_rule`
re-applies a rule to the scores stored by ``isg preprocess``.
"""

from isg.select.known_answer import signal_precision, stored_patches
from isg.select.rules import (DEFAULT_RULE, KEEP_FLOOR, KEEP_FLOOR_PATCHES, MAD_TO_SIGMA, kept_record, N_SIGMA, RANK_SHARE, PAPER_ABLATION_BITS, PAPER_PATCH_SIZE, PAPER_THRESHOLD_BITS, RULE_KINDS,
                              RULES, RuleKind, Selection, SelectionRule, SelectionWarning, cohort_threshold,
                              default_threshold_bits, mean_std_threshold, register_rule, robust_z_threshold, select)
from isg.select.selectors import SELECTORS, Selector, get_selector, grey_tiles, otsu_grey_threshold, register_selector
from isg.select.stored import SELECTION_FILE, apply_rule, read_scored, reselect, reselect_h5

__all__ = ["KEEP_FLOOR", "KEEP_FLOOR_PATCHES", "kept_record", "signal_precision", "stored_patches", "RANK_SHARE", "MAD_TO_SIGMA", "robust_z_threshold", "SELECTORS", "RULES", "RULE_KINDS", "N_SIGMA", "DEFAULT_RULE", "PAPER_PATCH_SIZE", "PAPER_THRESHOLD_BITS",
           "PAPER_ABLATION_BITS", "SELECTION_FILE", "RuleKind", "Selection", "SelectionRule", "SelectionWarning",
           "Selector", "register_rule", "register_selector", "get_selector", "grey_tiles", "otsu_grey_threshold",
           "select", "mean_std_threshold", "cohort_threshold", "default_threshold_bits", "apply_rule", "read_scored",
           "reselect", "reselect_h5"]
